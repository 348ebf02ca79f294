"""A student you can ship: every exported file (student.ts, student.pt2, student.onnx) takes raw
uint8 images and normalises inside, carries kd3's metadata, and `kd3 eval` reads every format
(kd3 issue 21: the exported student.ts used to carry no normalisation)."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kd3
from kd3 import api
from kd3.cli import main
from kd3.data.pool import Pool
from kd3.data.sources import DIGIT_CLASSES, load_source
from kd3.engine.evaluate import evaluate
from kd3.engine.export import INPUT_FORMAT, META_NAME, ShippedClassifier, export_torchscript, load_torchscript
from kd3.export_cli import export
from kd3.models import create_model
from kd3.shipped import load_model_file
from kd3.teacher import TeacherInfo, load_teacher, read_teacher_info, save_teacher
from tiny_runs import only_run

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
FILES = ("student.ts", "student.pt2", "student.onnx")
MEAN, STD = (0.3,), (0.2,)  # not the data's own statistics: a file that forgot them cannot pass
MEAN3, STD3 = (0.3, 0.45, 0.6), (0.2, 0.25, 0.3)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """The reference preprocessing, written out: /255, then per channel (x - mean) / std."""
    return (images.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def save_digits_teacher(path: Path, images: torch.Tensor, labels: torch.Tensor, mean, std, steps: int) -> None:
    """A lenet5_half_bn teacher trained ``steps`` Adam steps on ``images`` normalised with mean/std."""
    torch.manual_seed(0)
    channels = images.shape[1]
    net = create_model("lenet5_half_bn", num_classes=10, in_channels=channels, image_size=28)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(net(normalise(images[batch], mean, std)), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(normalise(images, mean, std)).argmax(1) == labels).float().mean().item()
    info = TeacherInfo(arch="lenet5_half_bn", num_classes=10, in_channels=channels, image_size=28,
                       classes=list(DIGIT_CLASSES), mean=list(mean), std=list(std), data="uci-digits:train",
                       test_accuracy=accuracy, val_accuracy=accuracy)
    save_teacher(path, net, info)


def distill(root: Path, *overrides: str) -> Path:
    """A real `kd3 distill` (blind KD, file pool): the delivery path that writes the student files."""
    args = ["distill", str(REPO / "configs/digits-wild/blind_kd.yaml"), f"teacher.checkpoint={root / 'teacher.pt'}",
            "teacher.recipe=", "pool.name=file", f"pool.path={root / 'pool.npz'}", "train.batch_size=64",
            "progress=false", f"output_dir={root / 'runs'}", *overrides]
    assert main(args) == 0
    return only_run(root / "runs")


def eager_student(run_dir: Path, channels: int) -> torch.nn.Module:
    """The trained student as an eager Net, read from the run's checkpoint (not from any exported file)."""
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["method"]
    net = create_model("lenet5_half_bn", num_classes=10, in_channels=channels, image_size=28)
    net.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    return net.eval()


