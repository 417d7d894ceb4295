"""Index the COVID-19 Radiography Database: ``python generate_dataset_json/covid.py --root DATASET_ROOT``.

Layout: ``<type>/*`` for every folder at the root (``NORMAL``, ``COVID``, ``Lung_Opacity``,
``Viral Pneumonia``), or ``<type>/images/*`` as in the later Kaggle releases (their lung masks
are not anomaly masks and are ignored). ``NORMAL`` (or ``Normal``) is normal, every other
folder anomalous; no masks; class ``chest``; test split only. Files at the root
(spreadsheets, ``meta.json``) are ignored.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import FolderLayout  # noqa: E402

LAYOUT = FolderLayout(
    name="COVID-19 Radiography",
    hint="ROOT/<type>/* or ROOT/<type>/images/* for every type folder; normal type NORMAL (or Normal); no masks",
    classes=("chest",),
    class_dir="",
    splits=(("test", ""),),
    normal_types=("NORMAL", "Normal"),
    masks="none",
    nested_images="images",
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
