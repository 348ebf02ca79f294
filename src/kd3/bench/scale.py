"""``kd3 bench scale``: pools of 10k / 100k / 1M 32×32×3 images, built, scored and trained from.

Each size gets a synthetic pool directory made here (smooth random RGB images, written in chunks
through ``ImageWriter``; never committed), then, each in its own process so that its peak RSS is
its own (``os.wait4``): the relevance-score pass (``kd3.scores``, one teacher pass), one epoch of
blind KD and one of KD³ (``kd3 distill``, one thread, teacher run every step, no test set). The
ingest rate of an img2dataset-style shard set is measured with 1 and 2 workers, and blind KD on
the 100k pool with 1 process against 2 (torchrun, gloo). The shipped presets (recommended and KD³,
``teacher_views: 8`` as shipped) run one epoch of capped steps on 1 and 2 processes, with the peak
RSS of each rank, of all ranks summed and of the launcher (``--presets`` runs only these and puts
their section into the existing scale.md). Writes ``results/scale.md``, ``.json``
and ``scale.png`` (epoch time against pool size, with the linear line through the largest pool).

The teacher is an untrained lenet5_bn: the measurements are of time and memory, which do not
depend on what the weights are; no accuracy is reported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIZES = (10_000, 100_000, 1_000_000)
METHODS = ("blind_kd", "kd3")
CONFIGS = {"blind_kd": "configs/fashion-wild/blind_kd.yaml", "kd3": "configs/fashion-wild/kd3.yaml"}
CHUNK = 20_000  # images generated and written at a time while building a pool
INGEST_IMAGES = 20_000
INGEST_PER_SHARD = 1_000


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    output: str
    code: int
    # Every process of the tree seen while polling: pid -> (its VmHWM in MB, its command line).
    processes: dict[int, tuple[float, str]] = field(default_factory=dict)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(c) for c in task.read_text().split()]
            except OSError:
                pass  # exited meanwhile
    return pids


def _high_water_mb(pid: int) -> float:
    """VmHWM: the peak resident memory of this process's own address space. Not ``ru_maxrss``,
    which Linux carries over from the parent at fork/exec, so a child of a big parent looks big."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def measure(command: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``command``; its wall time and the largest peak resident memory among it and its
    children (read from /proc every 0.1 s, so a spike in the last 0.1 s of a process is missed),
    with each process's own peak in ``processes``."""
    started = time.perf_counter()
    peaks: dict[int, float] = {}
    commands: dict[int, str] = {}
    with tempfile.TemporaryFile("w+") as log:
        with subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}) as child:
            while child.poll() is None:
                for pid in _tree(child.pid):
                    peaks[pid] = max(peaks.get(pid, 0.0), _high_water_mb(pid))
                    # Read every time: a child read between its fork and its exec still shows its parent's line.
                    commands[pid] = _command_line(pid) or commands.get(pid, "")
                time.sleep(0.1)
        log.seek(0)
        output = log.read()
    return Measured(time.perf_counter() - started, max(peaks.values(), default=0.0), output, child.returncode,
                    {pid: (peak, commands.get(pid, "")) for pid, peak in peaks.items()})