def tinted(images: torch.Tensor) -> torch.Tensor:
    """Grey digits as RGB whose three planes differ (R = x, G = 0.6 x, B = 255 - x): a swapped or
    shared channel statistic changes the logits."""
    x = images.float()
    return torch.cat([x, 0.6 * x, 255 - x], dim=1).round().to(torch.uint8)


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """A 1×28×28 digits run: a trained teacher (mean 0.3, std 0.2), a 2-epoch blind-KD student."""
    root = tmp_path_factory.mktemp("grey")
    train = load_source("uci-digits:train")
    save_digits_teacher(root / "teacher.pt", train.images, train.labels, MEAN, STD, steps=250)
    Pool.unlabelled(train.images, origin="folder").save(root / "pool.npz")
    run_dir = distill(root, "eval_data=uci-digits:test", "train.epochs=2")
    return SimpleNamespace(root=root, run=run_dir, test=load_source("uci-digits:test"), net=eager_student(run_dir, 1))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A 3×28×28 run (untrained teacher with three distinct channel statistics, one epoch)."""
    root = tmp_path_factory.mktemp("rgb")
    train, test = load_source("uci-digits:train"), load_source("uci-digits:test")
    save_digits_teacher(root / "teacher.pt", tinted(train.images), train.labels, MEAN3, STD3, steps=0)
    Pool.unlabelled(tinted(train.images[:256]), origin="folder").save(root / "pool.npz")
    run_dir = distill(root, "eval_data=", "train.epochs=1", "train.epoch_steps=4")
    np.savez(root / "test.npz", images=tinted(test.images).numpy(), labels=test.labels.numpy())
    return SimpleNamespace(root=root, run=run_dir, images=tinted(test.images), labels=test.labels,
                           net=eager_student(run_dir, 3))


def test_delivery_writes_every_format_whole(grey):
    names = {p.name for p in grey.run.iterdir()}
    assert set(FILES) <= names
    assert not [n for n in names if n.endswith(".tmp")]  # no temp file left behind


@pytest.mark.parametrize("run", ["grey", "rgb"])
def test_every_file_on_raw_uint8_equals_normalise_then_net(run, request):
    case = request.getfixturevalue(run)
    mean, std = (MEAN, STD) if run == "grey" else (MEAN3, STD3)
    images = case.test.images[:37] if run == "grey" else case.images[:37]
    with torch.no_grad():
        expected = case.net(normalise(images, mean, std))
    for name in FILES:
        model = load_model_file(case.run / name)
        for batch in (images, images[:1]):  # the batch dimension is free in every format
            assert torch.allclose(model.predict(batch), expected[:len(batch)], atol=1e-4), name


def test_same_accuracy_from_every_format_and_kd3_eval(grey, capsys):
    with torch.no_grad():
        logits = grey.net(normalise(grey.test.images, MEAN, STD))
    accuracy = (logits.argmax(1) == grey.test.labels).float().mean().item()
    assert accuracy > 0.6  # a trained student: "identical accuracy" below is no coincidence of chance
    logged = json.loads((grey.run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert accuracy == pytest.approx(logged, abs=1e-6)  # what training measured
    for target in (grey.run, *(grey.run / name for name in FILES)):
        result = api.evaluate_file(target, "uci-digits:test", "cpu")
        assert result.count == len(grey.test.labels)
        assert result.accuracy == pytest.approx(accuracy, abs=1e-9), target
        assert result.loss == pytest.approx(F.cross_entropy(logits, grey.test.labels).item(), abs=1e-4)
        capsys.readouterr()
        assert main(["eval", str(target), "--data", "uci-digits:test"]) == 0
        assert f"{100 * accuracy:.2f} ± " in capsys.readouterr().out


def test_before_the_fix_x_over_255_without_normalisation_was_wrong(grey):
    """The user's report: the old student.ts took normalised floats, and x/255 (the usual
    guess) scored far lower. The same student, fed that way, still does: the file must normalise."""
    with torch.no_grad():
        right = (grey.net(normalise(grey.test.images, MEAN, STD)).argmax(1) == grey.test.labels).float().mean().item()
        guessed = (grey.net(grey.test.images.float() / 255).argmax(1) == grey.test.labels).float().mean().item()
    assert guessed < right - 0.2
    shipped = load_model_file(grey.run / "student.ts").evaluate(grey.test.images, grey.test.labels)
    assert shipped.accuracy == pytest.approx(right, abs=1e-9)


def _onnx_props(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_metadata_of_every_file(grey):
    expected = {"mean": list(MEAN), "std": list(STD), "classes": list(DIGIT_CLASSES), "in_channels": 1, "image_size": 28,
                "input_format": INPUT_FORMAT, "kd3_version": kd3.__version__,
                "teacher_sha256": read_teacher_info(grey.root / "teacher.pt").sha256, "method": "blind_kd"}
    assert len(expected["teacher_sha256"]) == 64
    assert load_torchscript(grey.run / "student.ts")[1] == expected
    extra = {META_NAME: ""}
    torch.export.load(grey.run / "student.pt2", extra_files=extra)
    assert json.loads(extra[META_NAME]) == expected
    props = _onnx_props(grey.run / "student.onnx")
    assert {k: json.loads(props[k]) for k in ("mean", "std", "classes", "in_channels", "image_size")} == {
        k: expected[k] for k in ("mean", "std", "classes", "in_channels", "image_size")}
    assert {k: props[k] for k in ("input_format", "kd3_version", "teacher_sha256", "method")} == {
        k: expected[k] for k in ("input_format", "kd3_version", "teacher_sha256", "method")}
    graph_input = onnx.load(str(grey.run / "student.onnx")).graph.input[0].type.tensor_type
    assert graph_input.elem_type == onnx.TensorProto.UINT8
    assert graph_input.shape.dim[0].dim_param and [d.dim_value for d in graph_input.shape.dim[1:]] == [1, 28, 28]
    for name in FILES:  # the reader gives the same, whatever the format
        model = load_model_file(grey.run / name)
        assert model.meta == expected and model.preprocessing.mean == MEAN and model.preprocessing.classes[3] == "3"


def test_rgb_metadata_and_kd3_eval_on_own_npz(rgb, capsys):
    with torch.no_grad():
        accuracy = (rgb.net(normalise(rgb.images, MEAN3, STD3)).argmax(1) == rgb.labels).float().mean().item()
    for name in FILES:
        model = load_model_file(rgb.run / name)
        assert model.preprocessing.in_channels == 3
        assert model.preprocessing.mean == MEAN3 and model.preprocessing.std == STD3
        assert api.evaluate_file(rgb.run / name, str(rgb.root / "test.npz"), "cpu").accuracy == pytest.approx(accuracy, abs=1e-9)
    assert json.loads(_onnx_props(rgb.run / "student.onnx")["mean"]) == list(MEAN3)
    capsys.readouterr()
    assert main(["eval", str(rgb.run / "student.onnx"), "--data", str(rgb.root / "test.npz")]) == 0
    assert f"{100 * accuracy:.2f} ± " in capsys.readouterr().out


def _legacy_run(grey, tmp_path) -> Path:
    """The run as an older kd3 left it: student.ts traced from the bare student (it took
    normalised floats), metadata without input_format, kd3_version or teacher_sha256."""
    run = tmp_path / "legacy-run"
    shutil.copytree(grey.run, run)
    for name in FILES:
        (run / name).unlink()
    old_meta = {"mean": list(MEAN), "std": list(STD), "classes": list(DIGIT_CLASSES), "in_channels": 1,
                "image_size": 28, "method": "blind_kd"}
    export_torchscript(grey.net, torch.zeros(2, 1, 28, 28), old_meta, run / "student.ts")
    return run


def test_a_legacy_ts_still_evaluates_correctly_and_export_upgrades_it(grey, tmp_path):
    run = _legacy_run(grey, tmp_path)
    reference = api.evaluate_file(grey.run, "uci-digits:test", "cpu")
    assert api.evaluate_file(run, "uci-digits:test", "cpu").accuracy == pytest.approx(reference.accuracy, abs=1e-9)
    with torch.no_grad():
        expected = grey.net(normalise(grey.test.images[:20], MEAN, STD))
    assert torch.allclose(load_model_file(run).predict(grey.test.images[:20]), expected, atol=1e-5)
    # kd3 export writes ONNX to the uint8 contract, and rewrites the legacy student.ts to it
    assert export(run, ("onnx", "torchscript")) == [run / "student.onnx", run / "student.ts"]
    upgraded = load_torchscript(run / "student.ts")
    assert upgraded[1]["input_format"] == INPUT_FORMAT and upgraded[1]["teacher_sha256"] == ""
    with torch.no_grad():
        assert torch.allclose(upgraded[0](grey.test.images[:20]), expected, atol=1e-5)  # uint8 straight in
    assert torch.allclose(load_model_file(run / "student.onnx").predict(grey.test.images[:20]), expected, atol=1e-4)
    with pytest.raises(ValueError, match="student.pt2 does not exist: torch.export needs the trained model"):
        export(run, ("export",))


def test_kd3_export_all_keeps_the_contract(grey, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(grey.run, run)
    (run / "student.onnx").unlink()
    assert main(["export", str(run), "--format", "all"]) == 0
    assert capsys.readouterr().out.split() == ["exported", str(run / "student.ts"), "exported", str(run / "student.pt2"),
                                               "exported", str(run / "student.onnx")]
    with torch.no_grad():
        expected = grey.net(normalise(grey.test.images[:9], MEAN, STD))
    assert torch.allclose(load_model_file(run / "student.onnx").predict(grey.test.images[:9]), expected, atol=1e-4)
    with pytest.raises(ValueError, match="choose from torchscript, export, onnx"):
        export(run, ("tflite",))


def test_delivery_without_onnx_or_torch_export_still_ships_the_torchscript(grey, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator in this model\nsecond line")

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr("kd3.engine.export.onnx_available", lambda: False)
    info = read_teacher_info(grey.root / "teacher.pt")
    method = SimpleNamespace(name="blind_kd", deployable=lambda: grey.net)  # what _deliver hands over
    assert api.export_student(method, info, tmp_path) == [tmp_path / "student.ts"]
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "kd3: note: student.pt2 not written: torch.export cannot convert this model (RuntimeError: unsupported operator "
        "in this model); student.ts is unaffected",
        f"kd3: note: student.onnx not written: the onnx package is missing (pip install 'kd3[onnx]', then "
        f"`kd3 export {tmp_path} --format onnx`)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.ts"]
    with torch.no_grad():
        expected = grey.net(normalise(grey.test.images[:5], MEAN, STD))
    assert torch.allclose(load_model_file(tmp_path / "student.ts").predict(grey.test.images[:5]), expected, atol=1e-5)


def test_teacher_checkpoint_is_normalised_outside(grey):
    model = load_model_file(grey.root / "teacher.pt")
    assert model.kind == "teacher" and model.preprocessing.mean == MEAN
    net, _ = load_teacher(grey.root / "teacher.pt")
    with torch.no_grad():
        expected = net(normalise(grey.test.images[:11], MEAN, STD))
    assert torch.equal(model.predict(grey.test.images[:11]), expected)
    # evaluate() fed normalised floats and the shipped model fed uint8: the same numbers
    direct = evaluate(net, grey.test.images, grey.test.labels, lambda x: normalise(x, MEAN, STD), torch.device("cpu"))
    assert model.evaluate(grey.test.images, grey.test.labels) == direct


def test_foreign_or_garbage_files_are_refused_in_one_line(grey, tmp_path, capsys):
    for suffix in (".ts", ".pt2", ".onnx"):
        garbage = tmp_path / f"garbage{suffix}"
        garbage.write_bytes(b"\x00not a model\xff" * 50)
        with pytest.raises(ValueError, match=f"{garbage} is not "):
            load_model_file(garbage)
    foreign = tmp_path / "foreign.ts"  # valid TorchScript, written by something else: no kd3.json
    torch.jit.save(torch.jit.trace(grey.net, torch.zeros(1, 1, 28, 28)), str(foreign))
    with pytest.raises(ValueError, match=f"{foreign} has no kd3 metadata"):
        load_model_file(foreign)
    foreign_onnx = tmp_path / "foreign.onnx"  # valid ONNX without metadata_props
    proto = onnx.load(str(grey.run / "student.onnx"))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign_onnx))
    with pytest.raises(ValueError, match=f"{foreign_onnx} has no kd3 metadata"):
        load_model_file(foreign_onnx)
    assert capsys.readouterr().err == ""  # nothing printed on the way (torch.export.load logs a traceback unless told not to)
    assert main(["eval", str(tmp_path / "garbage.onnx"), "--data", "uci-digits:test"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"kd3 eval: error: {tmp_path / 'garbage.onnx'} is not an ONNX model")


def test_the_pt2_follows_its_input_to_another_device(grey):
    """A torch.export graph asserts the device it was exported on (the CPU); kd3 eval --device cuda
    must not trip on it. The meta device stands in for a GPU here."""
    model = load_model_file(grey.run / "student.pt2")
    logits = model.predict(grey.test.images[:3].to("meta"))
    assert logits.device.type == "meta" and logits.shape == (3, 10)
    assert torch.allclose(model.predict(grey.test.images[:3]), grey.net(normalise(grey.test.images[:3], MEAN, STD)), atol=1e-4)


def test_predict_refuses_normalised_floats(grey):
    model = load_model_file(grey.run / "student.pt2")
    with pytest.raises(ValueError, match=r"takes uint8 images N×1×28×28 \(0-255\), got torch.float32"):
        model.predict(normalise(grey.test.images[:2], MEAN, STD))


def test_the_torchscript_file_refuses_floats_and_wrong_shapes_instead_of_wrong_logits(tmp_path):
    """The habit of feeding x/255 or normalised floats gave 10 % on Fashion-MNIST with a file that took
    anything (issue 21): the .ts now checks its input inside the file, for any runtime that loads it."""
    from kd3.engine.export import shipped_meta
    from kd3.preprocessing import Preprocessing

    preprocessing = Preprocessing(8, 1, (0.3,), (0.2,), ("a", "b"))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    meta = shipped_meta(preprocessing, "blind_kd", "")
    path = export_torchscript(ShippedClassifier(net, preprocessing), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), meta,
                              tmp_path / "student.ts")
    module = torch.jit.load(str(path))
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    expected = net((images.float() / 255 - 0.3) / 0.2)
    assert torch.allclose(module(images), expected, atol=1e-6)
    for wrong, fragment in ((images.float() / 255, "give uint8 images"), (images[:, :, :4], "N x C x H x W")):
        with pytest.raises(Exception, match=fragment):
            module(wrong)
