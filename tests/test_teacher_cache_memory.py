"""Teacher caches on disk (issue 24, part 2): training bit-identical to the caches held in RAM, memory
that does not grow with the pool, files that never outlive the run, and one-buffer gathers."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from baseline_nets import make_context, snapshot, train_epochs
from helpers import TinyNet, blobs
from kd3.engine import distributed
from kd3.methods import teacher_outputs, view_cache
from kd3.methods.base import get_method
from kd3.methods.kd3 import KD3, KD3Options, teacher_targets
from kd3.methods.view_cache import CACHE_FOLDER, ViewStore, build_view_cache
from test_kd3_method import GapNet, confident, make_ctx


class RamCache:
    """What the caches were before issue 24: the whole N × K tensor in RAM, gathered by ``map_rows``."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def read(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.tensor[rows, views]


def ram_view_cache(num_rows, num_views, batch_size, cache_dir, compute, batches=None):
    return [RamCache(t) for t in distributed.map_rows(num_rows, batch_size, compute, batches)]


def use_ram_caches(monkeypatch) -> None:
    monkeypatch.setattr(teacher_outputs, "build_view_cache", ram_view_cache)
    monkeypatch.setattr(teacher_targets, "build_view_cache", ram_view_cache)


RUNS = [("blind_kd", {"teacher_views": 4}),
        ("dfnd", {"teacher_views": 4, "score": "bn_grid_maha", "keep_fraction": 0.5}),  # the recommended recipe
        ("kd3", {"teacher_views": 3}),
        ("kd3", {"teacher_views": 2, "sharing": "pooled"})]


def tiny_run(name: str, options: dict, cache: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """(initial weights, weights after 2 epochs of 5 steps, the method) of one small run."""
    torch.manual_seed(0)
    if name == "kd3":
        ctx = make_ctx(confident(GapNet(8)))
        ctx.cache_dir = cache
        method = KD3(GapNet(4), ctx, KD3Options(**options))
    else:
        images, _ = blobs(96)
        ctx = make_context(TinyNet(channels=4), images, batch_size=16, epochs=2, cache_dir=cache)
        cls = get_method(name)
        method = cls(TinyNet(channels=2), ctx, cls.Options(**options))
    initial = snapshot(method)
    train_epochs(method, epochs=2, max_steps=5)
    return initial, snapshot(method), method


def caches_of(method) -> list:
    if isinstance(method, KD3):
        return [method.targets.maps, method.targets.logits]
    holder = getattr(method, "teacher_logits", None) or method._teacher_logits
    return [holder.cache]


@pytest.mark.parametrize("name,options", RUNS, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in RUNS])
def test_disk_caches_train_bit_identically_to_ram_caches(name, options, tmp_path, monkeypatch):
    _, on_disk, method = tiny_run(name, options, tmp_path)
    assert all(isinstance(cache, ViewStore) for cache in caches_of(method))
    with monkeypatch.context() as patch:
        use_ram_caches(patch)
        initial, in_ram, reference = tiny_run(name, options, tmp_path)
    assert all(isinstance(cache, RamCache) for cache in caches_of(reference))
    assert on_disk.keys() == in_ram.keys()
    assert any(not torch.equal(initial[k], in_ram[k]) for k in initial)  # it trained: the comparison means something
    for key in on_disk:
        assert on_disk[key].dtype == in_ram[key].dtype and torch.equal(on_disk[key], in_ram[key]), key
    # Same dtypes as the RAM caches had: fp16 feature maps, fp32 logits.
    for disk, ram in zip(caches_of(method), caches_of(reference)):
        assert disk.dtype == ram.tensor.dtype and disk.shape == ram.tensor.shape
    assert list((tmp_path / CACHE_FOLDER).iterdir()) == []  # the files were unlinked once open


def test_view_store_reads_exactly_what_was_computed(tmp_path):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(37, 3, 2, 5, 5, generator=generator).half()
    logits = torch.randn(37, 3, 10, generator=generator)

    def compute(start: int, stop: int) -> list[torch.Tensor]:
        return [maps[start:stop], logits[start:stop]]

    starts_seen: list[int] = []
    stores = build_view_cache(37, 3, 8, tmp_path, compute, lambda starts: (starts_seen.append(s) or s for s in starts))
    assert starts_seen == [0, 8, 16, 24, 32]
    rows = torch.randint(0, 37, (50,), generator=generator)
    views = torch.randint(0, 3, (50,), generator=generator)
    for store, full in zip(stores, (maps, logits)):
        assert store.shape == full.shape and store.dtype == full.dtype and store.nbytes == full.numel() * full.element_size()
        read = store.read(rows, views)
        assert read.dtype == full.dtype and torch.equal(read, full[rows, views])
        assert store.read(rows[:0], views[:0]).shape == (0, *full.shape[2:])
    with pytest.raises(IndexError, match="outside the cache's 37 × 3"):
        stores[0].read(torch.tensor([37]), torch.tensor([0]))
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(stores[0], tmp_path / "store.pt")
    assert list((tmp_path / CACHE_FOLDER).iterdir()) == []


