"""Index BTAD: ``python generate_dataset_json/btad.py --root DATASET_ROOT``.

Layout: ``<class>/{train,test}/{ok,ko}/*``, masks ``<class>/ground_truth/ko/<stem>.png`` or ``.bmp``
(same stem as the image, no suffix; the extension may differ: class 01 has ``.bmp`` images and
``.png`` masks). Normal type ``ok``; within a class ``ko`` items come before ``ok`` ones, as in
the original.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_dataset_json.indexer import FolderLayout, MaskRule  # noqa: E402

LAYOUT = FolderLayout(
    name="BTAD",
    hint="ROOT/<class>/{train,test}/{ok,ko}/* with masks ROOT/<class>/ground_truth/ko/<stem>.png|.bmp",
    classes=("01", "02", "03"),
    normal_types=("ok",),
    mask_rule=MaskRule("", (".png", ".bmp")),
)

if __name__ == "__main__":
    from generate_dataset_json.command import run

    sys.exit(run(LAYOUT))
