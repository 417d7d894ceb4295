"""Score single images or folders: verdicts, defect masks, overlays, calibration.

The command lives in :mod:`pipeline.prediction`; this script is its entry point (``python test_one_example.py --help``).
"""

import os

# Idle OpenMP threads spin for a while before they sleep (OMP_WAIT_POLICY's default): on a CPU that
# other processes share, the spinning takes the core a sibling thread needs, and the torch path ran
# 30-100x slower (benchmarks/bench_busy_cpu.py). OpenMP reads this once, when torch loads, so it is set
# here, before any import; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.prediction import main  # noqa: E402 - after the environment above
from pipeline.cli import run_cli  # noqa: E402 - after the environment above

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
