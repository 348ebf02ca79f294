"""``kd3 bench``: specs expand into runs, interrupted benches resume without re-running finished runs,
tables report paired differences that match a hand computation, and one real tiny bench runs
through the ``kd3 distill`` subprocess path."""
import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kd3.bench import runner
from kd3.bench.cli import add_bench_parser
from kd3.bench.records import load_group
from kd3.bench.runner import RunFailed, Runner, config_digest, resolved_config
from kd3.bench.spec import ComparisonSpec, all_groups, groups, load_spec, plan_runs
from kd3.bench.tables import write_tables
from kd3.config import ConfigError, save_config
from kd3.data.contamination import pool_contamination
from kd3.data.pool import Pool
from kd3.data.sources import load_source
from kd3.engine.logging import MetricsLog
from test_cli import teacher_path, workdir  # noqa: F401  (the tiny UCI-digits teacher fixture)

STAMP = {"commit": "abc1234", "bench_command": "kd3 bench digits-wild",
         "machine": {"cores": 2, "cpu": "test CPU", "gpu": None, "torch": torch.__version__}}
# Per-seed last-epoch accuracies the fake runs report; the paired-difference test recomputes by hand.
ACCURACY = {"blind_kd": [0.80, 0.82, 0.84], "kd3": [0.83, 0.84, 0.86], "oracle": [0.90, 0.92, 0.93]}


