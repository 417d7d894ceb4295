"""Index SDD (KolektorSDD, MVTec-style release): ``python generate_dataset_json/SDD.py --root DATASET_ROOT``.

Layout: ``electrical commutators/{train,test}/<type>/*``, masks
``electrical commutators/ground_truth/<type>/<stem>_mask.png``, normal type ``good``. The class
folder name contains a space; the train folder is optional.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import mvtec_style_layout  # noqa: E402

LAYOUT = mvtec_style_layout("SDD", ("electrical commutators",))

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
