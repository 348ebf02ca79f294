"""What the distributed tests launch under torchrun: ``kd3 distill`` that stops after some epochs.

    torchrun --standalone --nproc_per_node 2 tests/distributed_run.py STOP_AFTER CONFIG [key=value ...]

STOP_AFTER 0 runs to the end; otherwise the run ends after that many epochs, as a crash would,
leaving a run directory for ``--resume``.
"""
import sys

from kd3 import api
from kd3.config import DistillConfig, load_config
from kd3.engine import distributed

if __name__ == "__main__":
    stop_after, config, *overrides = sys.argv[1:]
    try:
        api.distill(load_config(DistillConfig, config, overrides), stop_after=int(stop_after) or None)
    finally:
        distributed.shutdown()
