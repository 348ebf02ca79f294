"""Contamination: copies of evaluation images in a pool (kd3.data.contamination, copymatch, plant).

The images are smooth random fields: unrelated ones are far apart, so any flag among them is a
false positive, and every planted copy (made by Pillow, not by the finder's own resampling) must
be found with its original."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd3 import api
from kd3.config import ConfigError, DistillConfig, load_config
from kd3.data import contamination, copymatch, plant
from kd3.data.pool import Pool
from kd3.data_cli import add_data_parser


def smooth_images(n: int, seed: int, channels: int = 1, size: int = 28) -> torch.Tensor:
    """uint8 n×C×size×size: 7×7 random fields upscaled bicubically, full contrast."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 7, 7, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def planted():
    """200 evaluation images; a pool of 150 unrelated images plus 10 exact copies and 6 of each edit."""
    evaluation = smooth_images(200, seed=1)
    base = Pool.unlabelled(smooth_images(150, seed=2), origin="web")
    kinds = [*plant.EDITS, "crop+brightness", "flip+jpeg"]
    pool, positions, originals, labels = plant.plant_copies(base, evaluation, 10, 6 * len(kinds),
                                                            np.random.default_rng(0), kinds)
    report = contamination.find_contamination(pool.images, evaluation, "test:eval")
    return pool, positions, originals, labels, report, len(base)


def test_every_planted_copy_is_found_with_its_original_and_nothing_else(planted):
    pool, positions, originals, labels, report, base_size = planted
    found = set(zip(report.pool_index.tolist(), report.eval_index.tolist()))
    missed = [(label, int(i)) for i, j, label in zip(positions, originals, labels) if (int(i), int(j)) not in found]
    assert not missed
    assert set(report.flagged.tolist()) == set(positions.tolist())  # none of the 150 unrelated images
    assert report.summary()["flagged"] == len(positions)


def test_exact_copies_are_exact_at_distance_zero_and_edits_are_near(planted):
    pool, positions, originals, labels, report, _ = planted
    kind = {(i, j): (k, d) for i, j, k, d in zip(report.pool_index.tolist(), report.eval_index.tolist(),
                                                 report.exact.tolist(), report.distance.tolist())}
    for i, j, label in zip(positions.tolist(), originals.tolist(), labels):
        exact, distance = kind[(i, j)]
        if label == "exact":
            assert exact and distance == 0.0
        else:
            assert not exact and 0.0 <= distance <= contamination.THRESHOLD
    assert report.summary()["exact"] == labels.count("exact")


