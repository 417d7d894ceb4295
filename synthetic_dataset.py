"""Write a synthetic anomaly-detection dataset with exact masks (tests and the demo); see :mod:`pipeline.synthetic`.

    python synthetic_dataset.py --layout mvtec --root data/synth_mvtec --seed 0 --size 128
"""

import sys

from pipeline.cli import run_cli
from pipeline.synthetic import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
