"""The one training loop every method runs in.

It owns the optimizer, schedule, AMP, checkpoints, resume, logging and evaluation; the method
decides what data an epoch trains on and what the losses are.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd3.config import TrainConfig
from kd3.data.sources import LabelledData
from kd3.engine import checkpoint, distributed, faults, signals
from kd3.engine.evaluate import EvalResult, evaluate
from kd3.engine.logging import MetricsLog
from kd3.engine.selection_metrics import selection_metrics
from kd3.methods.base import Batch, Method
from kd3.utils.progress import progress

LAST, PREVIOUS = "last.pt", "prev.pt"  # the newest checkpoint, and the one before it (a fallback)


@dataclass
class Provenance:
    """Per-pool-image truth used only for measuring selections."""

    relevant: np.ndarray
    source: np.ndarray
    teacher_correct: np.ndarray | None = None


@dataclass
class RunResult:
    run_dir: Path
    accuracy: float
    accuracy_se: float
    wall_time: float
    images_seen: int
    images_per_second: float
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """The configured device; under torchrun on GPU, this local rank's card."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.device_for_rank(torch.device(name))


def lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based)."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.milestones)
        return cfg.gamma**passed
    raise ValueError(f"train.schedule={cfg.schedule!r}; valid: step, cosine")


def warmup_factor(epoch: int, step: int, steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the scheduled learning rate at optimizer step ``step`` (0-based) of ``steps`` in ``epoch``:
    a linear ramp over the first ``cfg.warmup_epochs`` epochs, reaching 1 at the ramp's last step. Counted in
    epochs, not steps, so it needs no global step counter and a resumed run ramps exactly as it would have."""
    if cfg.warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + (step + 1) / max(steps, 1)) / cfg.warmup_epochs)


def _check_same_plan(indices: torch.Tensor | None) -> None:
    """Under torchrun every rank must train on the same selected set (the scoring passes are
    gathered so that it is); a mismatch would silently train ranks on different data, so stop."""
    if not distributed.active():
        return
    digest = hashlib.sha1(indices.cpu().numpy().tobytes()).hexdigest() if indices is not None else None
    digests = distributed.gather_objects(digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks chose different training sets this epoch ({digests}); "
                           "a whole-pool pass is not going through distributed.map_rows")


class Trainer:
    def __init__(self, method: Method, cfg: TrainConfig, run_dir: Path, eval_data: LabelledData | None = None,
                 provenance: Provenance | None = None, show_progress: bool = True):
        self.method = method
        self.cfg = cfg
        self.run_dir = run_dir
        self.eval_data = eval_data
        self.provenance = provenance
        self.show_progress = show_progress and distributed.is_main()
        self.device = method.ctx.device
        self.params = method.trainable_parameters()
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(e, cfg))
        self.log = MetricsLog(run_dir / "metrics.jsonl", logger=cfg.logger)
        self.start_epoch = 0
        self.saved_epoch = 0  # the epoch last.pt holds (0: none yet), for what a fault message says is kept
        self.elapsed = 0.0
        self.images_seen = 0
        # Every rank starts from rank 0's weights; augmentation and the like then draw from per-rank
        # seeds (rank 0 keeps the run's seed, so one process is unchanged by any of this).
        distributed.broadcast_module(method)
        if distributed.rank() > 0:
            torch.manual_seed(method.ctx.seed + 1_000_003 * distributed.rank())

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, epoch: int) -> None:
        """Rank 0 writes ``last.pt`` (with every rank's RNG state); the other ranks wait for it."""
        ranks_rng = distributed.gather_objects(checkpoint.rng_state())
        if not distributed.is_main():
            distributed.barrier()
            return
        last = self.run_dir / LAST
        # Deferred: a SIGINT/SIGTERM mid-write stops the run after the write, so last.pt is what it says.
        with signals.deferred(), faults.writing(last, self._kept()):
            checkpoint.atomic_save({
                "epoch": epoch,
                "method": self.method.state_dict(),
                "method_state": self.method.method_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": ranks_rng[0],
                "ranks_rng": ranks_rng,
                "elapsed": self.elapsed,
                "images_seen": self.images_seen,
            }, last, keep_previous=self.run_dir / PREVIOUS,
                before_replace=lambda: signals.pause_point("checkpoint-write", epoch))
        self.saved_epoch = epoch
        distributed.barrier()

    def _kept(self) -> str:
        """What a failed write leaves the user, for its message."""
        if not self.saved_epoch:
            return "no checkpoint had been written yet"
        return f"the previous checkpoint (epoch {self.saved_epoch}) is kept in {self.run_dir / LAST}"

    def resume(self) -> None:
        """Continue from ``last.pt``, or from ``prev.pt`` with a note when ``last.pt`` is damaged."""
        last = self.run_dir / LAST
        state, note = checkpoint.load_for_resume(last, self.run_dir / PREVIOUS)
        if distributed.is_main():
            # Left by a checkpoint write that SIGKILL or a power cut stopped (atomic_save's temp names).
            for stale in [*self.run_dir.glob(f".{LAST}.*.tmp"), *self.run_dir.glob(f".{PREVIOUS}.*.link")]:
                stale.unlink(missing_ok=True)
        if note and distributed.is_main():
            print(f"kd3: {note}", file=sys.stderr)
            # Moved aside, or the next save would keep the damaged file as prev.pt over the good one.
            if last.exists():
                last.replace(last.with_name(LAST + ".damaged"))
        self._check_fits(state["method"])
        try:
            self.method.load_state_dict(state["method"])
            self.method.load_method_state(state["method_state"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(self._misfit(f"its state does not load ({type(error).__name__}: "
                                          f"{(str(error).strip().splitlines() or [''])[0][:120]})")) from None
        # Under another world size, a rank without a saved state of its own takes a fresh seed.
        ranks_rng = state.get("ranks_rng", [state["rng"]])
        if distributed.rank() < len(ranks_rng):
            checkpoint.set_rng_state(ranks_rng[distributed.rank()])
        else:
            torch.manual_seed(self.method.ctx.seed + 1_000_003 * distributed.rank() + state["epoch"])
        self.start_epoch = self.saved_epoch = state["epoch"]
        self.elapsed = state["elapsed"]
        self.images_seen = state["images_seen"]
        if distributed.is_main():
            self.log.truncate_after(self.start_epoch)
        distributed.barrier()

    def _check_fits(self, saved: dict[str, torch.Tensor]) -> None:
        """The checkpoint's weights are those of the model this run's config builds now, or a
        ``ValueError`` says which differ (config.yaml edited to another student or method?)."""
        own = self.method.state_dict()
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        reshaped = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
        if not (missing or unexpected or reshaped):
            return
        counts = ", ".join(f"{len(keys)} {what}" for keys, what in ((missing, "missing"), (unexpected, "not in the model"),
                                                                   (reshaped, "of another shape")) if keys)
        first = (f"{reshaped[0]} is {tuple(saved[reshaped[0]].shape)} there, {tuple(own[reshaped[0]].shape)} now"
                 if reshaped else f"e.g. {(missing or unexpected)[0]}")
        raise ValueError(self._misfit(f"its weights are not this model's ({counts}; {first})"))

    def _misfit(self, what: str) -> str:
        return (f"--resume {self.run_dir}: the checkpoint {self.run_dir / LAST} does not fit the model "
                f"{self.run_dir / 'config.yaml'} builds now: {what}; was config.yaml edited to another model or method? "
                "restore it, or start a new run")

    # -- the loop ------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _steps(self, plan_size: int) -> int:
        return self.cfg.epoch_steps or math.ceil(plan_size / self.cfg.batch_size)

    def _batches(self, indices: torch.Tensor):
        """Shuffled batches: one pass, or with ``epoch_steps`` as many reshuffled passes as it takes.

        Each batch is a global batch of ``batch_size`` images; under torchrun this rank trains on
        its equal part of it (``tensor_split``), so the global batch is what the config says."""
        size, produced = self.cfg.batch_size, 0
        world, rank = distributed.world_size(), distributed.rank()
        passes = itertools.count() if self.cfg.epoch_steps else range(1)
        for _ in passes:
            # Rank 0 draws the order from its RNG (the run's seed, as one process does) and every rank
            # cuts the same global batches from it: one process is unchanged by distributed training.
            order = indices[distributed.broadcast_tensor(
                torch.randperm(len(indices)) if distributed.is_main() else torch.empty(len(indices), dtype=torch.long))]
            for start in range(0, len(order), size):
                if self.cfg.epoch_steps and produced == self.cfg.epoch_steps:
                    return
                chunk = order[start:start + size]
                if len(chunk) < 2 * world and start > 0:
                    continue  # a batch of one breaks BatchNorm; its image comes back next epoch
                produced += 1
                local = chunk.tensor_split(world)[rank]
                yield Batch(indices=local, images=self.method.ctx.images[local].to(self.device, non_blocking=True))

    def evaluate(self) -> EvalResult | None:
        if self.eval_data is None:
            return None
        return evaluate(self.method.deployable(), self.eval_data.images, self.eval_data.labels,
                        self.method.ctx.normalize, self.device)

    def _save_selection(self, epoch: int, indices: torch.Tensor) -> None:
        """Which pool images the epoch trained on, for reports (selected vs rejected grids)."""
        folder = self.run_dir / "selections"
        path = folder / f"epoch-{epoch + 1:04d}.npy"
        with faults.writing(path, self._kept()):
            folder.mkdir(exist_ok=True)
            np.save(path, np.sort(indices.cpu().numpy()).astype(np.int32))

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        method = self.method
        planning = time.perf_counter()
        plan = method.begin_epoch(epoch)  # KD³'s selection pass, DFND's ranking, DAFL's nothing
        signals.pause_point("selection", epoch + 1)
        _check_same_plan(plan.indices)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                                  "plan_time": time.perf_counter() - planning}
        if plan.indices is not None and len(plan.indices) < method.ctx.pool_size and distributed.is_main():
            self._save_selection(epoch, plan.indices)
        if plan.indices is not None and self.provenance is not None:
            p = self.provenance
            record["selection"] = selection_metrics(plan.indices, p.relevant, p.source, p.teacher_correct)
        method.train()
        batches = self._batches(plan.indices) if plan.indices is not None else (None for _ in range(plan.steps))
        total_steps = self._steps(plan.size) if plan.indices is not None else plan.steps
        sums: dict[str, float] = {}
        steps, seen, started = 0, 0, time.perf_counter()
        bar = progress(batches, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", enabled=self.show_progress,
                       total=total_steps)
        for batch in bar:
            with self._autocast():
                losses = method.training_step(batch)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Under torchrun the loss is averaged with the gradients, so every rank sees a
            # non-finite loss on any rank and all of them stop at the same step.
            if not torch.isfinite(distributed.average_gradients(self.params, extra=loss)):
                raise self._diverged(epoch, steps + 1, faults.non_finite_term(losses))
            if epoch < self.cfg.warmup_epochs:
                warm = warmup_factor(epoch, steps, total_steps, self.cfg)
                for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                    group["lr"] = base * lr_factor(epoch, self.cfg) * warm
                if steps == 0:  # the epoch's logged lr is the one its first step used
                    record["lr"] = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if not faults.all_finite(self.params):  # finite gradients can still overflow a weight
                raise self._diverged(epoch, steps + 1, "the weights are not finite after the optimizer step")
            if steps == 0:
                signals.pause_point("mid-epoch", epoch + 1)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            steps += 1
            seen += len(batch.indices) if batch is not None else self.cfg.batch_size
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        seconds = time.perf_counter() - started
        self.scheduler.step()
        # Every rank's BatchNorm statistics come from its own part of the batches: keep rank 0's.
        distributed.broadcast_module(method)
        world = distributed.world_size()
        sums = {k: v / world for k, v in distributed.all_reduce_sum(sums).items()}
        seen = int(distributed.all_reduce_sum({"seen": seen})["seen"])
        record.update({f"loss_{k}": v / max(steps, 1) for k, v in sums.items()})
        record["loss"] = sum(sums.values()) / max(steps, 1)
        record.update(train_images=seen, epoch_time=seconds, images_per_s=seen / max(seconds, 1e-9))
        record.update(method.epoch_metrics())
        self.images_seen += seen
        return record

    def _diverged(self, epoch: int, step: int | None, what: str) -> faults.Diverged:
        return faults.Diverged(epoch + 1, step, what, self.run_dir / LAST, self.saved_epoch, self.cfg.lr)

    def fit(self, stop_after: int | None = None) -> RunResult:
        """Train to ``cfg.epochs``; ``stop_after`` ends the call after that many epochs in total,
        as a crash would (the run continues with ``resume``). A Ctrl-C or SIGTERM comes out as
        ``signals.Interrupted`` naming the run and the epoch its last.pt holds."""
        last_eval: EvalResult | None = None
        history = self.log.read()
        end = self.cfg.epochs if stop_after is None else min(stop_after, self.cfg.epochs)
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, end):
                last_eval = self._fit_epoch(epoch, history) or last_eval
        except KeyboardInterrupt as stop:
            raise signals.as_interrupted(stop, self.run_dir, epoch + 1, self.saved_epoch) from None
        if last_eval is None:
            last_eval = self.evaluate()
        accuracy = last_eval.accuracy if last_eval else float("nan")
        return RunResult(
            run_dir=self.run_dir, accuracy=accuracy, accuracy_se=last_eval.standard_error if last_eval else float("nan"),
            wall_time=self.elapsed, images_seen=self.images_seen,
            images_per_second=self.images_seen / max(sum(r["epoch_time"] for r in history), 1e-9),
            epochs=end, history=history)

    def _fit_epoch(self, epoch: int, history: list[dict[str, Any]]) -> EvalResult | None:
        """Train, evaluate, log and checkpoint one epoch; a state that is not finite is never saved."""
        started = time.perf_counter()
        record = self.train_epoch(epoch)
        last_eval = None
        if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs:
            last_eval = self.evaluate()
            if last_eval is not None:
                record.update(test_acc=last_eval.accuracy, test_loss=last_eval.loss)
        if not faults.all_finite(self.method.state_dict().values()):  # e.g. BatchNorm statistics
            raise self._diverged(epoch, None, "the model's state (BatchNorm statistics?) is not finite")
        self.elapsed += time.perf_counter() - started
        record["elapsed"] = self.elapsed
        if distributed.is_main():
            with faults.writing(self.log.path, self._kept()):
                self.log.write(record)
        history.append(record)
        self.save(epoch + 1)
        return last_eval
