"""Index BrainMRI: ``python generate_dataset_json/brainmri.py --root DATASET_ROOT``.

Layout: ``brain_tumor_dataset/{no,yes}/*`` (the Kaggle download unpacked in ROOT), no masks;
class ``brain``, normal type ``no``, ``specie_name`` ``no``/``yes``; test split only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import no_yes_layout  # noqa: E402

LAYOUT = no_yes_layout("BrainMRI", "brain_tumor_dataset")

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
