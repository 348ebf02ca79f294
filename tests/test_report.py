"""``kd3 report`` on synthetic run directories: a KD³-like run with provenance and saved
selections, and a one-epoch blind-KD run on an ingested pool (no selection, no provenance); and on
real tiny runs (tests/tiny_runs.py) of KD³, DFND and the recommended recipe, for the selection, the
teacher's class names and its accuracy."""
from __future__ import annotations

import argparse
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TinyNet
from kd3.cli import main
from kd3.config import DistillConfig, PoolConfig, TeacherRef, TrainConfig, save_config
from kd3.data.pool import Pool
from kd3.report.build import write_report
from kd3.report.cli import add_report_parser
from kd3.report.grids import IRRELEVANT_BORDER, pick_epochs, selection_sheet
from kd3.report.run import read_run
from kd3.teacher import TeacherInfo, load_teacher, read_teacher_info, save_teacher
from tiny_runs import distill_args, only_run, write_inputs

POOL_SIZE = 60
RELEVANT = 20  # the first 20 images are "fashion-r" (relevant), the other 40 "noise"
TEST_ACC = [0.5, 0.8, 0.7]  # the best epoch is not the last: the report must show 70.00 %


def provenance_pool() -> Pool:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (POOL_SIZE, 1, 8, 8), dtype=np.uint8))
    relevant = np.arange(POOL_SIZE) < RELEVANT
    return Pool(images=images, source=np.where(relevant, "fashion-r", "noise"),
                style=np.where(relevant, "clean", "none"), relevant=relevant,
                true_label=np.where(relevant, np.arange(POOL_SIZE) % 3, -1), meta={"provenance": True})


def selection(epoch: int) -> np.ndarray:
    """Epoch e keeps every relevant image and 10·e noise images."""
    return np.arange(RELEVANT + 10 * epoch, dtype=np.int32)


def make_run(folder: Path, pool: Pool, method: str, records: list[dict], selections: bool,
             teacher: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    pool_path = pool.save(folder / "pool.npz")
    save_config(DistillConfig(name=folder.name, pool=PoolConfig(name="file", path=str(pool_path)),
                              train=TrainConfig(epochs=len(records)), method={"name": method},
                              teacher=TeacherRef(checkpoint=str(teacher or ""))),
                folder / "config.yaml")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if selections:
        (folder / "selections").mkdir()
        for record in records:
            np.save(folder / "selections" / f"epoch-{record['epoch']:04d}.npy", selection(record["epoch"]))
    return folder


def kd3_record(epoch: int) -> dict:
    chosen = selection(epoch)
    return {"epoch": epoch, "lr": 0.05, "loss_wfa": 1.0 / epoch, "loss_ia": 0.1, "loss": 1.0 / epoch + 0.1,
            "train_images": len(chosen), "epoch_time": 0.5, "images_per_s": len(chosen) / 0.5,
            "test_acc": TEST_ACC[epoch - 1], "test_loss": 1.0 / epoch, "elapsed": 0.6 * epoch,
            "selection": {"selected": len(chosen), "precision": RELEVANT / len(chosen), "recall": 1.0,
                          "precision_correct": 0.5, "recall_correct": 1.0,
                          "source_share": {"fashion-r": RELEVANT / len(chosen)}},
            "selected": len(chosen), "teacher_weight": 1.0 - epoch / 3, "empty_selection": False,
            "predicted_per_class": [20, 20, 20], "selected_per_class": [10 + epoch, 10, 10 + 9 * epoch],
            "class_thresholds": [0.5, 0.5, 0.5], "mean_weight": 0.9, "feature_mse": 0.2}


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")


def linked_pngs(page: Path) -> list[str]:
    parser = _Images()
    parser.feed(page.read_text())
    return parser.sources


def assert_self_contained(page: Path) -> list[str]:
    """Every <img> is a relative link to a non-empty PNG next to the page; nothing external."""
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and "http" not in text
    sources = linked_pngs(page)
    for src in sources:
        assert "/" not in src and src.endswith(".png"), src
        path = page.parent / src
        assert path.is_file() and path.stat().st_size > 0, src
        with Image.open(path) as image:
            assert image.format == "PNG"
    return sources


@pytest.fixture(scope="module")
def kd3_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "kd3", provenance_pool(), "kd3",
                    [kd3_record(e) for e in (1, 2, 3)], selections=True)


@pytest.fixture(scope="module")
def kd3_page(kd3_run) -> Path:
    return write_report(kd3_run)


def test_report_links_only_existing_pngs(kd3_page, kd3_run):
    assert kd3_page == kd3_run / "report" / "report.html"
    sources = assert_self_contained(kd3_page)
    assert sorted(sources) == ["method-metrics.png", "per-class.png", "selection-epoch-0001.png",
                               "selection-epoch-0002.png", "selection-epoch-0003.png", "selection.png",
                               "training.png"]


