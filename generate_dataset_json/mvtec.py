"""Index MVTec AD: ``python generate_dataset_json/mvtec.py --root DATASET_ROOT``.

Layout: ``<class>/{train,test}/<type>/*.png``, masks ``<class>/ground_truth/<type>/<stem>_mask.png``,
normal type ``good``. Classes are written in the original result-table order (method §7).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import mvtec_style_layout  # noqa: E402

CLASSES = ("carpet", "bottle", "hazelnut", "leather", "cable", "capsule", "grid", "pill",
           "transistor", "metal_nut", "screw", "toothbrush", "zipper", "tile", "wood")
LAYOUT = mvtec_style_layout("MVTec AD", CLASSES)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
