"""Index VisA: ``python generate_dataset_json/visa.py --root DATASET_ROOT``.

Reads ``split_csv/1cls.csv`` (columns object, split, label, image, mask) with the csv module
(the original needed pandas < 3). Paths are the CSV ones, items keep the CSV order,
``specie_name`` is ``""``; see :class:`generate_dataset_json.indexer.VisaLayout`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import VisaLayout  # noqa: E402

CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
           "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
LAYOUT = VisaLayout(
    name="VisA",
    hint="ROOT/split_csv/1cls.csv (columns object,split,label,image,mask) and the files it lists, "
    "e.g. ROOT/candle/Data/Images/Anomaly/000.JPG with ROOT/candle/Data/Masks/Anomaly/000.png",
    classes=CLASSES,
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