def build_pool(directory: Path, count: int, seed: int = 0) -> float:
    """A synthetic unlabelled pool of ``count`` 3×32×32 images in ``directory``; returns seconds."""
    from kd3.data.pool import Pool, write_pool_arrays
    from kd3.data.storage import IMAGES_FILE, DiskImages, ImageWriter

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    writer = ImageWriter(directory / IMAGES_FILE, (3, 32, 32))
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        coarse = torch.rand(n, 3, 4, 4, generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
        noise = torch.rand(n, 3, 32, 32, generator=generator) * 0.1
        writer.write(((smooth * 0.9 + noise) * 255).clamp(0, 255).to(torch.uint8))
    images = DiskImages(writer.close())
    pool = Pool.unlabelled(images, origin="synthetic", meta={"size": 32, "channels": 3, "count": count})
    write_pool_arrays(directory, pool._provenance_arrays(), pool.meta)
    return time.perf_counter() - started


def make_teacher(path: Path) -> Path:
    from kd3.models import create_model
    from kd3.teacher import TeacherInfo, save_teacher

    torch.manual_seed(0)
    net = create_model("lenet5_bn", num_classes=10, in_channels=3, image_size=32)
    info = TeacherInfo(arch="lenet5_bn", num_classes=10, in_channels=3, image_size=32,
                       classes=[f"class{i}" for i in range(10)], mean=[0.5] * 3, std=[0.25] * 3,
                       data="none (untrained: the scale bench measures time and memory)",
                       test_accuracy=float("nan"), val_accuracy=float("nan"))
    save_teacher(path, net.eval(), info)
    return path


def score_pass(pool_dir: str, teacher: str) -> None:
    """The relevance-score pass over a pool (what ``kd3 data diagnose`` and selection_score run)."""
    from kd3.data.augment import Normalizer
    from kd3.data.pool import Pool
    from kd3.scores import compute_score, teacher_outputs
    from kd3.teacher import load_teacher

    torch.set_num_threads(1)
    pool = Pool.load(pool_dir)
    net, info = load_teacher(Path(teacher))
    started = time.perf_counter()
    outputs = teacher_outputs(net, pool.images, Normalizer(tuple(info.mean), tuple(info.std)), batch_size=1024)
    score = compute_score("default", outputs)
    print(json.dumps({"score_seconds": time.perf_counter() - started, "scored": len(score)}))


def distill_overrides(pool_dir: Path, teacher: Path, out: Path) -> list[str]:
    return ["pool.name=file", f"pool.path={pool_dir}", f"teacher.checkpoint={teacher}", "teacher.recipe=",
            "eval_data=", "train.epochs=1", "train.epoch_steps=0", "train.threads=1", "method.teacher_views=0",
            "progress=false", f"output_dir={out}"]


# An untrained teacher's confidences clear no class-adaptive threshold, which would leave KD³ an empty
# or a handful-of-images selection depending on chance; a fixed share of the pool (the 30 % best by
# the blended confidence) makes every size train on the same fraction.
METHOD_OVERRIDES = {"blind_kd": [], "kd3": ["method.thresholds=percentile", "method.keep_fraction=0.3"]}


def distill_row(method: str, pool_dir: Path, teacher: Path, out: Path, nproc: int = 1,
                extra: list[str] = ()) -> dict[str, Any]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "kd3"] if nproc > 1 else [sys.executable, "-m", "kd3"]
    measured = measure([*launcher, "distill", CONFIGS[method], *distill_overrides(pool_dir, teacher, out),
                        *METHOD_OVERRIDES[method], *extra])
    if measured.code:
        raise RuntimeError(f"{method} on {pool_dir} failed:\n{measured.output[-3000:]}")
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"method": method, "nproc": nproc, "wall_s": measured.seconds, "peak_rss_mb": measured.peak_rss_mb,
            "epoch_s": record["epoch_time"], "plan_s": record["plan_time"], "train_images": record["train_images"],
            "images_per_s": record["images_per_s"], "selected": record.get("selected")}


# The shipped presets as users run them, teacher_views: 8 included (issue 24): what grows with the pool is
# in their whole-pool passes (the recommended recipe's score pass, KD³'s per-epoch selection) and their
# teacher-view caches, which all run in full in the one epoch measured; only its training steps are capped.
PRESETS = {"recommended": "configs/fashion-wild/recommended.yaml", "kd3": "configs/fashion-wild/kd3.yaml"}
PRESET_STEPS = 40
PRESET_NPROCS = (1, 2)


def _is_rank(command: str) -> bool:
    """A training process: ``python -m kd3 distill`` itself or a worker torchrun started, not torchrun."""
    return "kd3" in command and "distill" in command and "torch.distributed.run" not in command


