"""Index DTD-Synthetic: ``python generate_dataset_json/DTD.py --root DATASET_ROOT``.

Layout: the MVTec AD one (``<class>/{train,test}/<type>/*.png``, masks
``<class>/ground_truth/<type>/<stem>_mask.png``, normal type ``good``); classes in the order of
the original (method §8).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import mvtec_style_layout  # noqa: E402

CLASSES = ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
           "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069")
LAYOUT = mvtec_style_layout("DTD-Synthetic", CLASSES)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
