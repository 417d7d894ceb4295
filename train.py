"""Learn AnomalyCLIP's object-agnostic prompts on an auxiliary dataset (method §6).

The command lives in :mod:`pipeline.training`; this script is its entry point (``python train.py --help``).
"""

from pipeline.training import main
from pipeline.cli import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