def preset_row(preset: str, pool_dir: Path, teacher: Path, out: Path, nproc: int,
               steps: int = PRESET_STEPS) -> dict[str, Any]:
    """One epoch of a shipped preset on 1 process or ``nproc`` (torchrun, gloo): wall time and the peak
    RSS of every rank, of all ranks together and of the launcher."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "kd3"] if nproc > 1 else [sys.executable, "-m", "kd3"]
    overrides = ["pool.name=file", f"pool.path={pool_dir}", f"teacher.checkpoint={teacher}", "teacher.recipe=",
                 "eval_data=", "train.epochs=1", f"train.epoch_steps={steps}", "train.threads=1", "progress=false",
                 f"output_dir={out}", *METHOD_OVERRIDES.get(preset, [])]
    # The teacher-view cache files go to this bench's own folder (removed with it), not the user's cache.
    measured = measure([*launcher, "distill", PRESETS[preset], *overrides], env={"KD3_CACHE": str(out / "cache")})
    if measured.code:
        raise RuntimeError(f"{preset} on {pool_dir} ({nproc} process(es)) failed:\n{measured.output[-3000:]}")
    ranks = sorted((peak for peak, command in measured.processes.values() if _is_rank(command)), reverse=True)
    if len(ranks) != nproc:
        raise RuntimeError(f"{preset}: saw {len(ranks)} training processes, expected {nproc}")
    others = [peak for peak, command in measured.processes.values() if not _is_rank(command)]
    (run_dir,) = [d for d in out.iterdir() if d.is_dir() and d.name != "cache"]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"preset": preset, "nproc": nproc, "steps": steps, "wall_s": measured.seconds, "epoch_s": record["epoch_time"],
            "plan_s": record["plan_time"], "train_images": record["train_images"], "rank_peak_rss_mb": ranks,
            "all_ranks_peak_rss_mb": sum(ranks), "launcher_peak_rss_mb": max(others, default=0.0)}


def build_pool_measured(pool_dir: Path, size: int) -> dict[str, Any]:
    """``build_pool`` in its own process; its row of the pool table."""
    built = measure([sys.executable, "-c", f"from kd3.bench.scale import build_pool; "
                     f"from pathlib import Path; print(build_pool(Path({str(pool_dir)!r}), {size}))"])
    if built.code:
        raise RuntimeError(f"building {pool_dir} failed:\n{built.output[-3000:]}")
    return {"size": size, "build_s": float(built.output.strip().splitlines()[-1]), "peak_rss_mb": built.peak_rss_mb,
            "bytes": (pool_dir / "images.npy").stat().st_size}


def preset_rows(work: Path, teacher: Path, size: int, steps: int = PRESET_STEPS, presets: list[str] | None = None,
                say=print) -> list[dict[str, Any]]:
    """The shipped ``presets`` (default: all) on 1 and 2 processes over the pool ``work/pool-SIZE`` (built if missing)."""
    unknown = sorted(set(presets or []) - set(PRESETS))
    if unknown:
        raise ValueError(f"kd3 bench scale --methods {','.join(unknown)}: no such preset; valid: {', '.join(PRESETS)}")
    pool_dir = work / f"pool-{size}"
    if not (pool_dir / "images.npy").is_file():
        say(f"{size}: build the pool")
        build_pool_measured(pool_dir, size)
    rows = []
    for preset in presets or PRESETS:
        for nproc in PRESET_NPROCS:
            say(f"{size}: preset {preset}, {nproc} process(es), one epoch of {steps} steps")
            rows.append({"size": size, **preset_row(preset, pool_dir, teacher, work / f"preset-{size}-{preset}-{nproc}",
                                                    nproc, steps)})
    return rows


PRESETS_HEADING = "## Shipped presets (`teacher_views: 8`), 1 and 2 processes"


def _commit(stamp: dict[str, Any]) -> str:
    commit = str(stamp.get("commit"))
    return f"uncommitted tree at HEAD {commit.removesuffix('+dirty')}" if commit.endswith("+dirty") else commit


def presets_section(rows: list[dict[str, Any]], stamps: list[dict[str, Any]]) -> list[str]:
    """The markdown section of the preset rows, with how they were measured (``stamps``: each command
    that measured some of them, with its commit, machine and wall time)."""
    steps = sorted({r["steps"] for r in rows})
    lines = [PRESETS_HEADING, ""]
    for stamp in stamps:
        lines.append(f"- `{stamp['command']}`: {_commit(stamp)}; {stamp.get('machine')}; "
                     f"{stamp.get('wall_s', 0) / 60:.1f} min wall time")
    lines += ["",
             "`configs/fashion-wild/recommended.yaml` (DFND budget, bn_grid_maha ranking, teacher logits cached on 8 "
             "views of the kept 30 %) and `configs/fashion-wild/kd3.yaml` (teacher feature maps (fp16) and logits cached "
             "on 8 views of the whole pool: 6.7 KB per image; `method.thresholds=percentile`, as above) as shipped, "
             "`teacher_views: 8` included, on the synthetic pools above with the untrained lenet5_bn teacher and student "
             f"lenet5_half_bn: one epoch of {', '.join(map(str, steps))} training steps of 256 images (`train.epochs=1 "
             "train.epoch_steps=N`): every whole-pool pass (score pass, KD³'s selection, the teacher-view cache) runs in "
             "full, only the training steps are capped. One thread per process; 2 processes are `torchrun --standalone "
             "--nproc_per_node=2 -m kd3 distill` (gloo), launched directly. The teacher-view caches are files in the kd3 "
             "cache (`teacher-views/`, unlinked once open) read with `pread`: their pages sit in the kernel's shared, "
             "reclaimable page cache, not in any process's resident memory.", "",
             "Peak RSS is each process's VmHWM (polled from /proc every 0.1 s). *Per rank*: the largest over the ranks; "
             "*all ranks*: the ranks' peaks summed (each at its own moment, so an upper bound of the simultaneous total; "
             "pages of shared libraries count once per rank); *launcher*: torchrun's own process.", "",
             "| pool images | preset | processes | selection/score pass s | epoch s | wall s | peak RSS per rank (MB) | "
             "all ranks (MB) | launcher (MB) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["size"], r["preset"], r["nproc"])):
        launcher = f"{r['launcher_peak_rss_mb']:,.0f}" if r["nproc"] > 1 else "–"
        lines.append(f"| {r['size']:,} | {r['preset']} | {r['nproc']} | {r['plan_s']:.1f} | {r['epoch_s']:.1f} | "
                     f"{r['wall_s']:.0f} | {r['rank_peak_rss_mb'][0]:,.0f} | {r['all_ranks_peak_rss_mb']:,.0f} | {launcher} |")
    return lines


def splice_section(markdown: Path, section: list[str], heading: str = PRESETS_HEADING) -> None:
    """Put ``section`` into ``markdown`` in place of its section under ``heading`` (to the next ``## ``), or at
    the end; the rest of the file is kept."""
    lines = markdown.read_text().splitlines() if markdown.is_file() else []
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [*section, ""]
    else:
        lines += ["", *section]
    markdown.write_text("\n".join(lines).rstrip("\n") + "\n")


def ingest_rates(root: Path) -> dict[str, Any]:
    """Ingest of an img2dataset-style shard set with 1 and 2 workers, and the same images from a folder."""
    from kd3.data.ingest import ingest
    from kd3.data.synthetic import write_crawl

    pattern, folder = write_crawl(root / "crawl", INGEST_IMAGES, INGEST_PER_SHARD, size=64)
    rows: dict[str, Any] = {"images": INGEST_IMAGES, "shards": INGEST_IMAGES // INGEST_PER_SHARD}
    for workers in (1, 2):
        pool, report = ingest(pattern, 32, 3, out=root / f"shards-{workers}", workers=workers)
        rows[f"shards_{workers}_workers_images_per_s"] = report.images_per_second
        rows[f"shards_{workers}_digest"] = pool.digest()
    pool, report = ingest(folder, 32, 3, out=root / "folder", workers=2)
    rows["folder_2_workers_images_per_s"] = report.images_per_second
    rows["folder_digest"] = pool.digest()
    rows["identical"] = len({rows["shards_1_digest"], rows["shards_2_digest"], rows["folder_digest"]}) == 1
    rows["speedup"] = rows["shards_2_workers_images_per_s"] / rows["shards_1_workers_images_per_s"]
    return rows


@dataclass
class ScaleResults:
    pools: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    presets: list[dict[str, Any]] = field(default_factory=list)
    ingest: dict[str, Any] = field(default_factory=dict)
    stamp: dict[str, Any] = field(default_factory=dict)


def run_scale(work: Path, sizes: tuple[int, ...] = SIZES, say=print) -> ScaleResults:
    results = ScaleResults()
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(work / "teacher.pt")
    say("ingest: 1 vs 2 workers")
    results.ingest = ingest_rates(work / "ingest")
    for size in sizes:
        pool_dir = work / f"pool-{size}"
        say(f"{size}: build the pool")
        results.pools.append(build_pool_measured(pool_dir, size))
        say(f"{size}: score pass")
        scored = measure([sys.executable, "-c", f"from kd3.bench.scale import score_pass; "
                          f"score_pass({str(pool_dir)!r}, {str(teacher)!r})"])
        if scored.code:
            raise RuntimeError(f"score pass on {pool_dir} failed:\n{scored.output[-3000:]}")
        results.scores.append({"size": size, "peak_rss_mb": scored.peak_rss_mb, "wall_s": scored.seconds,
                               **json.loads(scored.output.strip().splitlines()[-1])})
        for method in METHODS:
            say(f"{size}: {method}, one epoch")
            results.runs.append({"size": size, **distill_row(method, pool_dir, teacher, work / f"runs-{size}-{method}")})
        results.presets += preset_rows(work, teacher, size, say=say)
    middle = sizes[len(sizes) // 2]
    for nproc in (1, 2):
        say(f"{middle}: blind_kd on {nproc} process(es)")
        results.processes.append({"size": middle, **distill_row("blind_kd", work / f"pool-{middle}", teacher,
                                                                work / f"procs-{nproc}", nproc=nproc)})
    return results


def _linearity(runs: list[dict[str, Any]], method: str, key: str, per: str) -> dict[int, float]:
    """Seconds per image (``key`` / ``per``) at each size, relative to the largest size's."""
    rows = sorted((r for r in runs if r["method"] == method), key=lambda r: r["size"])
    base = rows[-1][key] / rows[-1][per]
    return {r["size"]: (r[key] / r[per]) / base for r in rows}


def write_report(results: ScaleResults, out_dir: Path, command: str) -> list[Path]:
    """results/scale.md, .json and .png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = results.runs
    stamp = results.stamp
    lines = ["# scale: pools of 10k to 1M images on this machine", "",
             f"- **command**: `{command}`", f"- **commit**: {stamp.get('commit')}",
             f"- **machine**: {stamp.get('machine')}",
             f"- **total wall time**: {stamp.get('wall_s', 0) / 60:.1f} min", "",
             "Synthetic 3×32×32 pools written by the benchmark (pool directories: `images.npy` read by index, never "
             "loaded whole); teacher lenet5_bn (untrained: time and memory only, no accuracy), student "
             "lenet5_half_bn, `configs/fashion-wild/{blind_kd,kd3}.yaml` for one epoch over the whole pool "
             "(`train.epoch_steps=0`), batch 256, one thread, teacher run every step (`method.teacher_views=0`), "
             "no test set; KD³ keeps the 30 % of the pool with the highest blended confidence "
             "(`method.thresholds=percentile`: an untrained teacher clears no class-adaptive threshold). "
             "Peak RSS is each process's own high-water mark (VmHWM, polled from /proc every 0.1 s).", "",
             "## Pool build, relevance-score pass", "",
             "| pool images | pool on disk (MB) | build s | build peak RSS (MB) | score pass s | score images/s | score peak RSS (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for pool, score in zip(results.pools, results.scores):
        lines.append(f"| {pool['size']:,} | {pool['bytes'] / 1e6:,.0f} | {pool['build_s']:.1f} | {pool['peak_rss_mb']:,.0f} | "
                     f"{score['score_seconds']:.1f} | {score['size'] / score['score_seconds']:,.0f} | {score['peak_rss_mb']:,.0f} |")
    lines += ["", "## One epoch", "",
              "| pool images | method | selection pass s | trained images | epoch s | train images/s | "
              "s per image vs largest | wall s (process) | peak RSS (MB) |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        relative = _linearity(runs, method, "epoch_s", "train_images")
        for r in sorted((r for r in runs if r["method"] == method), key=lambda r: r["size"]):
            lines.append(f"| {r['size']:,} | {method} | {r['plan_s']:.1f} | {r['train_images']:,} | {r['epoch_s']:.1f} | "
                         f"{r['images_per_s']:,.0f} | {relative[r['size']]:.2f} | {r['wall_s']:.0f} | {r['peak_rss_mb']:,.0f} |")
    lines += ["", "\"s per image vs largest\" is the epoch's seconds per trained image divided by the same on "
              "the largest pool: 1.00 is exactly linear growth of epoch time with pool size.", "",
              "## 1 process against 2 (torchrun, gloo, one thread each)", "",
              "| pool images | processes | epoch s | train images/s | speed-up | wall s | peak RSS per process (MB) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    single = next((p for p in results.processes if p["nproc"] == 1), None)
    for p in results.processes:
        speedup = p["images_per_s"] / single["images_per_s"] if single else float("nan")
        lines.append(f"| {p['size']:,} | {p['nproc']} | {p['epoch_s']:.1f} | {p['images_per_s']:,.0f} | {speedup:.2f}× | "
                     f"{p['wall_s']:.0f} | {p['peak_rss_mb']:,.0f} |")
    ing = results.ingest
    if ing:
        lines += ["", "## Ingest of img2dataset-style shards", "",
                  f"{ing['images']:,} images (64×64 JPEG/PNG/WebP with json/txt side members) in {ing['shards']} shards, "
                  "decoded to 3×32×32:", "",
                  "| source | workers | images/s |", "|---|---:|---:|",
                  f"| shards | 1 | {ing['shards_1_workers_images_per_s']:,.0f} |",
                  f"| shards | 2 | {ing['shards_2_workers_images_per_s']:,.0f} |",
                  f"| folder (same images) | 2 | {ing['folder_2_workers_images_per_s']:,.0f} |", "",
                  f"Speed-up with 2 workers: **{ing['speedup']:.2f}×**. Pools from shards (1 and 2 workers) and from "
                  f"the folder byte-identical (same digest): **{'yes' if ing['identical'] else 'NO'}**."]
    if results.presets:
        lines += ["", *presets_section(results.presets, [{**stamp, "command": command}])]
    markdown = out_dir / "scale.md"
    markdown.write_text("\n".join(lines) + "\n")
    record = out_dir / "scale.json"
    record.write_text(json.dumps({"stamp": stamp, "pools": results.pools, "scores": results.scores,
                                  "runs": results.runs, "processes": results.processes, "presets": results.presets,
                                  "ingest": results.ingest}, indent=1, sort_keys=True))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
        rows = sorted((r for r in runs if r["method"] == method), key=lambda r: r["size"])
        sizes = np.array([r["size"] for r in rows], dtype=float)
        seconds = np.array([r["epoch_s"] + r["plan_s"] for r in rows])
        left.loglog(sizes, seconds, "o-", color=colour, label=f"{method} (selection + epoch)")
        left.loglog(sizes, seconds[-1] * sizes / sizes[-1], ":", color=colour, label=f"{method}, linear through the largest")
        right.plot(sizes, [r["peak_rss_mb"] / 1024 for r in rows], "o-", color=colour, label=method)
    left.set(xlabel="pool images", ylabel="seconds", title="one epoch against pool size")
    left.legend(fontsize=8)
    right.axhline(4, color="grey", linestyle="--", label="4 GB")
    right.set(xscale="log", xlabel="pool images", ylabel="peak RSS (GB)", title="peak resident memory", ylim=(0, None))
    right.legend(fontsize=8)
    figure.tight_layout()
    plot = out_dir / "scale.png"
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return [markdown, record, plot]


def _stamp(command: str, started: float) -> dict[str, Any]:
    from kd3.bench.runner import run_stamp

    stamp = run_stamp(command)
    machine = stamp["machine"]
    return {"commit": stamp["commit"], "machine": f"{machine['cores']} cores, {machine['cpu']}, torch {machine['torch']}, "
            f"GPU: {machine['gpu'] or 'none'}", "wall_s": time.perf_counter() - started}


def run(args) -> None:
    """``kd3 bench scale``; with ``--presets`` only the shipped presets' rows, put into the existing scale.md."""
    import shutil
    import tempfile

    sizes = tuple(args.sizes) if args.sizes else SIZES
    presets_only = getattr(args, "presets", False)
    steps = getattr(args, "steps", None) or PRESET_STEPS
    command = "kd3 bench scale" + (f" --sizes {','.join(map(str, sizes))}" if args.sizes else "") \
        + (" --presets" if presets_only else "") + (f" --methods {','.join(args.methods)}" if presets_only and args.methods else "") \
        + (f" --steps {steps}" if steps != PRESET_STEPS else "")
    work = Path(tempfile.mkdtemp(prefix="kd3-scale-", dir=args.work_dir))
    started = time.perf_counter()
    say = lambda text: print(text, flush=True)  # noqa: E731
    try:
        if presets_only:
            teacher = make_teacher(work / "teacher.pt")
            rows = [row for size in sizes for row in preset_rows(work, teacher, size, steps, args.methods, say=say)]
        else:
            results = run_scale(work, sizes, say=say)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of synthetic pools: never left behind
    stamp = _stamp(command, started)
    out = Path(args.out)
    if presets_only:
        out.mkdir(parents=True, exist_ok=True)
        # Rows measured earlier (other sizes or presets) are kept; a row measured again replaces its old one.
        record = out / "scale-presets.json"
        earlier = json.loads(record.read_text()) if record.is_file() else {}
        earlier = {"stamps": earlier.get("stamps", []), "presets": earlier.get("presets", [])}
        measured = {(r["size"], r["preset"], r["nproc"]) for r in rows}
        kept = [r for r in earlier["presets"] if (r["size"], r["preset"], r["nproc"]) not in measured]
        stamp["command"] = command
        for r in rows:
            r["command"] = command
        rows = kept + rows
        stamps = [s for s in earlier["stamps"] if any(r.get("command") == s["command"] for r in rows)] + [stamp]
        splice_section(out / "scale.md", presets_section(rows, stamps))
        record.write_text(json.dumps({"stamps": stamps, "presets": rows}, indent=1, sort_keys=True))
        print(f"wrote {out / 'scale.md'} (section {PRESETS_HEADING[3:]!r}) and {out / 'scale-presets.json'}")
        return
    results.stamp = stamp
    for path in write_report(results, out, command):
        print(f"wrote {path}")
