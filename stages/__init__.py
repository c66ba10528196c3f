"""The pipeline's stage commands (`up ...`, see stages/cli.py).

Idle OpenMP threads sleep instead of spinning unless the user says otherwise:
next to one other busy process, a 2-thread training step then slows 1.85x
instead of 2.87x, at the same idle speed (bench/threads.md). libgomp reads the
variable when torch loads it, so it is set here, before anything imports torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
