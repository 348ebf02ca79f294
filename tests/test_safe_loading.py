"""Nothing executes from a file: every loader refuses a planted file whose unpickling would run
code (here: create a marker file), with a message naming the file, and still reads genuine files."""
import os
import pickle

import numpy as np
import pytest
import torch

from kd3.cli import main
from kd3.config import DistillConfig, load_config, save_config
from kd3.data.augment import Normalizer
from kd3.data.pool import Pool
from kd3.data.sources import load_source
from kd3.utils.safe_load import UnsafeFileError
from standins import digits_distill_args, write_cifar10, write_cifar100, write_digits_inputs, write_imagenet32, write_teacher


class RunsCommand:
    """Unpickling this calls os.system: the classic pickle exploit."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    """Unpickling this calls open(marker, 'w'): a builtin, not an obviously dangerous module."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


PAYLOADS = {"os.system": RunsCommand, "open": OpensFile}
REFERENCED = {"os.system": ".system, which", "open": ".open, which"}  # posix.system / io.open / builtins.open


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "unpickling ran the planted payload"


def plant_pickle(path, payload):
    with open(path, "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0]}, f)


def rng():
    return np.random.default_rng(0)


# --- CIFAR / ImageNet32 python batches ------------------------------------------------------------

@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("spec,writer,relative", [
    ("cifar10:train", write_cifar10, "cifar-10-batches-py/data_batch_1"),
    ("cifar10:test", write_cifar10, "cifar-10-batches-py/test_batch"),
    ("cifar100:train", write_cifar100, "cifar-100-python/train"),
    ("imagenet32:train", write_imagenet32, "Imagenet32_train/train_data_batch_1"),
])
def test_planted_batch_is_refused(tmp_path, marker, kind, spec, writer, relative):
    writer(tmp_path / "root", 10, rng())
    planted = tmp_path / "root" / relative
    plant_pickle(planted, PAYLOADS[kind](marker))
    with pytest.raises(UnsafeFileError) as error:
        load_source(spec, root=tmp_path / "root")
    message = str(error.value)
    assert f"refusing to load {planted}" in message and REFERENCED[kind] in message
    assert "never holds" in message and "\n" not in message


@pytest.mark.parametrize("spec,writer,relative", [
    ("cifar10:test", write_cifar10, "cifar-10-batches-py/batches.meta"),
    ("cifar100:test", write_cifar100, "cifar-100-python/meta"),
])
def test_planted_meta_file_is_refused(tmp_path, marker, spec, writer, relative):
    writer(tmp_path / "root", 10, rng())
    planted = tmp_path / "root" / relative
    with open(planted, "wb") as f:
        pickle.dump({b"label_names": [OpensFile(marker)]}, f)
    with pytest.raises(UnsafeFileError, match="CIFAR meta file never holds"):
        load_source(spec, root=tmp_path / "root")


def test_planted_npz_batch_is_refused(tmp_path, marker):
    write_imagenet32(tmp_path / "root", 10, rng(), npz=True)
    planted = tmp_path / "root" / "Imagenet32_train" / "val_data.npz"
    np.savez(planted, data=np.array([RunsCommand(marker)], dtype=object), labels=np.zeros(1))
    with pytest.raises(UnsafeFileError, match=r"array 'data' holds pickled Python objects"):
        load_source("imagenet32:test", root=tmp_path / "root")


def test_a_pickle_that_is_not_a_dict_is_refused(tmp_path):
    write_cifar10(tmp_path / "root", 10, rng())
    with open(tmp_path / "root" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(UnsafeFileError, match="holds a list, not the dict"):
        load_source("cifar10:test", root=tmp_path / "root")


# numpy 1's names are swapped in only where the protocol spells globals as newline-ended text.
@pytest.mark.parametrize("protocol,numpy_1_names", [(0, False), (0, True), (2, False), (2, True), (4, False), (5, False)])
def test_genuine_batches_load_under_every_protocol(tmp_path, protocol, numpy_1_names):
    """The original CIFAR files are Python-2 protocol-2 pickles made by numpy 1 (numpy.core...),
    ImageNet32's Python-3 ones; every protocol and both numpy spellings must still load."""
    from kd3.data.formats import read_planar_batches

    data = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    raw = pickle.dumps({"data": data, "labels": [3, 4], "mean": np.float32(0.5)}, protocol=protocol)
    if numpy_1_names:
        raw = raw.replace(b"numpy._core", b"numpy.core")
        assert b"numpy.core.multiarray" in raw
    (tmp_path / "batch").write_bytes(raw)
    images, labels = read_planar_batches([tmp_path / "batch"], "labels")
    assert images.shape == (2, 3, 32, 32) and np.array_equal(images.reshape(2, 3072), data)
    assert labels.tolist() == [3, 4]


def test_genuine_standins_still_load(tmp_path):
    write_cifar10(tmp_path / "c10", 10, rng())
    write_cifar100(tmp_path / "c100", 10, rng())
    write_imagenet32(tmp_path / "i32", 10, rng())
    write_imagenet32(tmp_path / "i32npz", 10, rng(), npz=True)
    c10 = load_source("cifar10:train", root=tmp_path / "c10")
    assert c10.images.shape == (50, 3, 32, 32) and c10.classes[:2] == ["c0", "c1"]
    assert (c10.images[:, 0] == 200).all() and (c10.images[:, 1] == 100).all()  # planes decoded in order
    c100 = load_source("cifar100:test", root=tmp_path / "c100")
    assert len(c100) == 10 and c100.classes[99] == "f99"
    for root in ("i32", "i32npz"):
        i32 = load_source("imagenet32:train", root=tmp_path / root)
        assert len(i32) == 100 and int(i32.labels.min()) == 0 and int(i32.labels.max()) == 999


# --- kd3's own .pt files ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PAYLOADS)
def test_planted_teacher_checkpoint_is_refused(tmp_path, marker, kind):
    from kd3.teacher import load_teacher

    planted = tmp_path / "teacher.pt"
    torch.save({"kd3_teacher": 1, "info": PAYLOADS[kind](marker), "state_dict": {}}, planted)
    with pytest.raises(UnsafeFileError) as error:
        load_teacher(planted)
    message = str(error.value)
    assert f"refusing to load {planted}" in message and REFERENCED[kind] in message
    assert "kd3 teacher checkpoint" in message and "\n" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_plain_pickle_posing_as_a_teacher_is_refused(tmp_path, marker):
    from kd3.teacher import load_teacher

    planted = tmp_path / "teacher.pt"
    plant_pickle(planted, OpensFile(marker))  # not torch's zip format: torch's legacy path
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        load_teacher(planted)


def test_genuine_teacher_loads(tmp_path):
    from kd3.teacher import load_teacher

    net, info = load_teacher(write_teacher(tmp_path / "t.pt"))
    assert info.arch == "lenet5_half_bn" and info.num_classes == 10 and len(info.sha256) == 64


def test_planted_score_cache_is_refused_and_a_genuine_one_reused(tmp_path, marker):
    from kd3.scores.cache import cache_key, cache_path, cached_teacher_outputs
    from kd3.teacher import load_teacher

    teacher, info = load_teacher(write_teacher(tmp_path / "t.pt"))
    pool = Pool.unlabelled(load_source("uci-digits:test").images[:40], origin="test")
    normalize = Normalizer(tuple(info.mean), tuple(info.std))
    first = cached_teacher_outputs(pool, teacher, normalize, tmp_path / "cache")
    path = cache_path(cache_key(pool, teacher, normalize), tmp_path / "cache")
    stamp = path.stat().st_mtime_ns
    again = cached_teacher_outputs(pool, teacher, normalize, tmp_path / "cache")
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.logits, first.logits)  # read, not recomputed
    torch.save({"key": RunsCommand(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*kd3 score cache"):
        cached_teacher_outputs(pool, teacher, normalize, tmp_path / "cache")


@pytest.fixture
def digits_run(tmp_path):
    """A distil config on UCI digits with an untrained teacher and a file pool: builds in seconds."""
    write_digits_inputs(tmp_path)
    config, *overrides = digits_distill_args(tmp_path)[1:]
    cfg = load_config(DistillConfig, config, overrides)
    run_dir = tmp_path / "runs" / "planted"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def test_planted_run_checkpoint_is_refused_on_resume(digits_run, marker, capsys):
    torch.save({"epoch": 1, "method": RunsCommand(marker)}, digits_run / "last.pt")
    assert main(["distill", "--resume", str(digits_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd3 distill: error: refusing to load") and "last.pt" in err
    assert "system" in err and "kd3 run checkpoint" in err and len(err.splitlines()) == 1


# --- pools -----------------------------------------------------------------------------------------

def test_planted_pool_npz_is_refused(tmp_path, marker):
    planted = tmp_path / "pool.npz"
    np.savez(planted, images=np.zeros((2, 1, 8, 8), np.uint8), source=np.array([OpensFile(marker)] * 2, dtype=object),
             style=np.array(["none"] * 2), relevant=np.zeros(2, bool), true_label=np.zeros(2, np.int64),
             meta=np.array("{}"))
    with pytest.raises(UnsafeFileError, match=f"refusing to load {planted}: array 'source' holds pickled Python objects, "
                                              "which a kd3 pool never holds"):
        Pool.load(planted)


def test_planted_pool_directory_array_is_refused(tmp_path, marker):
    Pool.unlabelled(load_source("uci-digits:test").images[:3], origin="folder").save(tmp_path / "pool")
    np.save(tmp_path / "pool" / "style.npy", np.array([RunsCommand(marker)] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError, match=r"style\.npy: it holds pickled Python objects, which a kd3 pool never holds"):
        Pool.load(tmp_path / "pool")


def test_genuine_pool_round_trips(tmp_path):
    images = load_source("uci-digits:test").images[:5]
    Pool.unlabelled(images, origin="folder").save(tmp_path / "pool.npz")
    loaded = Pool.load(tmp_path / "pool.npz")
    assert torch.equal(loaded.images[:], images) and loaded.source.tolist() == ["folder"] * 5


# --- through the command line ----------------------------------------------------------------------

def test_cli_eval_on_a_planted_cifar_root_prints_one_line_and_exits_2(tmp_path, marker, monkeypatch, capsys):
    write_cifar10(tmp_path / "root", 10, rng())
    plant_pickle(tmp_path / "root" / "cifar-10-batches-py" / "test_batch", RunsCommand(marker))
    monkeypatch.setenv("KD3_DATA_ROOT", str(tmp_path / "root"))
    teacher = write_teacher(tmp_path / "t.pt", arch="lenet5_half_bn", in_channels=3, image_size=32)
    assert main(["eval", str(teacher), "--data", "cifar10:test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("kd3 eval: error: refusing to load ") and "test_batch: it references posix.system" in err
    assert "the file is not a genuine CIFAR / ImageNet32 batch" in err
