"""Index Endo (EndoTect 2020 segmentation set): ``python generate_dataset_json/endoTect.py --root DATASET_ROOT``.

Layout: ``<type>/*`` for every folder at the root but ``masks`` (the download has ``images``),
masks ``masks/<same file name>``; every image is anomalous; class ``colon``; ``specie_name`` the
type folder (``images``); test split only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import FolderLayout, MaskRule  # noqa: E402

LAYOUT = FolderLayout(
    name="Endo",
    hint="ROOT/<type>/* (e.g. ROOT/images/*) with masks ROOT/masks/<same file name>; every image is anomalous",
    classes=("colon",),
    class_dir="",
    splits=(("test", ""),),
    exclude_types=("masks",),
    normal_types=(),
    mask_dir="masks",
    mask_rule=MaskRule(),
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