def test_a_killed_runs_file_is_removed_and_a_live_ones_kept(tmp_path):
    folder = tmp_path / CACHE_FOLDER
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = folder / f".views-0.bin.{gone.pid}.tmp"
    live = folder / f".views-1.bin.{os.getppid()}.tmp"
    other = folder / "notes.txt"
    for path in (dead, live, other):
        path.write_bytes(b"x" * 10)
    build_view_cache(4, 1, 2, tmp_path, lambda a, b: [torch.zeros(b - a, 1, 3)])
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, other.name])


def test_a_full_disk_is_one_line_naming_the_folder_and_the_way_out(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(view_cache.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"has no room for 0\.00 GB; .*teacher_views: 0") as caught:
        build_view_cache(4, 2, 2, tmp_path, lambda a, b: [torch.zeros(b - a, 2, 3)])
    assert str(tmp_path / CACHE_FOLDER) in str(caught.value) and "\n" not in str(caught.value)
    assert list((tmp_path / CACHE_FOLDER).iterdir()) == []


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the kd3 cache should be")
    with pytest.raises(OSError, match=r"cannot write in .*cache/teacher-views \(Not a directory\); .*KD3_CACHE") as caught:
        build_view_cache(4, 2, 2, not_a_folder, lambda a, b: [torch.zeros(b - a, 2, 3)])
    assert "\n" not in str(caught.value)


# -- memory --------------------------------------------------------------------------------------

_MEASURE = """
import json, sys
from pathlib import Path
import torch
from kd3.methods.view_cache import build_view_cache

def anon_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

n, ram = int(sys.argv[1]), sys.argv[2] == "ram"
torch.set_num_threads(1)
# 8 views of a 16×4×4 fp16 map and 10 fp32 logits: 4.4 KB per image, as KD³'s cache of a small teacher.
compute = lambda a, b: [torch.ones(b - a, 8, 16, 4, 4, dtype=torch.float16), torch.ones(b - a, 8, 10)]
build_view_cache(8, 8, 8, Path(sys.argv[3]), compute)  # warm-up: imports, first allocations
before = anon_kb()
if ram:
    from kd3.engine.distributed import map_rows
    stores = map_rows(n, 256, compute)
else:
    stores = build_view_cache(n, 8, 256, Path(sys.argv[3]), compute)
    for _ in range(4):  # read an epoch's worth of batches
        for start in range(0, n, 256):
            rows = torch.arange(start, min(start + 256, n))
            [s.read(rows, rows % 8) for s in stores]
print(json.dumps({"grew_kb": anon_kb() - before, "cache_kb": sum(s.nbytes for s in stores) // 1024}))
"""


def _anonymous_growth(n: int, mode: str, cache: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(n), mode, str(cache)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_caches_resident_memory_does_not_grow_with_the_pool(tmp_path):
    """Anonymous resident memory (RssAnon: what is the process's own, not the shared page cache) after
    building and reading the cache: at 2k and 20k images the growth is the same few MB of batch
    buffers, while the cache itself is 10× larger at 20k (88 MB), and held in RAM it shows in full."""
    small, large = (_anonymous_growth(n, "disk", tmp_path) for n in (2_000, 20_000))
    assert large["cache_kb"] > 80_000 and small["cache_kb"] * 10 == large["cache_kb"]
    assert large["grew_kb"] < 16_000 and large["grew_kb"] - small["grew_kb"] < 8_000, (small, large)
    in_ram = _anonymous_growth(20_000, "ram", tmp_path)
    assert in_ram["grew_kb"] > 0.9 * in_ram["cache_kb"]  # the measurement sees a cache held in RAM


# -- two processes -------------------------------------------------------------------------------

def _two_ranks(rank: int, init_file: str, cache: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = {}
        # Uneven shards (4 + 3 rows), several dtypes; and 1 row over 2 ranks (rank 1's shard is empty).
        out["rows"] = [t.tolist() for t in distributed.map_rows(
            7, 2, lambda a, b: [torch.arange(a, b) * 10, torch.arange(a, b).half().view(-1, 1).repeat(1, 2)])]
        out["one"] = [t.tolist() for t in distributed.map_rows(1, 4, lambda a, b: [torch.arange(a, b) + 5])]
        # The real caches, built over the ranks into shared files, against the RAM caches gathered as before.
        torch.manual_seed(0)
        images, _ = blobs(21)
        ctx = make_context(TinyNet(channels=4), images, batch_size=4, cache_dir=Path(cache))
        logits = teacher_outputs.TeacherLogits(ctx, 3)
        kd3_ctx = make_ctx(confident(GapNet(8)), pool_size=21)
        kd3_ctx.cache_dir = Path(cache)
        targets = teacher_targets.TeacherTargets(kd3_ctx, 2, (8, 4, 4), max_gb=1.0)
        targets._fill_cache()
        disk = [logits._fill_cache(), targets.maps, targets.logits]
        teacher_outputs.build_view_cache = teacher_targets.build_view_cache = ram_view_cache
        targets._fill_cache()
        ram = [logits._fill_cache(), targets.maps, targets.logits]
        rows = torch.arange(21).repeat_interleave(3)
        views = torch.arange(3).repeat(21)
        out["same"] = []
        for d, r in zip(disk, ram):
            v = views % d.num_views
            out["same"].append(d.dtype == r.tensor.dtype and torch.equal(d.read(rows, v), r.read(rows, v)))
        out["files"] = sorted(p.name for p in (Path(cache) / CACHE_FOLDER).iterdir())
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_into_one_buffer_and_share_one_cache_file(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "cache"), results), nprocs=2)
    for rank in (0, 1):
        out = results[rank]
        assert out["rows"] == [[0, 10, 20, 30, 40, 50, 60], [[float(i)] * 2 for i in range(7)]]
        assert out["one"] == [[5]]
        assert out["same"] == [True, True, True]
        assert out["files"] == []


# -- whole runs under torchrun -------------------------------------------------------------------

_RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from kd3 import api
from kd3.config import DistillConfig, load_config
from kd3.engine import distributed
from kd3.methods import teacher_outputs
from kd3.methods.kd3 import teacher_targets
from test_teacher_cache_memory import ram_view_cache

where, config, *overrides = sys.argv[1:]
if where == "ram":
    teacher_outputs.build_view_cache = teacher_targets.build_view_cache = ram_view_cache
try:
    api.distill(load_config(DistillConfig, config, overrides))
finally:
    distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/digits-wild/kd3.yaml", "configs/digits-wild/recommended.yaml"])
def test_two_process_runs_with_disk_caches_end_with_the_weights_of_ram_caches(config, tmp_path_factory):
    """A real ``kd3 distill`` on 2 processes (torchrun, gloo), presets with ``teacher_views: 8``: the student
    and every other trained weight are bit-identical whether the caches live on disk or in RAM."""
    from tiny_runs import REPO, write_inputs

    root = tmp_path_factory.getbasetemp() / "two-process-inputs"
    if not (root / "teacher.pt").is_file():
        root.mkdir(exist_ok=True)
        write_inputs(root)
    runner = root / "runner.py"
    runner.write_text(_RUNNER.format(tests=str(Path(__file__).parent)))
    states = {}
    for where in ("disk", "ram"):
        out = tmp_path_factory.mktemp(where)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(runner), where,
             str(REPO / config), f"teacher.checkpoint={root / 'teacher.pt'}", "teacher.recipe=", "pool.name=file",
             f"pool.path={root / 'pool.npz'}", "eval_data=", "train.epochs=2", "train.batch_size=32",
             "train.epoch_steps=4", "train.threads=1", "progress=false", f"output_dir={out}"],
            capture_output=True, text=True, timeout=600, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "KD3_CACHE": str(root / "cache")})
        assert done.returncode == 0, done.stderr[-3000:]
        (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
        states[where] = torch.load(run_dir / "last.pt", weights_only=True)["method"]
    assert states["disk"].keys() == states["ram"].keys() and any(k.startswith("student.") for k in states["disk"])
    for key, value in states["disk"].items():
        assert value.dtype == states["ram"][key].dtype and torch.equal(value, states["ram"][key]), key
    assert list((root / "cache" / CACHE_FOLDER).iterdir()) == []


# -- kd3 bench scale: the presets' section -----------------------------------------------------------

def test_the_presets_section_sums_the_ranks_and_replaces_only_itself(tmp_path):
    from kd3.bench.scale import PRESETS_HEADING, _is_rank, presets_section, splice_section

    assert _is_rank("/venv/bin/python -u -m kd3 distill configs/fashion-wild/kd3.yaml")
    assert not _is_rank("/venv/bin/python -m torch.distributed.run --nproc_per_node=2 -m kd3 distill x.yaml")
    row = {"size": 50_000, "preset": "kd3", "nproc": 2, "steps": 40, "plan_s": 1.0, "epoch_s": 2.0, "wall_s": 3.0,
           "rank_peak_rss_mb": [1500.0, 1400.0], "all_ranks_peak_rss_mb": 2900.0, "launcher_peak_rss_mb": 700.0}
    stamp = {"command": "kd3 bench scale --presets", "commit": "abc1234+dirty", "machine": "2 cores", "wall_s": 60}
    section = presets_section([row], [stamp])
    assert "| 50,000 | kd3 | 2 | 1.0 | 2.0 | 3 | 1,500 | 2,900 | 700 |" in section
    assert any("uncommitted tree at HEAD abc1234" in line for line in section)
    markdown = tmp_path / "scale.md"
    markdown.write_text(f"# scale\n\n## Before\nkept\n\n{PRESETS_HEADING}\n\nold rows\n\n## After\nkept too\n")
    splice_section(markdown, section)
    text = markdown.read_text()
    assert "old rows" not in text and text.count(PRESETS_HEADING) == 1
    assert text.index("## Before\nkept") < text.index(PRESETS_HEADING) < text.index("## After\nkept too")
