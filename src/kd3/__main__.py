"""``python -m kd3``: the ``kd3`` command, also what ``torchrun -m kd3 distill ...`` starts on each rank."""
import sys

from kd3.cli import main

sys.exit(main())
