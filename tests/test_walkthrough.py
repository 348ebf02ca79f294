"""The practitioner's path end to end, as a new user walks it, from the installed package (the
commands run in an empty folder, so nothing comes from the repository's configs/): their own
torchvision ResNet-18 and their own image folders -> `kd3 teacher import` -> `kd3 data ingest` ->
the `recommended` preset by name -> `kd3 export` -> onnxruntime on raw PNG pixels, which must give
`kd3 eval`'s accuracy and carry the class names."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image

CLASSES = ["crimson", "leaf", "sky"]  # one colour channel dominates each class's blob
SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(rng: np.random.Generator, label: int | None) -> np.ndarray:
    """32×32 RGB: dim noise, plus (for a labelled image) a bright square in its class's colour channel."""
    pixels = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    if label is not None:
        y, x, side = rng.integers(0, 16), rng.integers(0, 16), rng.integers(10, 16)
        pixels[y:y + side, x:x + side, label] = rng.integers(180, 256)
    return pixels


def _write_folders(root: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    labelled, crawl = root / "labelled", root / "crawl"
    for label, name in enumerate(CLASSES):
        (labelled / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(_image(rng, label)).save(labelled / name / f"{i}.png")
    crawl.mkdir()
    for i in range(240):  # three quarters of the classes' kind, one quarter junk (noise only)
        label = i % 4 if i % 4 < len(CLASSES) else None
        Image.fromarray(_image(rng, label)).save(crawl / f"{i:03d}.png")
    return labelled, crawl


def _train_teacher(path: Path, rng: np.random.Generator) -> None:
    """A torchvision ResNet-18 trained as a user would (ImageNet normalisation), saved as a plain state dict."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for _ in range(80):
        labels = rng.integers(0, len(CLASSES), 32)
        images = torch.from_numpy(np.stack([_image(rng, int(k)) for k in labels])).permute(0, 3, 1, 2)
        loss = torch.nn.functional.cross_entropy(model((images.float() / 255 - mean) / std), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.eval().state_dict(), path)


def kd3(cwd: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kd3", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"kd3 {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Every step of the README's walkthrough, run in an empty folder; returns what a user has at the end."""
    root = tmp_path_factory.mktemp("walkthrough")
    rng = np.random.default_rng(0)
    labelled, crawl = _write_folders(root, rng)
    _train_teacher(root / "resnet18.pth", rng)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    kd3(root, "teacher", "import", "resnet18.pth", "--arch", "tv:resnet18", "--classes", "classes.txt",
        "--image-size", str(SIZE), "--channels", "3", "--norm", "imagenet", "--out", "teacher.pt")
    kd3(root, "data", "ingest", "crawl", "--size", str(SIZE), "--channels", "3", "--out", "pool", "--workers", "1")
    kd3(root, "distill", "recommended", "teacher.checkpoint=teacher.pt", "pool.path=pool", "eval_data=labelled",
        # A fixed wide budget on this 240-image toy crawl: the preset's budget read off the pool fits its seed on
        # the top max(5 %, 2 × 256 BN-grid features) images, here the whole pool, so it has nothing to compare;
        # and a student of one class cannot show whether the shipped input contract is right (30 %: 68/0/4 per class).
        "method.budget=fixed", "method.favoured_only=false", "method.keep_fraction=0.75", "student=resnet8",
        "train.epochs=3", "train.epoch_steps=10", "train.batch_size=32",
        "progress=false", "output_dir=runs")
    (run_dir,) = (root / "runs").iterdir()
    kd3(root, "export", str(run_dir), "--format", "all")
    return root, run_dir, labelled


def test_the_run_is_named_after_the_pool_and_teacher_used(shipped):
    _, run_dir, _ = shipped
    assert run_dir.name.startswith("recommended-pool-teacher-")


def test_onnx_on_raw_pixels_gives_kd3_evals_accuracy_and_names_the_classes(shipped):
    root, run_dir, labelled = shipped
    table = kd3(root, "eval", str(run_dir / "student.onnx"), "--data", "labelled")
    kd3_accuracy = float(re.search(r"(\d+\.\d+) ± ", table).group(1))

    session = onnxruntime.InferenceSession(str(run_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["mean"]) == pytest.approx(MEAN) and json.loads(meta["std"]) == pytest.approx(STD)
    files = sorted(labelled.rglob("*.png"))
    raw = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])  # uint8 N×3×32×32
    truth = np.array([CLASSES.index(f.parent.name) for f in files])
    logits = session.run(None, {session.get_inputs()[0].name: raw})[0]
    onnx_accuracy = 100 * float((logits.argmax(1) == truth).mean())
    assert abs(onnx_accuracy - kd3_accuracy) <= 0.1
    assert onnx_accuracy > 100 / len(CLASSES) + 20  # the student learned the task: a wrong input contract would not


def test_the_run_measures_the_imported_teacher_on_the_same_eval_data_and_reports_it(shipped):
    """An imported teacher has no accuracy of its own: the run measures it on eval_data, as kd3 eval does."""
    root, run_dir, _ = shipped
    recorded = json.loads((run_dir / "teacher_eval.json").read_text())
    table = kd3(root, "eval", "teacher.pt", "--data", "labelled")
    assert f"{100 * recorded['accuracy']:.2f}" == re.search(r"(\d+\.\d+) ± ", table).group(1)
    assert recorded["images"] == 60 and recorded["eval_data"] == "labelled"
    kd3(root, "report", str(run_dir))
    page = (run_dir / "report" / "report.html").read_text()
    assert "teacher accuracy on the same eval data (labelled, 60 images)" in page
    assert "crimson, leaf, sky" in page and "No selection" not in page


def test_every_shipped_format_gives_the_same_accuracy_through_kd3_eval(shipped):
    root, run_dir, _ = shipped
    accuracies = {name: re.search(r"(\d+\.\d+) ± ", kd3(root, "eval", str(run_dir / name), "--data", "labelled")).group(1)
                  for name in ("student.ts", "student.pt2", "student.onnx")}
    assert len(set(accuracies.values())) == 1, accuracies


def test_the_example_script_ships_an_onnx_student_whose_accuracy_kd3_eval_confirms(shipped):
    """examples/distill_own_model.py at a tiny budget, on the same files the walkthrough used. (A student at
    chance is refused by kd3 rather than shipped, so the script's success also says the student learned.)"""
    root, _, _ = shipped
    example = Path(__file__).resolve().parents[1] / "examples" / "distill_own_model.py"
    done = subprocess.run([sys.executable, str(example), "--teacher", "resnet18.pth", "--arch", "tv:resnet18",
                           "--classes", "classes.txt", "--images", "crawl", "--labelled", "labelled", "--size", str(SIZE),
                           "--out", "example", "--epochs", "3", "--steps", "10", "--batch-size", "32",
                           # as the walkthrough, for its reason
                           "--set", "method.budget=fixed", "--set", "method.favoured_only=false",
                           "--set", "method.keep_fraction=0.75", "--set", "student=resnet8"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    onnx_file, printed = re.match(r"(\S+\.onnx): (\d+\.\d+)% on 60 images of labelled; classes (.*)$", line).groups()[:2]
    assert line.endswith(str(CLASSES))
    table = kd3(root, "eval", onnx_file, "--data", "labelled")
    assert re.search(r"(\d+\.\d+) ± ", table).group(1) == printed