def test_report_gives_the_last_epochs_accuracy_not_the_best(kd3_page):
    text = kd3_page.read_text()
    row = re.search(r"test accuracy at the last epoch \(epoch (\d+)[^<]*</td><td>([^<]*)</td>", text)
    assert row is not None and row.groups() == ("3", "70.00%")
    assert "test accuracy at the last epoch (3): 70.00%" in text  # the page's headline


def test_report_counts_selected_and_rejected_per_source(kd3_page):
    text = kd3_page.read_text()
    # Epoch 3 keeps all 20 relevant images and 30 of the 40 noise images.
    assert "<td>fashion-r</td><td>yes</td><td>20</td><td>0</td><td>100.0%</td>" in text
    assert "<td>noise</td><td>no</td><td>30</td><td>10</td><td>75.0%</td>" in text
    assert "Epoch 3: 50 of 60 pool images selected" in text


def test_irrelevant_images_get_a_red_border():
    pool = provenance_pool()
    chosen = np.zeros(POOL_SIZE, dtype=bool)
    chosen[:RELEVANT] = True  # every selected image relevant, every rejected one irrelevant
    pixels = np.asarray(selection_sheet(pool, chosen))
    red = np.all(pixels == IRRELEVANT_BORDER, axis=-1)
    rows = np.flatnonzero(red.any(axis=1))
    assert len(rows) and rows.min() > pixels.shape[0] // 4  # borders only in the (lower) rejected block