@pytest.fixture
def spec(tmp_path, monkeypatch):
    """The real digits-wild spec, writing under tmp_path; test-set size fixed (no dataset load)."""
    monkeypatch.setattr(runner, "test_set_size", lambda data: 1000)
    return load_spec("digits-wild", [f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}"])


class FakeLaunch:
    """Stands in for the `kd3 distill` subprocess: writes a run directory like a finished run
    (config.yaml, metrics.jsonl) and counts launches; ``stop_after`` raises KeyboardInterrupt on
    the launch after that many, as Ctrl-C would."""

    def __init__(self, stop_after: int | None = None):
        self.launched: list[tuple[str, str, int, object]] = []
        self.stop_after = stop_after

    def __call__(self, run, resume):
        if self.stop_after is not None and len(self.launched) >= self.stop_after:
            raise KeyboardInterrupt
        self.launched.append((run.group, run.row, run.seed, resume))
        cfg = resolved_config(run)
        run_dir = resume or run.output_dir / f"run-{len(self.launched)}"
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        log, epochs = MetricsLog(run_dir / "metrics.jsonl"), cfg.train.epochs
        final = ACCURACY.get(run.row, [0.5] * 10)[run.seed]
        for epoch in range(1, epochs + 1):
            record = {"epoch": epoch, "train_images": 100, "epoch_time": 0.5, "elapsed": 0.6 * epoch,
                      "test_acc": final if epoch == epochs else 0.99}  # an earlier epoch is best: must not count
            if run.kind != "reference":
                record["selection"] = {"selected": 50, "precision": 0.3 + 0.01 * epoch, "recall": 1.0,
                                       "precision_correct": "nan", "recall_correct": 0.5}
            log.write(record)
        return run_dir


def _run(spec, runs, launch, jobs=1):
    return Runner(spec.results_root, STAMP, launcher=launch, say=lambda text: None).run(runs, jobs=jobs)


def test_specs_expand_into_the_protocol_runs():
    fashion = load_spec("fashion-wild")
    assert [r.name for r in fashion.rows] == [
        "teacher", "supervised", "kd-original", "oracle", "blind_kd", "dfnd", "dafl", "deepinversion", "kd3",
        "kd3-no-selection", "kd3-no-sharing", "kd3-no-weighting", "kd3-no-mixdistribution", "kd3-pooled",
        "kd3-relevance", "kd3-relevance-bn_mean_all", "dfnd-relevance", "dfnd-relevance-bn_mean_all",
        "kd3-relevance-no-sharing", "dfnd-relevance-no-noise", "dfnd-grid", "kd3-grid-no-sharing", "recommended-fixed30",
        "recommended", "recommended-per-class", "recommended-mixup", "blind_kd-mixup", "recommended-views0", "blind_kd-views0",
        "recommended-ratio"]
    assert {r.name: r.kind for r in fashion.rows if r.kind != "method"} == {
        "teacher": "teacher", "supervised": "reference", "kd-original": "reference", "oracle": "oracle"}
    main = plan_runs(fashion, groups(fashion))
    assert len(main) == (len(fashion.rows) - 1) * len(fashion.seeds) and fashion.baseline == "blind_kd"  # the teacher is not run
    run = next(r for r in main if r.row == "kd3-no-weighting" and r.seed == 2)
    assert run.overrides[:2] == ("method.weighting=uniform", "train.seed=2")
    assert not any(o.startswith("pool.seed") for o in run.overrides)  # one pool for every seed
    cfg = resolved_config(run)
    assert cfg.method["weighting"] == "uniform" and cfg.train.seed == 2 and cfg.train.threads == 1
    sweep = plan_runs(fashion, groups(fashion, sweep=True), ["kd3"], [0])
    assert [resolved_config(r).pool.irrelevant_fraction for r in sweep] == [0.0, 0.25, 0.5, 0.7, 0.9]
    assert [g.name for g in all_groups(fashion)] == ["runs", *(f"sweep/{v:g}" for v in fashion.sweep.values), "hard"]
    points = plan_runs(fashion, groups(fashion, sweep=True, points=[0.9, 0.0]), ["kd3"], [0])
    assert [resolved_config(r).pool.irrelevant_fraction for r in points] == [0.0, 0.9]  # the spec's order
    with pytest.raises(ConfigError, match=r"sweep point\(s\) 0.8 not among the spec's pool.irrelevant_fraction values"):
        groups(fashion, sweep=True, points=[0.8])
    hard = plan_runs(fashion, groups(fashion, hard=True))
    assert {r.row for r in hard} == {"blind_kd", "dfnd", "kd3", "kd3-relevance", "dfnd-relevance", "recommended-fixed30",
                                     "recommended", "recommended-per-class", "oracle", "recommended-ratio"}
    assert all(resolved_config(r).pool.variant == "hard" for r in hard)
    # The sweep point at the default fraction computes exactly what the main table does.
    main_kd3 = next(r for r in main if r.row == "kd3" and r.seed == 0)
    assert config_digest(resolved_config(sweep[3])) == config_digest(resolved_config(main_kd3))
    with pytest.raises(ConfigError, match="dafl"):
        plan_runs(fashion, groups(fashion, sweep=True), ["dafl"])
    # A typo in a row's method options stops the bench before anything runs, naming the run.
    typo = replace(main_kd3, overrides=("method.selektion=false", *main_kd3.overrides))
    with pytest.raises(ConfigError, match="kd3 seed 0: unknown key 'method.selektion'"):
        runner.prepare(fashion, [typo])


def test_interrupted_bench_resumes_without_rerunning_finished_runs(spec):
    runs = plan_runs(spec, groups(spec), ["blind_kd", "kd3", "supervised"])
    first = FakeLaunch(stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        _run(spec, runs, first)
    finished = {(r.row, r.seed) for r in runs if r.record.is_file()}
    assert len(finished) == 4 and finished == {(row, seed) for _, row, seed, _ in first.launched}
    second = FakeLaunch()
    outcome = _run(spec, runs, second, jobs=2)
    relaunched = {(row, seed) for _, row, seed, _ in second.launched}
    assert relaunched == {(r.row, r.seed) for r in runs} - finished and len(second.launched) == len(runs) - 4
    assert (outcome.cached, outcome.ran, outcome.failed) == (4, len(runs) - 4, [])
    third = FakeLaunch()
    assert _run(spec, runs, third).cached == len(runs) and third.launched == []
    record = json.loads(next(r for r in runs if r.row == "kd3" and r.seed == 1).record.read_text())
    assert record["test_acc"] == 0.84 and record["test_acc_se"] == pytest.approx(math.sqrt(0.84 * 0.16 / 1000))
    assert record["selection_last"]["precision"] == pytest.approx(0.5)  # epoch 20 of 20
    assert record["selection_mean"]["precision"] == pytest.approx(0.405)  # mean of 0.31 … 0.50
    assert record["selection_last"]["precision_correct"] is None  # a logged NaN stays JSON-valid
    assert record["images_seen"] == 2000 and record["train_images_per_s"] == pytest.approx(200)
    assert "train.seed=1" in record["overrides"] and record["commit"] == "abc1234"


def test_cut_short_run_resumes_from_its_checkpoint(spec):
    (run,) = plan_runs(spec, groups(spec), ["blind_kd"], [0])
    launch = FakeLaunch()

    def crash(run, resume):  # got as far as a checkpoint, then died
        run_dir = launch(run, resume)
        (run_dir / "last.pt").write_bytes(b"checkpoint")
        raise RunFailed("exit code 1")

    assert _run(spec, [run], crash).failed and not run.record.is_file()
    (crashed,) = [d for d in run.output_dir.iterdir() if d.is_dir()]
    again = FakeLaunch()
    _run(spec, [run], again)
    assert again.launched == [("runs", "blind_kd", 0, crashed)] and run.record.is_file()
    # An attempt made with other settings (the spec changed since) is started afresh instead.
    run.record.unlink()
    (crashed / "config.yaml").write_text((crashed / "config.yaml").read_text().replace("lr: 0.05", "lr: 0.1"))
    fresh = FakeLaunch()
    _run(spec, [run], fresh)
    assert fresh.launched == [("runs", "blind_kd", 0, None)]


def test_runs_of_another_teacher_are_run_again_and_never_tabled(spec):
    runs = plan_runs(spec, groups(spec), ["blind_kd", "kd3"], [0, 1])
    old = {**STAMP, "teacher_sha256": "aaaa"}
    Runner(spec.results_root, old, launcher=FakeLaunch(), say=lambda text: None).run(runs)
    new_teacher = FakeLaunch()
    said: list[str] = []
    outcome = Runner(spec.results_root, {**STAMP, "teacher_sha256": "bbbb"}, launcher=new_teacher,
                     say=said.append).run(runs[:2])
    assert outcome.ran == 2 and outcome.reused == 0 and len(new_teacher.launched) == 2  # no twin of teacher aaaa
    assert "(cached 2 with another teacher: run again)" in said[0]
    tabled = load_group(spec.results_root, "runs", "bbbb")
    assert sum(len(seeds) for seeds in tabled.values()) == 2
    assert all(r["teacher_sha256"] == "bbbb" for seeds in tabled.values() for r in seeds.values())
    assert sum(len(seeds) for seeds in load_group(spec.results_root, "runs").values()) == 4


def test_a_record_whose_row_changed_settings_since_is_run_again(spec):
    runs = plan_runs(spec, groups(spec), ["blind_kd", "kd3"], [0])
    Runner(spec.results_root, STAMP, launcher=FakeLaunch(), say=lambda text: None).run(runs)
    blind, kd3 = runs
    # The kd3 row now keeps another share, and blind KD's record was written before kd3 had train.warmup_epochs.
    changed = replace(kd3, overrides=("method.keep_fraction=0.5", *kd3.overrides))
    record = json.loads(blind.record.read_text())
    del record["config"]["train"]["warmup_epochs"]
    blind.record.write_text(json.dumps(record))
    assert runner.changed_settings(record, resolved_config(blind)) == []  # gained since, at its default: the same run
    assert runner.changed_settings(json.loads(kd3.record.read_text()), resolved_config(changed)) == ["method.keep_fraction"]
    warm = replace(blind, overrides=("train.warmup_epochs=1", *blind.overrides))
    assert runner.changed_settings(record, resolved_config(warm)) == ["train.warmup_epochs"]
    # A method option named on one side only is compared with the method's default (KD³'s sharing: map).
    named = json.loads(kd3.record.read_text())
    named["config"]["method"]["sharing"] = "map"
    assert "sharing" not in resolved_config(kd3).method and runner.changed_settings(named, resolved_config(kd3)) == []
    named["config"]["method"]["sharing"] = "pooled"
    assert runner.changed_settings(named, resolved_config(kd3)) == ["method.sharing"]
    assert runner.stale_records([blind, changed]) == ["kd3 seed 0: method.keep_fraction"]  # what --tables-only warns of
    said: list[str] = []
    again = FakeLaunch()
    outcome = Runner(spec.results_root, STAMP, launcher=again, say=said.append).run([blind, changed])
    assert again.launched == [("runs", "kd3", 0, None)] and outcome.cached == 1 and outcome.ran == 1
    assert "(cached 1 with other settings (method.keep_fraction): run again)" in said[0]
    assert json.loads(kd3.record.read_text())["config"]["method"]["keep_fraction"] == 0.5


def test_tables_list_every_row_and_pair_differences_by_seed(spec):
    runs = plan_runs(spec, groups(spec), ["blind_kd", "kd3", "oracle"])
    _run(spec, runs, FakeLaunch())
    next(r for r in runs if r.row == "oracle" and r.seed == 2).record.unlink()  # oracle: 2 of 3 seeds
    printed = write_tables(spec)
    results = json.loads((spec.results_root.parent / "digits-wild.json").read_text())
    rows = {r["name"]: r for r in results["groups"]["runs"]}
    assert list(rows) == [r.name for r in spec.rows]  # every requested row, run or not

    # By hand: kd3 − blind_kd per seed = 0.03, 0.02, 0.02 -> mean 0.0233, SE = std(ddof=1)/√3.
    diffs = [k - b for k, b in zip(ACCURACY["kd3"], ACCURACY["blind_kd"])]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert rows["kd3"]["diff"] == pytest.approx(mean) and rows["kd3"]["diff_se"] == pytest.approx(se)
    assert rows["kd3"]["mean"] == pytest.approx(0.8433333) and rows["kd3"]["std"] == pytest.approx(np.std(ACCURACY["kd3"], ddof=1))
    # The oracle pairs only the seeds it has (0, 1): differences 0.10, 0.10 (unpaired means would give 0.09).
    assert rows["oracle"]["diff"] == pytest.approx(0.10) and rows["oracle"]["diff_seeds"] == 2
    assert rows["oracle"]["seeds"] == [0, 1] and rows["dafl"]["seeds"] == []

    page = (spec.results_root.parent / "digits-wild.md").read_text()
    table = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| ")}
    assert set(table) >= {r.name for r in spec.rows}
    assert f"+{100 * mean:.2f} ± {100 * se:.2f}" in table["kd3"] and "| 3 |" in table["kd3"]
    assert "2/3*" in table["oracle"] and "provenance" in table["oracle"] and "not run" in table["dafl"]
    assert "original data" in table["supervised"] and "abc1234" in page and "test CPU" in page
    bars = spec.results_root.parent / "digits-wild-bars.png"
    assert "(digits-wild-bars.png)" in page and bars.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bars.stat().st_size > 1000
    title, columns, cells = printed[0]
    assert len(cells) == len(spec.rows) and all(len(c) == len(columns) for c in cells)


def test_comparisons_pair_two_rows_by_seed_and_skip_rows_not_run(spec):
    _run(spec, plan_runs(spec, groups(spec), ["blind_kd", "kd3", "oracle"]), FakeLaunch())
    spec.comparisons = [ComparisonSpec(row="oracle", vs="kd3"), ComparisonSpec(row="kd3", vs="dafl")]
    write_tables(spec)
    # By hand: oracle − kd3 per seed = 0.07, 0.08, 0.07.
    diffs = [o - k for o, k in zip(ACCURACY["oracle"], ACCURACY["kd3"])]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    page = (spec.results_root.parent / "digits-wild.md").read_text()
    compared = page.split("Paired comparisons")[1].split("\n\n")[1].splitlines()
    assert compared[2:] == [f"| oracle | kd3 | 3 | +{100 * mean:.2f} ± {100 * se:.2f} | +{mean / se:.1f} |"]  # dafl: not run


def test_comparisons_must_name_two_different_trained_rows(tmp_path):
    for pair in ("{row: teacher, vs: blind_kd}", "{row: kd3, vs: kd3}", "{row: kd3, vs: nowhere}"):
        with pytest.raises(ConfigError):
            load_spec("digits-wild", [f"results_dir={tmp_path}", f"comparisons=[{pair}]"])


def test_sweep_reuses_the_main_tables_runs_and_writes_its_page(spec):
    _run(spec, plan_runs(spec, groups(spec), ["blind_kd", "kd3"], [0, 1]), FakeLaunch())
    launch = FakeLaunch()
    outcome = _run(spec, plan_runs(spec, groups(spec, sweep=True), ["blind_kd", "kd3"], [0, 1]), launch)
    assert outcome.reused == 4 and all(group != "sweep/0.7" for group, *_ in launch.launched)
    assert load_group(spec.results_root, "sweep/0.7")["kd3"][1]["test_acc"] == 0.84
    write_tables(spec, [0, 1])
    page = (spec.results_root.parent / "digits-wild-sweep.md").read_text()
    assert "70% irrelevant" in page and "+2.50 ± 0.50" in page  # kd3 − blind_kd on seeds 0, 1
    assert (spec.results_root.parent / "digits-wild-sweep.png").stat().st_size > 1000
    assert "digits-wild-sweep.md" in (spec.results_root.parent / "digits-wild.md").read_text()


@pytest.fixture(scope="module")
def provenance_pool(workdir):  # noqa: F811
    """UCI digits (relevant, labels as provenance) plus as many noise images (irrelevant)."""
    digits = load_source("uci-digits:train")
    n = 300
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8))
    pool = Pool(images=torch.cat([digits.images[:n], noise]), source=np.array(["uci"] * n + ["noise"] * n),
                style=np.array(["clean"] * n + ["none"] * n), relevant=np.arange(2 * n) < n,
                true_label=np.concatenate([digits.labels[:n].numpy(), np.full(n, -1)]),
                meta={"pool": "tiny", "provenance": True})
    return pool.save(workdir / "provenance-pool.npz")


