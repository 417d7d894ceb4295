"""Score single images or folders: verdicts, defect masks, overlays, calibration.

The command lives in :mod:`pipeline.prediction`; this script is its entry point (``python test_one_example.py --help``).
"""

from pipeline.prediction import main
from pipeline.cli import run_cli

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