def test_run_without_selection_or_provenance_still_reports(tmp_path):
    """Blind KD, one epoch, on an ingested pool: the sections that apply, and a note for the rest."""
    pool = Pool.unlabelled(provenance_pool().images, origin="folder")
    record = {"epoch": 1, "lr": 0.05, "loss_kd": 2.0, "loss": 2.0, "train_images": POOL_SIZE, "epoch_time": 0.5,
              "images_per_s": POOL_SIZE / 0.5, "test_acc": 0.4, "test_loss": 1.5, "elapsed": 0.7}
    run = make_run(tmp_path / "blind", pool, "blind_kd", [record], selections=False)
    page = write_report(run, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    assert sorted(assert_self_contained(page)) == ["method-metrics.png", "training.png"]
    text = page.read_text()
    assert "test accuracy at the last epoch (1): 40.00%" in text
    for note in ("No selection was logged", "No per-class counts were logged", "No selection was saved"):
        assert note in text


def test_selections_on_a_pool_without_provenance_skip_the_marks(tmp_path):
    pool = Pool.unlabelled(provenance_pool().images, origin="folder")
    records = [{k: v for k, v in kd3_record(e).items() if k != "selection"} for e in (1, 2)]
    page = write_report(make_run(tmp_path / "ingested", pool, "kd3", records, selections=True))
    assert "selection-epoch-0002.png" in assert_self_contained(page)
    text = page.read_text()
    assert "irrelevant images cannot be marked" in text and "precision and recall are unknown" in text
    assert "<td>noise</td>" not in text


def test_cli_subcommand_writes_the_page(kd3_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(kd3_run), "--out", str(tmp_path / "cli")])
    args.func(args)
    assert (tmp_path / "cli" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def test_a_half_written_last_line_is_not_an_epoch(kd3_run, tmp_path):
    """A run in training may be halfway through appending its next epoch."""
    live = tmp_path / "live"
    live.mkdir()
    (live / "config.yaml").write_text((kd3_run / "config.yaml").read_text())
    (live / "metrics.jsonl").write_text((kd3_run / "metrics.jsonl").read_text() + '{"epoch": 4, "lr"')
    assert [r["epoch"] for r in read_run(live).history] == [1, 2, 3]


def test_pick_epochs_takes_first_middle_and_last():
    assert pick_epochs(list(range(1, 21))) == [1, 10, 20]
    assert pick_epochs([1, 2]) == [1, 2]
    assert pick_epochs([7]) == [7]


# -- the teacher: class names and accuracy, on real tiny runs ------------------------------------
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def cell(text: str, label: str) -> str:
    """The value beside ``label`` in a two-column table of the page."""
    match = re.search(rf"<tr><td>{re.escape(label)}</td><td>([^<]*)</td></tr>", text)
    assert match is not None, label
    return match.group(1)


def per_class_rows(text: str) -> list[list[str]]:
    """The rows of the per-class table (class, then its counts)."""
    body = text[text.index("<th>class</th>"):]
    body = body[:body.index("</table>")]
    return [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(<td>.*?)</tr>", body)]


@pytest.fixture(scope="module")
def teacher_inputs(tmp_path_factory) -> Path:
    """tiny_runs' teacher and pool; the teacher's classes renamed so that names cannot be taken for indices."""
    root = tmp_path_factory.mktemp("teacher-runs")
    write_inputs(root)
    net, info = load_teacher(root / "teacher.pt")
    info.classes = CLASS_NAMES
    save_teacher(root / "teacher.pt", net, info)
    return root


def tiny_run(root: Path, out: Path, config: str, *overrides: str) -> Path:
    """A ``kd3 distill`` of tiny_runs with ``config`` (a file next to its KD³ config) in place of KD³."""
    args = distill_args(root, out, *overrides)
    args[1] = str(Path(args[1]).with_name(config))
    # 3: the finished student was judged at chance and not exported (12 steps leave a tiny run's accuracy
    # near it); its run directory is complete all the same, and a report must describe failed runs too.
    assert main(args) in (0, 3)
    return only_run(out)


@pytest.mark.parametrize("config, size_key", [("kd3.yaml", "selected"), ("dfnd.yaml", "dfnd_kept"),
                                              ("recommended.yaml", "dfnd_kept")])
def test_a_selecting_run_reports_its_selection_class_names_and_teacher(teacher_inputs, tmp_path, config, size_key):
    run_dir = tiny_run(teacher_inputs, tmp_path / "runs", config)
    text = write_report(run_dir).read_text()
    info = read_teacher_info(teacher_inputs / "teacher.pt")
    assert "No selection was logged" not in text
    assert f"Left: images selected per epoch (from metrics.jsonl key {size_key})" in text
    assert "selection.png" in linked_pngs(run_dir / "report" / "report.html")
    rows = per_class_rows(text)
    assert [row[0] for row in rows] == CLASS_NAMES
    # The last epoch's chosen images per class add up to what that epoch saved as its selection.
    assert sum(int(row[-1]) for row in rows) == len(np.load(run_dir / "selections" / "epoch-0003.npy"))
    assert "Classes are shown as indices" not in text
    assert cell(text, "classes") == "10: " + ", ".join(CLASS_NAMES)
    assert cell(text, "teacher test accuracy (its checkpoint record)") == f"{info.test_accuracy:.2%}"
    assert cell(text, "teacher validation accuracy (its checkpoint record)") == f"{info.val_accuracy:.2%}"
    # Beside the student's in the headline: the teacher measured on the run's own eval images (teacher_eval.json).
    measured = json.loads((run_dir / "teacher_eval.json").read_text())
    assert f"(the teacher on the same images: {measured['accuracy']:.2%})" in text
    assert cell(text, f"teacher accuracy on the same eval data ({measured['eval_data']}, {measured['images']} images)") == \
        f"{measured['accuracy']:.2%}"


def test_a_run_whose_teacher_is_gone_reports_class_indices_and_why(teacher_inputs, tmp_path):
    gone = tmp_path / "gone.pt"
    gone.write_bytes((teacher_inputs / "teacher.pt").read_bytes())
    run_dir = tiny_run(teacher_inputs, tmp_path / "runs", "dfnd.yaml", f"teacher.checkpoint={gone}")
    gone.unlink()
    text = write_report(run_dir).read_text()
    assert [row[0] for row in per_class_rows(text)] == [str(k) for k in range(10)]
    why = f"the teacher checkpoint {gone} (teacher.checkpoint in config.yaml) is gone"
    assert f"Classes are shown as indices because {why}." in text
    assert f"No teacher record: {why}." in text
    assert cell(text, "teacher accuracy") == f"unknown: {why}"
    assert "No selection was logged" not in text


def test_an_unknown_teacher_accuracy_reads_unknown(tmp_path):
    """A NaN accuracy in the record (as ``kd3 teacher import`` writes) reads "unknown", not "nan%"; the
    validation accuracy, recorded here, comes from its own field."""
    teacher = tmp_path / "imported.pt"
    save_teacher(teacher, TinyNet(), TeacherInfo(arch="tiny", num_classes=3, in_channels=1, image_size=8,
                                                 classes=["coat", "bag", "shoe"], mean=[0.5], std=[0.25],
                                                 data="imported:tiny.onnx", test_accuracy=float("nan"),
                                                 val_accuracy=0.625))
    run = make_run(tmp_path / "kd3", provenance_pool(), "kd3", [kd3_record(e) for e in (1, 2, 3)], selections=True,
                   teacher=teacher)
    text = write_report(run).read_text()
    assert cell(text, "teacher test accuracy (its checkpoint record)") == "unknown"
    assert cell(text, "teacher validation accuracy (its checkpoint record)") == "62.50%"
    assert "(teacher test accuracy as recorded: unknown)" in text and "nan%" not in text
    # kd3_record's last epoch: 20 predicted per class, 13 / 10 / 37 selected.
    assert per_class_rows(text) == [["coat", "20", "13"], ["bag", "20", "10"], ["shoe", "20", "37"]]
