"""Faults a run can meet that are not the user's config: a diverged training, a failed write.

Each becomes one exception whose message is the whole story in one line (what failed, where,
what was kept, what to do) and whose ``exit_code`` the CLI returns:

- ``TrainingFailed`` (exit 3): a non-finite loss or weights (``Diverged``), or a finished student
  no better than chance although its teacher is (``chance_failure``): nothing is exported as
  ``student.ts``;
- ``WriteFailed`` (exit 4): a checkpoint, pool, cache or result could not be written (full disk,
  read-only or vanished directory); the previous file of that name is kept.
"""
from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

EXIT_TRAINING_FAILED = 3
EXIT_WRITE_FAILED = 4


class Fault(Exception):
    exit_code = 1


class TrainingFailed(Fault):
    exit_code = EXIT_TRAINING_FAILED


class Diverged(TrainingFailed):
    """A step produced a non-finite loss or non-finite weights; the checkpoint before it is kept."""

    def __init__(self, epoch: int, step: int | None, what: str, last_pt: Path, saved_epoch: int, lr: float):
        kept = (f"the last good checkpoint (epoch {saved_epoch}) is kept in {last_pt}" if saved_epoch
                else "no epoch had finished, so there is no checkpoint")
        where = f"epoch {epoch}, step {step}" if step is not None else f"the end of epoch {epoch}"
        super().__init__(f"training diverged at {where}: {what}; {kept}; "
                         f"lower train.lr (now {lr:g}) or check the teacher checkpoint")
        self.epoch, self.step, self.saved_epoch = epoch, step, saved_epoch


def non_finite_term(losses: dict[str, torch.Tensor]) -> str:
    """Which term made the summed loss non-finite, for the message."""
    for name, value in losses.items():
        number = value.detach().float().item()
        if not math.isfinite(number):
            return f"loss term {name!r} is {number}"
    # Under torchrun the loss checked is the average over ranks: the culprit may be elsewhere.
    return "the loss (summed, or averaged over ranks) is not finite"


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device sync, whatever their number)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


def chance_threshold(num_classes: int, count: int, standard_errors: float = 3.0) -> float:
    """Accuracy that guessing (1/K) exceeds with probability ~0.1 % on ``count`` test images."""
    chance = 1.0 / num_classes
    return chance + standard_errors * math.sqrt(chance * (1 - chance) / max(count, 1))


def chance_failure(accuracy: float, count: int, num_classes: int, teacher_accuracy: float | None) -> str | None:
    """Why a finished student is not a deliverable, or None.

    The rule: its last-epoch test accuracy is not above ``chance_threshold`` (1/K + 3 binomial SEs)
    while its teacher's recorded accuracy is. A teacher at chance itself (or none recorded, or no
    test set) gives nothing to fall short of, so the student is then not judged. With a test set,
    an accuracy that is not a number (a student whose outputs are not finite, or one never
    evaluated) is never a deliverable, whatever the teacher."""
    if count and not math.isfinite(accuracy):
        return (f"the student's test accuracy on {count} images is {accuracy} (not a number): its outputs are not "
                "finite or it was never evaluated; check that the pool (or its selection) holds at least a batch of images")
    if not count or teacher_accuracy is None or not math.isfinite(teacher_accuracy):
        return None
    threshold = chance_threshold(num_classes, count)
    if teacher_accuracy <= threshold or accuracy > threshold:
        return None
    return (f"the student is at chance: test accuracy {100 * accuracy:.2f}% is not above {100 * threshold:.2f}% "
            f"(1/{num_classes} + 3 SE on {count} images) while the teacher reaches {100 * teacher_accuracy:.2f}%; "
            "training diverged without a NaN, was far too short or saw too few images (train.lr too high? "
            "train.epochs too few? a pool or selection of only a few batches?)")


FAILED_NOTE = "student.FAILED"  # in a run directory in place of student.ts: why there is no student


def write_failure_note(run_dir: Path, reason: str) -> None:
    try:
        (run_dir / FAILED_NOTE).write_text(f"kd3 exported no student from this run: {reason}\n")
    except OSError:
        pass  # best effort: the failure itself, not the note about it, is what must reach the user


def raise_if_failed(run_dir: Path) -> None:
    """A run directory whose training failed has no student to evaluate or export: say why."""
    note = run_dir / FAILED_NOTE
    if note.is_file() and not (run_dir / "student.ts").is_file():
        raise FileNotFoundError(f"{run_dir} has no student.ts: {note.read_text().strip()}")


class WriteFailed(Fault):
    """A file could not be written; ``kept`` says what stays in its place."""

    exit_code = EXIT_WRITE_FAILED

    def __init__(self, path: Path, reason: str, kept: str = ""):
        super().__init__(f"could not write {path}: {reason}" + (f"; {kept}" if kept else ""))
        self.path = path


def _short_write(error: RuntimeError) -> str | None:
    """torch.save on a full disk raises ``RuntimeError: [enforce fail at inline_container.cc:672] .
    unexpected pos 704 vs 598`` (its zip writer saw a short write), not an OSError."""
    text = str(error)
    if "unexpected pos" not in text and "PytorchStreamWriter" not in text:
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"the write stopped short, most likely no space left on device (torch: {detail})"


@contextmanager
def writing(path: Path, kept: str = "") -> Iterator[None]:
    """Around a write of ``path``: an OSError (ENOSPC, EROFS, EACCES, ...) or torch's short-write
    RuntimeError becomes a one-line ``WriteFailed``; anything else passes through."""
    try:
        yield
    except OSError as error:
        raise WriteFailed(path, error.strerror or str(error), kept) from error
    except RuntimeError as error:
        reason = _short_write(error)
        if reason is None:
            raise
        raise WriteFailed(path, reason, kept) from error


@contextmanager
def best_effort(path: Path, what: str) -> Iterator[None]:
    """Around a cache write whose failure need not fail the run: one warning line on stderr, then on."""
    try:
        with writing(path, f"continuing without caching {what}"):
            yield
    except WriteFailed as failure:
        print(f"kd3: warning: {failure}", file=sys.stderr)


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove a file can be written in it, before any work is done
    whose result would have nowhere to go."""
    with writing(directory, "nothing was trained"):
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:  # a unique name: safe beside another run
            probe.write(b"kd3")
