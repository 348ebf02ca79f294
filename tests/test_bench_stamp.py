"""The commit stamp of bench records: +dirty for changed code, not for the benches' own outputs."""
from __future__ import annotations

import subprocess

from kd3.bench.runner import run_stamp


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_dirty_means_changed_code_not_rewritten_results(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "context.json").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.chdir(tmp_path)
    clean = run_stamp("kd3 bench x")["commit"]
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "results" / "context.json").write_text('{"teacher": {}}\n')  # what a bench's prepare does
    assert run_stamp("kd3 bench x")["commit"] == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert run_stamp("kd3 bench x")["commit"] == clean + "+dirty"
