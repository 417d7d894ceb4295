"""Index ISIC 2016 (ISBI 2016 Part 1 test set): ``python generate_dataset_json/isbi.py --root DATASET_ROOT``.

Layout: ``skin/test/<data folder>/*.jpg`` (e.g. ``ISBI2016_ISIC_Part1_Test_Data``), masks
``skin/ISBI2016_ISIC_Part1_Test_GroundTruth/<stem>_Segmentation.png``. Every type folder but
``good`` is anomalous; ``specie_name`` is the data folder's own name; class ``skin``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import FolderLayout, MaskRule  # noqa: E402

LAYOUT = FolderLayout(
    name="ISIC 2016",
    hint="ROOT/skin/test/<data folder>/*.jpg with masks "
    "ROOT/skin/ISBI2016_ISIC_Part1_Test_GroundTruth/<stem>_Segmentation.png",
    classes=("skin",),
    mask_dir="ISBI2016_ISIC_Part1_Test_GroundTruth",
    mask_rule=MaskRule("_Segmentation", (".png",)),
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
