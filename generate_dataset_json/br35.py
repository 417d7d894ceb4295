"""Index Br35H: ``python generate_dataset_json/br35.py --root DATASET_ROOT``.

Layout: ``{no,yes}/*`` at the root, no masks; class ``brain``, normal type ``no``; test split
only. Other folders (the download's ``pred/``) and files (``meta.json``) are ignored.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import no_yes_layout  # noqa: E402

LAYOUT = no_yes_layout("Br35H", "")

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
