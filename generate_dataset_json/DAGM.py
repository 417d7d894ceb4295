"""Index DAGM 2007 (Kaggle upload): ``python generate_dataset_json/DAGM.py --root DATASET_ROOT``.

Layout: ``ClassK/{Train,Test}/*.PNG`` with labels ``ClassK/{Train,Test}/Label/<stem>_label.PNG``;
an image is anomalous iff it has a label (``Labels.txt`` is ignored). Written with the keys
``train``/``test`` (the original wrote ``Train``/``Test``, which its loader could not read);
``specie_name`` is ``""``; items sorted by file name.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import DagmLayout  # noqa: E402

LAYOUT = DagmLayout(
    name="DAGM 2007",
    hint="ROOT/ClassK/{Train,Test}/*.PNG with labels ROOT/ClassK/{Train,Test}/Label/<stem>_label.PNG",
    classes=tuple(f"Class{k}" for k in range(1, 11)),
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
