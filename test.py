"""Zero-shot evaluation of learned prompts on a dataset (method §7): metrics, scores, thresholds.

The command lives in :mod:`pipeline.evaluation`; this script is its entry point (``python test.py --help``).
"""

from pipeline.evaluation import main
from pipeline.cli import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
