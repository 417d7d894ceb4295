"""Index CVC-ClinicDB: ``python generate_dataset_json/clinicDB.py --root DATASET_ROOT``.

Layout: ``images/*`` with masks ``masks/<same file name>``; every image is anomalous; class
``colon``; ``specie_name`` is ``""``; test split only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import images_masks_layout  # noqa: E402

LAYOUT = images_masks_layout("CVC-ClinicDB", "colon", "images", "masks")

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