def test_tiny_bench_end_to_end_through_subprocesses(tmp_path, teacher_path, provenance_pool, capsys):  # noqa: F811
    common = [f"teacher.checkpoint={teacher_path}", "teacher.recipe=", "pool.name=file", f"pool.path={provenance_pool}",
              "eval_data=uci-digits:test", "train.epochs=2", "train.batch_size=64"]
    rows = [{"name": "teacher", "kind": "teacher", "config": "configs/digits-wild/blind_kd.yaml", "overrides": common},
            {"name": "blind_kd", "kind": "method", "config": "configs/digits-wild/blind_kd.yaml", "overrides": common},
            {"name": "oracle", "kind": "oracle", "config": "configs/digits-wild/oracle.yaml", "overrides": common}]
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(json.dumps({"name": "tiny", "seeds": [0], "baseline": "blind_kd", "rows": rows,
                                     "results_dir": str(tmp_path / "results"), "runs_dir": str(tmp_path / "runs")}))
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", str(spec_file), "--jobs", "2"])
    args.func(args)
    assert "2 run, 0 reused, 0 cached, 0 failed" in capsys.readouterr().out
    found = load_group(tmp_path / "results" / "tiny", "runs")
    for row, precision in [("blind_kd", 0.5), ("oracle", 1.0)]:
        record = found[row][0]
        history = MetricsLog(Path(record["run_dir"]) / "metrics.jsonl").read()
        assert record["test_acc"] == history[-1]["test_acc"] and record["test_images"] == 359
        assert record["selection_last"]["precision"] == pytest.approx(precision)
        assert record["machine"]["cores"] >= 1 and record["commit"]
    page = (tmp_path / "results" / "tiny.md").read_text()
    assert all(f"| {name} |" in page for name in ("teacher", "blind_kd", "oracle"))
    assert "600 images (tiny)" in page  # the pool's composition, recorded by the bench's prepare step
    found = pool_contamination(Pool.load(provenance_pool), "uci-digits:test", duplicates=False).summary()
    assert (f"; {found['flagged']} images copy uci-digits:test ({found['exact']} exact, {found['near']} near"
            in page)  # and how many pool images copy the test set
    args.func(args)  # a second call finds everything cached
    assert "0 run, 0 reused, 2 cached" in capsys.readouterr().out