def test_brightness_and_flip_are_undone_exactly():
    """A flipped copy and a brightness shift without saturation fit with a residual of (almost) 0."""
    original = smooth_images(1, seed=3)
    shifted = (original.int() * 3 // 4 + 20).to(torch.uint8)  # a = 0.75, b = 20: no pixel saturates
    gallery = copymatch.Gallery([original], max_crop=1)
    for copy in (original.flip(-1), shifted):
        distance = copymatch.verify(copymatch.gray(copy), torch.zeros(1, 1, dtype=torch.long), gallery)
        assert distance.item() < 0.5


def test_a_negative_image_is_no_copy():
    original = smooth_images(1, seed=4)
    gallery = copymatch.Gallery([original], max_crop=1)
    distance = copymatch.verify(copymatch.gray(255 - original), torch.zeros(1, 1, dtype=torch.long), gallery)
    assert distance.item() > 4 * contamination.THRESHOLD


def test_an_image_equally_near_two_distinct_evaluation_images_copies_neither():
    """The ratio rule: P lies between A1 and A2 (each within the threshold of P, not of each
    other): P is a look-alike of both, not a copy of one, so nothing is flagged."""
    base = smooth_images(1, seed=8).float()
    a1, a2 = ((base + 0.08 * (smooth_images(1, seed=s).float() - 127.5)).round().clamp(0, 255).to(torch.uint8)
              for s in (9, 10))
    evaluation = torch.cat([a1, a2, smooth_images(20, seed=11)])
    query = base.to(torch.uint8)
    gallery = copymatch.Gallery([evaluation], contamination.MAX_CROP)
    to_each = copymatch.verify(copymatch.gray(query), torch.tensor([[0, 1]]), gallery)[0]
    between = copymatch.verify(copymatch.gray(a1), torch.tensor([[1]]), gallery)[0, 0]
    assert (to_each <= contamination.THRESHOLD).all() and between > contamination.THRESHOLD
    assert len(contamination.find_copies(query, evaluation)[0]) == 0


def test_resize_matrices_are_torch_bilinear_resizing():
    x = torch.rand(3, 1, 1, 28)
    for n_out in (8, 14, 20, 28, 40):
        expected = F.interpolate(x, size=(1, n_out), mode="bilinear", antialias=n_out < 28, align_corners=False)
        got = x[:, 0, 0] @ copymatch.resize_matrix(28, n_out).T
        torch.testing.assert_close(got, expected[:, 0, 0], atol=1e-5, rtol=0)


def test_variants_render_as_crops_resized_back():
    image = torch.rand(1, 16, 16)
    maps = copymatch.Maps((16, 16), max_crop=2, device=torch.device("cpu"))
    v = next(i for i, v in enumerate(maps.variants) if v.crop == 2 and v.top == 1 and v.left == 0 and v.flip)
    rendered = copymatch.apply(maps.rows[v], image, maps.cols[v])
    crop = image[:, 1:15, 0:14][:, None]
    expected = F.interpolate(crop, size=(16, 16), mode="bilinear", antialias=False, align_corners=False)[:, 0]
    torch.testing.assert_close(rendered, expected.flip(-1), atol=1e-5, rtol=0)


def test_colour_copies_of_grey_evaluation_sets_and_back_are_compared_in_grey():
    evaluation = smooth_images(40, seed=5, channels=3)
    pool = torch.cat([smooth_images(30, seed=6, channels=3), evaluation[7:8]])
    pool_index, eval_index, distance, exact = contamination.find_copies(pool, evaluation)
    assert pool_index.tolist() == [30] and eval_index.tolist() == [7] and exact.tolist() == [True]


def test_duplicates_inside_the_pool_are_grouped():
    images = smooth_images(60, seed=7)
    rng = np.random.default_rng(1)
    # Dull images (a flat one, faint ramps that a brightness-contrast fit maps onto each other) are
    # matched exactly only: else each would be "near" every other dull image.
    ramp = torch.linspace(0, 20, 28).expand(28, 28)
    dull = torch.stack([torch.full((1, 28, 28), 40.0), 60 + 0.5 * ramp[None], 120 + ramp[None],
                        200 - ramp[None]]).round().to(torch.uint8)
    pool = torch.cat([images, images[3:4], plant.edit(images[3], "jpeg", rng)[None],
                      plant.edit(images[10], "resize", rng)[None], dull, dull[:1]])
    groups = contamination.find_duplicates(pool)
    assert [g.tolist() for g in groups] == [[3, 60, 61], [10, 62], [63, 67]]


def test_drop_contaminated_drops_exactly_the_flagged_images(planted):
    pool, positions, _, _, report, base_size = planted
    kept = contamination.drop_contaminated(pool, report)
    assert len(kept) == base_size
    assert torch.equal(kept.images[:], pool.images[:base_size])
    assert kept.meta["contamination_dropped"]["flagged"] == len(positions)
    with pytest.raises(ValueError, match="covers"):
        contamination.drop_contaminated(pool.subset(np.arange(10)), report)


def test_reports_survive_the_cache_and_a_corrupt_cache_is_recomputed(planted, tmp_path, monkeypatch):
    *_, report, _ = planted
    path = tmp_path / "report.npz"
    report.save(path)
    back = contamination.Contamination.load(path)
    assert back.summary() == report.summary()
    assert np.array_equal(back.pool_index, report.pool_index) and np.array_equal(back.distance, report.distance)
    path.write_bytes(b"not a zip")
    assert contamination._cached(path) is None


def test_csv_lists_every_pair_and_duplicate(planted, tmp_path):
    pool, positions, *_, report, _ = planted
    report.duplicate_groups = [np.array([1, 2])]
    try:
        lines = report.write_csv(tmp_path / "c.csv", pool.source.astype(str), pool.style.astype(str)).read_text()
    finally:
        report.duplicate_groups = []
    rows = lines.splitlines()
    assert rows[0] == "kind,pool_index,eval_index,group,distance,source,style"
    assert len(rows) == 1 + len(report.pool_index) + 2
    assert sum(r.startswith("exact,") for r in rows) == int(report.exact.sum())
    assert rows[-1].startswith("pool-duplicate,2,,0,")


@pytest.fixture
def pool_file(tmp_path, monkeypatch):
    """A pool .npz of 40 UCI-digits test images' copies (3 exact, 1 flipped) and 40 noise images."""
    from kd3.data.sources import load_source

    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    test = load_source("uci-digits:test").images
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, *test.shape[1:]), dtype=np.uint8))
    images = torch.cat([noise, test[[5, 17, 99]], test[42:43].flip(-1)])
    return Pool.unlabelled(images, origin="web").save(tmp_path / "pool.npz")


def test_cli_reports_and_writes_the_pairs(pool_file, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers())
    out = tmp_path / "pairs.csv"
    args = parser.parse_args(["data", "contamination", str(pool_file), "--against", "uci-digits:test",
                              "--out", str(out)])
    args.func(args)
    printed = capsys.readouterr().out
    assert "pool.drop_contaminated=true" in printed
    rows = [r.split(",") for r in out.read_text().splitlines()[1:]]
    copies = {(int(r[1]), int(r[2])) for r in rows if r[0] in ("exact", "near")}
    assert {(40, 5), (41, 17), (42, 99), (43, 42)} <= copies
    assert all(i >= 40 for i, _ in copies)  # no noise image copies a digit


def test_distill_config_drops_contaminated_images(pool_file):
    cfg = load_config(DistillConfig, "configs/digits-wild/blind_kd.yaml",
                      ["pool.name=file", f"pool.path={pool_file}", "eval_data=uci-digits:test",
                       "pool.drop_contaminated=true"])
    pool = api.load_pool(cfg)
    assert len(pool) == 40
    assert pool.meta["contamination_dropped"]["against"] == "uci-digits:test"


def test_drop_contaminated_without_evaluation_images_is_a_config_error(pool_file):
    cfg = load_config(DistillConfig, "configs/digits-wild/blind_kd.yaml",
                      ["pool.name=file", f"pool.path={pool_file}", "eval_data=", "pool.drop_contaminated=true"])
    with pytest.raises(ConfigError, match="contamination_against"):
        api.contamination_source(cfg)
