"""Index MPDD: ``python generate_dataset_json/mpdd.py --root DATASET_ROOT``.

Layout: the MVTec AD one (``<class>/{train,test}/<type>/*.png``, masks
``<class>/ground_truth/<type>/<stem>_mask.png``, normal type ``good``).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import mvtec_style_layout  # noqa: E402

CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
LAYOUT = mvtec_style_layout("MPDD", CLASSES)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
