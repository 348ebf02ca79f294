"""Cost of KD³'s teacher-side contrastive term, and proof that dropping it is exact for the student.

Builds the fashion-wild KD³ run twice (teacher_contrastive on / off, same seed), trains both for the
same N steps on the same batches, checks the student weights are bit-identical, and times the steps
in process CPU time on one thread (robust to other work on the machine, unlike wall time).
Writes results/kd3-teacher-contrastive.md.

    .venv/bin/python benchmarks/kd3_teacher_contrastive.py [--steps 60] [--config configs/fashion-wild/kd3.yaml]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import torch

from kd3 import api
from kd3.config import DistillConfig, load_config
from kd3.engine import checkpoint
from kd3.methods.base import Batch


def train_steps(cfg: DistillConfig, steps: int) -> tuple[dict[str, torch.Tensor], float]:
    checkpoint.seed_everything(cfg.train.seed)
    method, *_ = api.build_distillation(cfg)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=cfg.train.lr, momentum=0.9, weight_decay=5e-4)
    plan = method.begin_epoch(0)
    order = plan.indices[torch.randperm(len(plan.indices))]
    method.train()
    seconds = 0.0
    for step in range(steps):
        idx = order[(step * cfg.train.batch_size) % len(order):][:cfg.train.batch_size]
        started = time.process_time()
        loss = sum(method.training_step(Batch(indices=idx, images=method.ctx.images[idx])).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 5:  # the first steps fill caches and warm up kernels
            seconds += time.process_time() - started
    return {k: v.clone() for k, v in method.student.state_dict().items()}, seconds / (steps - 5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/fashion-wild/kd3.yaml")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for on in (True, False):
        cfg = load_config(DistillConfig, args.config, [f"method.teacher_contrastive={str(on).lower()}", "progress=false"])
        results[on] = train_steps(cfg, args.steps)
    identical = all(torch.equal(results[True][0][k], results[False][0][k]) for k in results[True][0])
    ratio = results[False][1] / results[True][1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = f"""# KD³: the teacher-side contrastive term

`{' '.join(['python', 'benchmarks/kd3_teacher_contrastive.py', '--steps', str(args.steps), '--config', args.config])}`
commit {commit}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU.

| teacher_contrastive | CPU ms / step | student weights after {args.steps} steps |
|---|---|---|
| on (released) | {1000 * results[True][1]:.1f} | reference |
| off | {1000 * results[False][1]:.1f} | {'bit-identical' if identical else 'DIFFERENT'} |

Step cost with the term off = {ratio:.3f} × the cost with it on (a {100 * (1 - ratio):.1f}% saving).
"""
    Path("results").mkdir(exist_ok=True)
    Path("results/kd3-teacher-contrastive.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
