"""The user's own labelled images wherever kd3 names a dataset (kd3.data.labelled): an ImageFolder
directory, a path,label CSV or an .npz, decoded by ingest's decoder, classes matched to a model's by
name; wired into train-teacher, distill's eval_data and the contamination checks."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from kd3 import api, preflight
from kd3.config import ConfigError, DistillConfig, PoolConfig, TeacherRef, TeacherTrainConfig, TrainConfig
from kd3.data import contamination
from kd3.data.ingest import ingest
from kd3.data.labelled import load_labelled
from kd3.data.pool import Pool
from kd3.data.sources import DIGIT_CLASSES, channel_stats, load_source
from kd3.data_cli import add_data_parser
from kd3.teacher import read_teacher_info

# The labelled files in load order: class folders sorted, files sorted inside each (hidden ones left out).
ORDER = ["cat/a.png", "cat/sub/b.png", "dog/c.png", "owl/d.jpg", "owl/e.gif"]
LABELS = [0, 0, 1, 2, 2]  # cat, dog, owl


def noise(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """3 classes of images in several sizes and modes, a sub-folder, a broken file and hidden ones."""
    root = tmp_path / "labelled"
    rng = np.random.default_rng(0)
    for sub in ("cat/sub", "dog", "owl", ".ipynb_checkpoints"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(noise(rng, 30, 40, 3)).save(root / "cat" / "a.png")  # RGB, landscape
    Image.fromarray(noise(rng, 50, 20, 1)).save(root / "cat" / "sub" / "b.png")  # L, portrait
    Image.fromarray(noise(rng, 16, 16, 4), "RGBA").save(root / "dog" / "c.png")  # alpha
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    Image.fromarray(noise(rng, 24, 24, 3)).save(root / "owl" / "d.jpg", quality=95)
    Image.fromarray(noise(rng, 20, 20, 1)).convert("P").save(root / "owl" / "e.gif")  # palette
    Image.fromarray(noise(rng, 16, 16, 3)).save(root / "owl" / ".hidden.png")  # hidden: not a sample
    Image.fromarray(noise(rng, 16, 16, 3)).save(root / ".ipynb_checkpoints" / "x.png")  # hidden: not a class
    return root


def test_folder_loads_labels_classes_and_the_pixels_ingest_gives(folder, capsys):
    data = load_labelled(str(folder), image_size=16, channels=3)
    assert data.classes == ["cat", "dog", "owl"]
    assert data.labels.tolist() == LABELS and data.labels.dtype == torch.int64
    pool, _ = ingest(folder, 16, 3, workers=1)
    by_path = {str(p): pool.images[i] for i, p in enumerate(pool.paths)}
    expected = torch.stack([by_path[str(folder / name)] for name in ORDER])
    assert data.images.dtype == torch.uint8 and torch.equal(data.images, expected)
    assert data.mean == pytest.approx(channel_stats(expected.numpy())[0]) and data.index is None
    err = capsys.readouterr().err.strip()
    assert err == f"{folder}: skipped 1 of 6 image files that do not decode (first: {folder / 'dog' / 'broken.png'}: not an image)"


def test_grey_decoding_is_the_decoders_luma(tmp_path):
    (tmp_path / "red").mkdir()
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "red" / "r.png")
    data = load_labelled(str(tmp_path), image_size=8, channels=1)
    assert data.images.shape == (1, 1, 8, 8) and (data.images == 76).all()  # 0.299 × 255 = 76.2


def test_folder_and_csv_need_a_size_and_nothing_readable_names_the_folder(folder, tmp_path):
    with pytest.raises(ValueError, match="image_size=N and channels=1"):
        load_labelled(str(folder))
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=f"no readable image in {tmp_path / 'bad'}"):
        load_labelled(str(tmp_path / "bad"), 16, 1)
    with pytest.raises(FileNotFoundError, match="not a SOURCE:SPLIT"):
        load_labelled(str(tmp_path / "no-such-folder"), 16, 1)


def test_csv_with_names_and_with_indices(folder, tmp_path):
    reference = load_labelled(str(folder), 16, 1)
    names = tmp_path / "names.csv"
    names.write_text("path,label\n" + "".join(f"labelled/{n},{['tabby', 'hound', 'barn'][y]}\n"
                                              for n, y in zip(ORDER, LABELS)))
    data = load_labelled(str(names), 16, 1)
    assert data.classes == ["barn", "hound", "tabby"]  # sorted names
    assert data.labels.tolist() == [2, 2, 1, 0, 0] and torch.equal(data.images, reference.images)
    indices = folder / "indices.csv"  # no header; paths relative to the CSV's own folder; a missing file
    indices.write_text("owl/e.gif,4\ncat/a.png,0\nmissing.png,1\n")
    data = load_labelled(str(indices), 16, 1)
    assert data.classes == ["0", "1", "2", "3", "4"] and data.labels.tolist() == [4, 0]
    assert torch.equal(data.images, reference.images[[4, 0]])
    data = load_labelled(str(indices), 16, 1, classes=["x", "y", "z", "u", "v"])
    assert data.classes == ["x", "y", "z", "u", "v"] and data.labels.tolist() == [4, 0]
    mixed = folder / "mixed.csv"
    mixed.write_text("cat/a.png,cat\ndog/c.png,1\n")
    with pytest.raises(ValueError, match="mixes class names and integer labels"):
        load_labelled(str(mixed), 16, 1)


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW-float"])
def test_npz_in_each_layout(tmp_path, layout):
    rng = np.random.default_rng(1)
    channels = 1 if layout == "NHW" else 3
    expected = rng.integers(0, 256, (4, channels, 12, 12), dtype=np.uint8)
    stored = {"NHW": expected[:, 0], "NHWC": expected.transpose(0, 2, 3, 1),
              "NCHW-float": expected.astype(np.float32) / 255}[layout]
    path = tmp_path / "data.npz"
    np.savez(path, images=stored, labels=np.array([1, 0, 1, 1]), classes=np.array(["no", "yes"]))
    data = load_labelled(str(path))
    assert data.images.shape == (4, channels, 12, 12) and np.array_equal(data.images.numpy(), expected)
    assert data.classes == ["no", "yes"] and data.labels.tolist() == [1, 0, 1, 1]
    assert data.mean == pytest.approx(channel_stats(expected)[0])


def test_npz_resized_like_the_same_images_as_files(tmp_path):
    """An .npz converted to another size and channel count holds what ingest's decoder makes of the
    same images saved as files."""
    images = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=np.array([0, 1, 2]))
    (tmp_path / "files" / "k").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "files" / "k" / f"{i}.png")
    data = load_labelled(str(tmp_path / "data.npz"), image_size=8, channels=1)
    files = load_labelled(str(tmp_path / "files"), image_size=8, channels=1)
    assert data.images.shape == (3, 1, 8, 8) and torch.equal(data.images, files.images)
    assert data.classes == ["0", "1", "2"]


def test_classes_are_matched_to_a_teachers_by_name(folder):
    teacher = ["owl", "cat", "dog", "bird"]
    data = load_labelled(str(folder), 16, 3, classes=teacher)
    assert data.classes == teacher
    assert data.labels.tolist() == [1, 1, 2, 0, 0]  # cat, cat, dog, owl, owl in the teacher's numbering
    assert torch.equal(data.images, load_labelled(str(folder), 16, 3).images)


def test_a_class_the_teacher_does_not_have_is_an_error_listing_its_classes(folder):
    with pytest.raises(ValueError, match=r"class 'owl' is not one of the model's classes \(cat, dog\)"):
        load_labelled(str(folder), 16, 3, classes=["cat", "dog"])
    path = folder.parent / "data.npz"
    np.savez(path, images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 5]))
    with pytest.raises(ValueError, match="label index 5 is not one of"):
        load_labelled(str(path), classes=["cat", "dog"])


def test_builtin_sources_load_as_before_and_are_renumbered_by_name():
    source = load_source("uci-digits:test")
    same = load_labelled("uci-digits:test", image_size=32, channels=3)  # not resized: the caller checks shapes
    assert torch.equal(same.images, source.images) and torch.equal(same.labels, source.labels)
    reversed_classes = DIGIT_CLASSES[::-1]
    renumbered = load_labelled("uci-digits:test", classes=reversed_classes)
    assert renumbered.classes == reversed_classes and torch.equal(renumbered.labels, 9 - source.labels)
    other = load_labelled("uci-digits:test", classes=["a", "b"])  # other names: left as they are
    assert other.classes == DIGIT_CLASSES and torch.equal(other.labels, source.labels)


# -- wired in ------------------------------------------------------------------------------------------
@pytest.fixture
def teacher(folder, tmp_path, monkeypatch):
    """A teacher trained (1 tiny epoch) on the folder, validated on a CSV, tested on the folder."""
    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    (folder / "val.csv").write_text("owl/d.jpg,owl\ncat/a.png,cat\n")
    cfg = TeacherTrainConfig(model="lenet5_half", data=str(folder), val_data=str(folder / "val.csv"),
                             test_data=str(folder), image_size=16, channels=3, output=str(tmp_path / "teacher.pt"),
                             output_dir=str(tmp_path / "runs"), train=TrainConfig(epochs=1, batch_size=4, device="cpu"),
                             progress=False)
    path, info = api.train_teacher(cfg)
    return path, info


def test_train_teacher_on_a_folder_records_its_classes(teacher, folder):
    path, info = teacher
    record = read_teacher_info(path)
    assert record.classes == ["cat", "dog", "owl"] and record.num_classes == 3
    assert (record.in_channels, record.image_size) == (3, 16) and record.data == str(folder)
    mean, std = channel_stats(load_labelled(str(folder), 16, 3).images.numpy())
    assert record.mean == pytest.approx(list(mean)) and record.std == pytest.approx(list(std))
    assert 0 <= record.val_accuracy <= 1 and record.val_accuracy * 2 == round(record.val_accuracy * 2)  # 2 images


def test_train_teacher_needs_a_size_for_a_folder(folder, tmp_path):
    cfg = TeacherTrainConfig(model="lenet5_half", data=str(folder), output=str(tmp_path / "t.pt"),
                             output_dir=str(tmp_path / "runs"), progress=False)
    with pytest.raises(ValueError, match="image_size=N"):
        api.train_teacher(cfg)


def test_a_builtin_source_is_not_resized_for_train_teacher(tmp_path):
    cfg = TeacherTrainConfig(model="lenet5_half", data="uci-digits:train", image_size=32, channels=3,
                             output=str(tmp_path / "t.pt"), output_dir=str(tmp_path / "runs"), progress=False)
    with pytest.raises(ConfigError, match="data=uci-digits:train images are 1×28×28 .* not the image_size=32 channels=3"):
        api.train_teacher(cfg)


def test_a_teacher_still_to_be_trained_on_a_folder_is_checked_from_its_recipe(folder, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: lenet5_half\ndata: {folder}\nimage_size: 16\nchannels: 3\noutput: {tmp_path / 't.pt'}\n")
    cfg = DistillConfig(teacher=TeacherRef(checkpoint=str(tmp_path / "t.pt"), recipe=str(recipe)))
    spec = preflight.teacher_spec(cfg)
    assert spec.shape == (3, 16, 16) and spec.classes == ("cat", "dog", "owl") and spec.num_classes == 3


def test_distill_eval_data_is_decoded_and_matched_to_the_teacher(teacher, folder, tmp_path):
    path, _ = teacher
    pool = ingest(folder, 16, 3, out=tmp_path / "pool.npz", workers=1)[0]
    eval_csv = folder / "eval.csv"
    eval_csv.write_text("dog/c.png,dog\nowl/e.gif,2\n")  # a name and an index of the teacher's classes
    cfg = DistillConfig(student="lenet5_half", eval_data=str(eval_csv), teacher=TeacherRef(checkpoint=str(path)),
                        pool=PoolConfig(name="file", path=str(tmp_path / "pool.npz")),
                        train=TrainConfig(epochs=1, batch_size=4, device="cpu"), progress=False)  # a pool of 5 fills one batch
    checked = api.check_distillation(cfg)
    assert checked.eval_data.classes == ["cat", "dog", "owl"] and checked.eval_data.labels.tolist() == [1, 2]
    assert checked.eval_data.images.shape == (2, 3, 16, 16) and len(checked.pool) == len(pool)


def test_contamination_against_own_data_names_the_pool_files(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        Image.fromarray(noise(rng, 16, 16, 3)).save(crawl / f"web{i}.png")
    (crawl / "copy.png").write_bytes((folder / "dog" / "c.png").read_bytes())  # a copy of a labelled image
    pool, _ = ingest(crawl, 16, 3, out=tmp_path / "pool", workers=1)
    report = contamination.pool_contamination(pool, str(folder), duplicates=False, cache=False)
    assert report.flagged.tolist() == [0] and report.eval_index.tolist() == [2] and report.exact.all()
    assert len(contamination.drop_contaminated(pool, report)) == 6

    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers())
    out = tmp_path / "pairs.csv"
    args = parser.parse_args(["data", "contamination", str(tmp_path / "pool"), "--against", str(folder),
                              "--out", str(out), "--no-duplicates"])
    args.func(args)
    assert str(crawl / "copy.png") in capsys.readouterr().out  # the closest-copies table names the file
    header, row = out.read_text().splitlines()
    assert header.endswith(",path") and row.startswith("exact,0,2,") and row.endswith(str(crawl / "copy.png"))


def test_drop_contaminated_config_checks_against_own_data(folder, tmp_path, monkeypatch, teacher):
    path, _ = teacher
    images = load_labelled(str(folder), 16, 3).images
    noise_images = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8))
    Pool.unlabelled(torch.cat([noise_images, images[[3]]]), origin="web").save(tmp_path / "p.npz")
    cfg = DistillConfig(student="lenet5_half", eval_data="", teacher=TeacherRef(checkpoint=str(path)),
                        pool=PoolConfig(name="file", path=str(tmp_path / "p.npz"), drop_contaminated=True,
                                        contamination_against=str(folder)),
                        train=TrainConfig(epochs=1, batch_size=4, device="cpu"), progress=False)  # 5 images left: one batch
    pool = api.check_distillation(cfg).pool
    assert len(pool) == 5 and torch.equal(pool.images, noise_images)
    assert pool.meta["contamination_dropped"]["against"] == str(folder)
