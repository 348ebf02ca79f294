"""Data-parallel training with torch.distributed, launched by torchrun; a no-op in one process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; ``init_from_env`` joins the process group (gloo on
CPU, nccl on GPU). What the engine does with it:

- whole-pool passes (scores, selection, teacher caches, evaluation) go through ``map_rows``: each
  rank computes a contiguous shard and the shards are all-gathered, so every rank holds the same
  per-image results and therefore the same selection;
- each global batch (``train.batch_size`` images, in an order rank 0 draws and broadcasts) is
  split into equal per-rank parts, and gradients are averaged over ranks after every backward
  (``average_gradients``): the update is the one the whole batch would give, up to float
  rounding and BatchNorm, whose batch statistics are per rank. This is done by hand rather than
  by wrapping the method in ``DistributedDataParallel`` because methods call backward inside
  their step (DAFL's generator, DeepInversion's pixels), which DDP's hooks do not allow;
- rank 0 alone writes checkpoints, metrics, reports and the exported student.

Methods never see ranks: they call ``map_rows`` for their passes and get batches from the engine.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kd3.engine import signals

Collective = TypeVar("Collective", bound=Callable[..., Any])


def _peer_loss_stops(collective: Collective) -> Collective:
    """``collective`` raising ``signals.PeerLost`` when it fails under torchrun: gloo and NCCL report a rank
    that was killed or crashed as a RuntimeError ("Connection closed by peer") in the others' next collective.
    As an ``Interrupted``, the trainer adds where the run stands, and the CLI names the resume command."""
    @functools.wraps(collective)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return collective(*args, **kwargs)
        except RuntimeError as error:
            if not active():
                raise
            raise signals.PeerLost(str(error)) from None
    return run  # type: ignore[return-value]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str) -> None:
    """Join torchrun's process group once; nothing when run as a single process."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)


def device_for_rank(device: torch.device) -> torch.device:
    """On GPU, each local rank drives its own card."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", local_rank())
    return device


@_peer_loss_stops
def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (building caches: a teacher, a pool, scores); the others wait
    and then run it too, finding what rank 0 built."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


@_peer_loss_stops
def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a run directory, an evaluation result)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@_peer_loss_stops
def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (same shape and dtype everywhere)."""
    if not active():
        return tensor
    data = tensor.to(_comm_device(tensor))
    dist.broadcast(data, src=0)
    return data.to(tensor.device)


@_peer_loss_stops
def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def shard_bounds(n: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n rows (the last shards may be shorter)."""
    per = -(-n // world_size())
    start = min(rank() * per, n)
    return start, min(start + per, n)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else tensor.device


@_peer_loss_stops
def _gather_rows(full: torch.Tensor, n: int) -> torch.Tensor:
    """Fill ``full`` (world_size × per rows, this rank's shard already at its rows) with every rank's
    shard, in place, and return its first n rows. One buffer: no padded copy of the shard, no list of
    per-rank parts and no concatenation, which together held a pass's result four times over."""
    per = full.shape[0] // world_size()
    comm = _comm_device(full)
    buffer = full if comm == full.device else full.to(comm)  # nccl gathers on the GPU
    _all_gather_single(buffer, buffer[rank() * per:(rank() + 1) * per])
    if buffer is not full:
        full.copy_(buffer)
    return full[:n]


# all_gather_into_tensor is deprecated for all_gather_single in recent torch; older torch has only it.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def map_rows(n: int, batch_size: int, compute: Callable[[int, int], Sequence[torch.Tensor]],
             batches: Callable[[range], Iterator[int]] | None = None) -> list[torch.Tensor]:
    """Run ``compute(start, stop)`` over rows [0, n) in batches and concatenate its outputs.

    ``compute`` returns a sequence of tensors with ``stop - start`` rows each. Under torchrun each
    rank covers its own shard and the results are all-gathered, so every rank returns the same
    full tensors. ``batches`` may wrap the batch starts (a progress bar).
    """
    start, stop = shard_bounds(n)
    starts = range(start, stop, batch_size)
    # The outputs are allocated once, at their full size, when the first batch shows their shapes, and
    # each batch is written at its rows: collecting per-batch pieces and concatenating them would hold
    # the result twice and leave thousands of small long-lived allocations scattered through the heap
    # (seen as 2 GB of RSS on a 1M-image pool). Under torchrun the buffer has room for every rank's
    # shard (padded to equal length) and is gathered in place.
    rows = world_size() * -(-n // world_size()) if active() else n
    full: list[torch.Tensor] | None = None
    for begin in (batches(starts) if batches else starts):
        end = min(begin + batch_size, stop)
        outputs = compute(begin, end)
        if full is None:
            full = [torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in outputs]
        for buffer, part in zip(full, outputs):
            buffer[begin:end] = part
    if full is None:
        if not active():
            raise ValueError("no rows to process")
        # An empty shard still has to take part in the gather: learn the shapes from a one-row probe.
        full = [torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in compute(0, min(1, n))]
    if not active():
        return full
    return [_gather_rows(t, n) for t in full]


@_peer_loss_stops
def average_gradients(parameters: Sequence[nn.Parameter], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average the gradients of ``parameters`` over ranks in one flat all-reduce.

    A parameter without a gradient on some rank counts as zero there; one without a gradient on
    every rank keeps ``grad = None`` (so SGD still skips it, as in one process). ``extra`` (e.g. the
    step's loss) rides along and comes back averaged: a rank whose loss is not finite makes the
    average non-finite on every rank, so all ranks stop together instead of waiting on each other.
    """
    if not active():
        return extra
    params = list(parameters)
    if not params:
        return extra
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    pieces = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
              for p in params]
    pieces += [flags] + ([extra.detach().float().reshape(-1)] if extra is not None else [])
    flat = torch.cat([piece.float() for piece in pieces]).to(_comm_device(params[0]))
    dist.all_reduce(flat)
    flat = flat.to(params[0].device) / world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
    had_grad = flat[offset:offset + len(params)] > 0
    offset += len(params)
    for p, keep in zip(params, had_grad.tolist()):
        if not keep:
            p.grad = None
    return flat[offset:].reshape(()) if extra is not None else None


@_peer_loss_stops
def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (at start; BatchNorm statistics each epoch)."""
    if not active():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        data = tensor.data.to(_comm_device(tensor))
        dist.broadcast(data, src=0)
        tensor.data.copy_(data.to(tensor.device))


@_peer_loss_stops
def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Per-key sums over ranks (epoch loss sums, image counts)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    totals = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        totals = totals.to(torch.device("cuda", local_rank()))
    dist.all_reduce(totals)
    return dict(zip(keys, totals.cpu().tolist()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``) on ``argv``, as kd3's launcher runs it: its own logging silenced and
    its exceptions turned into an exit code (what kd3 says is the wrapper's one line, kd3.cli), the failed ranks'
    exit codes written to the ``signals.LAUNCH_STATUS_ENV`` folder. A rank's own output (progress, errors) is untouched."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun's loggers: most inherit torch.distributed's level, some set their own (from $LOGLEVEL) on import.
    for name in ["torch.distributed", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as error:
        codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
        if os.environ.get(signals.LAUNCH_STATUS_ENV):
            (Path(os.environ[signals.LAUNCH_STATUS_ENV]) / signals.LAUNCHER_STATUS).write_text(json.dumps({"failures": codes}))
        first = codes[min(codes)]
        return 128 - first if first < 0 else first  # a rank killed by signal N: 128 + N, as a shell says it
    except SignalException as error:  # torchrun has stopped its ranks with the same signal
        return 128 + int(error.sigval)
    return 0
