"""Output fit for files, CI and dashboards: plain progress lines and full-width tables off a
terminal, and metrics mirrored to TensorBoard on request."""
import io
import os
import re
import subprocess
import sys

import pytest

from kd3.cli import main
from kd3.engine.logging import FILE_WIDTH, MetricsLog, print_table
from kd3.utils.progress import PlainProgress, progress
from standins import digits_distill_args, write_digits_inputs

SUMMARY = re.compile(r"epoch 3/20: 12 steps, \d+\.\d s, loss 0\.4100")


def test_progress_off_a_terminal_is_one_plain_line(capsys):
    bar = progress(range(12), desc="epoch 3/20", total=12)
    assert isinstance(bar, PlainProgress)  # capsys' stderr is not a terminal
    for step in bar:
        if step == 9:
            bar.set_postfix(loss="0.4100")
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and len(err.splitlines()) == 1
    assert SUMMARY.fullmatch(err.strip()), err


def test_progress_disabled_prints_nothing(capsys):
    assert list(progress(range(3), desc="epoch 1/1", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(range(3), desc="epoch 1/1", file=terminal)
    assert not isinstance(bar, PlainProgress)
    assert list(bar) == [0, 1, 2] and "\r" in terminal.getvalue()  # frames redrawn in place, as on a terminal


def test_table_is_not_folded_at_80_columns_off_a_terminal(capsys):
    long_path = "runs/" + "fashion-wild-kd3-" * 8 + "20261129-090000"  # 156 characters
    assert 80 < len(long_path) < FILE_WIDTH
    print_table("kd3 distill", ["run", "test acc %"], [[long_path, "81.48 ± 0.39"]])
    out = capsys.readouterr().out
    assert any(long_path in line and "81.48 ± 0.39" in line for line in out.splitlines()), out


def test_cli_through_pipes_prints_one_line_per_epoch_and_whole_tables(tmp_path):
    """The CLI in a subprocess with stdout and stderr piped, as under `kd3 demo > log 2>&1` or CI."""
    write_digits_inputs(tmp_path)
    args = digits_distill_args(tmp_path, "train.epochs=3", "train.batch_size=4", "progress=true")
    done = subprocess.run([sys.executable, "-m", "kd3", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KD3_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\r" not in done.stdout
    epochs = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all(re.fullmatch(r"epoch \d/3: \d+ steps, \d+\.\d s, loss \d+\.\d{4}", line) for line in epochs), epochs
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert any(str(run_dir) in line for line in done.stdout.splitlines()), done.stdout  # the run's path, unfolded


def test_tensorboard_mirrors_every_record_and_purges_rerun_epochs_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", logger="tensorboard")
    log.write({"epoch": 1, "loss": 1.0, "method": "kd3", "selection": {"precision": 0.5, "per_class": [3, 4]}})
    log.write({"epoch": 2, "loss": 0.8})
    resumed = MetricsLog(tmp_path / "metrics.jsonl", logger="tensorboard")  # a crash after epoch 2's line, resumed from 1
    resumed.truncate_after(1)
    resumed.write({"epoch": 2, "loss": 0.7})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "selection/precision", "selection/per_class/0", "selection/per_class/1"}
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.7)]
    assert [e.value for e in events.Scalars("selection/per_class/1")] == [4.0]
    assert [r["loss"] for r in resumed.read()] == [1.0, 0.7]  # metrics.jsonl is still the record


def test_train_logger_tensorboard_writes_events_in_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("KD3_CACHE", str(tmp_path / "cache"))
    write_digits_inputs(tmp_path)
    assert main(digits_distill_args(tmp_path, "train.logger=tensorboard")) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1


def test_jsonl_logger_writes_no_tensorboard_folder(tmp_path):
    MetricsLog(tmp_path / "metrics.jsonl").write({"epoch": 1, "loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()
