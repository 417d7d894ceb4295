"""Index HeadCT: ``python generate_dataset_json/head_ct.py --root DATASET_ROOT``.

Layout: ``brain/test/{good,<anomalous type>}/*``, no masks (image-level metrics only); class
``brain``, ``specie_name`` the type folder. A ``brain/train`` folder is indexed when present.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import FolderLayout  # noqa: E402

LAYOUT = FolderLayout(
    name="HeadCT",
    hint="ROOT/brain/test/{good,<anomalous type>}/* (no masks)",
    classes=("brain",),
    masks="none",
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
