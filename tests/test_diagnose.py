"""``kd3 data diagnose``: the AUROC it reports, and the files it writes, from a tiny teacher and pool."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from kd3.cli import main
from kd3.data.pool import UNKNOWN_LABEL, Pool
from kd3.diagnose import diagnose
from kd3.diagnose.metrics import auroc, group_aurocs, precision_recall, top_fraction
from kd3.models import create_model
from kd3.scores import DEFAULT_SCORE
from kd3.teacher import TeacherInfo, save_teacher


def test_auroc_matches_sklearn_with_ties_and_its_edge_cases():
    rng = np.random.default_rng(0)
    score, positive = rng.integers(0, 6, 200).astype(float), rng.random(200) < 0.3
    assert auroc(score, positive) == pytest.approx(roc_auc_score(positive, score))
    labels = np.array([False, False, True, True])
    assert auroc(np.array([1.0, 2.0, 3.0, 4.0]), labels) == 1.0
    assert auroc(np.array([4.0, 3.0, 2.0, 1.0]), labels) == 0.0
    assert auroc(np.ones(4), labels) == 0.5
    assert np.isnan(auroc(np.ones(3), np.ones(3, dtype=bool)))


def test_group_aurocs_compare_the_right_images():
    relevant = np.array([True, True, False, False, False])
    source = np.array(["r", "r", "junk-a", "junk-a", "junk-b"])
    style = np.array(["clean", "sketch", "none", "none", "none"])
    score = np.array([0.9, 0.2, 0.1, 0.3, 0.95])
    groups = group_aurocs(score, relevant, source, style)
    assert groups["src:junk-a"] == pytest.approx(0.75)  # {0.9, 0.2} vs {0.1, 0.3}: 3 of 4 pairs
    assert groups["src:junk-b"] == pytest.approx(0.0)  # nothing relevant beats 0.95
    assert groups["style:clean"] == pytest.approx(2 / 3)  # 0.9 vs {0.1, 0.3, 0.95}
    assert groups["style:sketch"] == pytest.approx(1 / 3)
    assert groups["overall"] == pytest.approx(auroc(score, relevant))
    assert not any(k.startswith("rel:") for k in groups)  # one relevant source: the overall column says it
    source[1] = "r2"
    two = group_aurocs(score, relevant, source, style)
    assert two["rel:r"] == pytest.approx(2 / 3) and two["rel:r2"] == pytest.approx(1 / 3)
    kept = top_fraction(score, 0.4)  # floor(0.4 · 5) = 2: images 4 and 0
    assert kept.tolist() == [True, False, False, False, True]
    assert precision_recall(kept, relevant) == (0.5, 0.5)


def tiny_pool(n: int = 48, provenance: bool = True) -> Pool:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    images[: n // 3] //= 4  # dark "relevant" images, so the scores have something to find
    if not provenance:
        return Pool.unlabelled(images, "folder")
    third = n // 3
    source = np.array(["objects"] * third + ["noise"] * third + ["glyphs"] * (n - 2 * third))
    style = np.array(["clean", "sketch"] * (third // 2) + ["none"] * (n - third))
    relevant = source == "objects"
    labels = np.where(relevant, np.arange(n) % 10, UNKNOWN_LABEL).astype(np.int64)
    return Pool(images=images, source=source, style=style, relevant=relevant, true_label=labels,
                meta={"pool": "tiny", "provenance": True})


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("lenet5_half_bn", num_classes=10, in_channels=1, image_size=28).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_teacher(path, net, TeacherInfo(arch="lenet5_half_bn", num_classes=10, in_channels=1, image_size=28,
                                        classes=[f"c{k}" for k in range(10)], mean=[0.3], std=[0.3],
                                        data="synthetic", test_accuracy=0.1, val_accuracy=0.1))
    return path


def test_cli_writes_plots_and_a_summary_with_every_score(tmp_path, teacher_path, monkeypatch, capsys):
    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    pool_file = tiny_pool().save(tmp_path / "tiny.npz")
    out = tmp_path / "diagnosis"
    code = main(["data", "diagnose", str(pool_file), "--teacher", str(teacher_path), "--out", str(out),
                 "--score", "meanrank:max_softmax+feature_norm"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "src:noise" in printed and "bn_mean_all" in printed
    for name in ("predicted_classes", "confidence_entropy", "kept_classes", "score_auroc", "score_by_source"):
        assert (out / f"{name}.png").stat().st_size > 1000
    markdown = (out / "summary.md").read_text()
    first_cells = {line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")}
    for score in ("max_softmax", "energy", "max_logit", "feature_norm", "gradnorm", "bn_kl_early",
                  "bn_meanlogvar_late", "meanrank:max_softmax+feature_norm", f"{DEFAULT_SCORE} (default)"):
        assert score in first_cells
    assert "src:glyphs" in markdown and "style:sketch" in markdown and "P@30%" in markdown
    page = (out / "summary.html").read_text()
    assert all((out / src).is_file() for src in re.findall(r"<img src='([^']+)'", page))
    assert len(list((tmp_path / "cache" / "scores").glob("*.pt"))) == 1  # the teacher pass was cached


def test_a_pool_without_provenance_still_gets_the_teacher_view(tmp_path, teacher_path):
    files = diagnose(tiny_pool(provenance=False), teacher_path, tmp_path / "out", tmp_path / "cache", "folder")
    assert not files.diagnosis.aurocs
    assert [p.name for p in files.images] == ["predicted_classes.png", "confidence_entropy.png", "kept_classes.png"]
    markdown = files.markdown.read_text()
    assert "no provenance" in markdown and "AUROC" not in markdown
    kept = files.diagnosis.kept[files.diagnosis.default_score][0.3]
    assert sum(kept.per_class) == 14 and np.isnan(kept.precision)  # floor(0.3 · 48)
