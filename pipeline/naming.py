"""Where a run writes each image's files: one rule for every entry point.

An image's outputs mirror its path relative to the input root, with its extension kept, so
``a.png``, ``a.jpg`` and two ``000.png`` in different folders never overwrite each other:
``sub/a.png`` gives ``<folder>/sub/a.png.overlay.png`` and ``<folder>/sub/a.png.mask.png``.
``test_one_example.py`` mirrors the tree under ``--image_path`` into ``--save_path``; ``test.py --vis``
mirrors the dataset root into ``--save_path/imgs``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

OVERLAY_SUFFIX = ".overlay.png"
MASK_SUFFIX = ".mask.png"
VIS_FOLDER = "imgs"  # test.py --vis: overlays under save_path/imgs/


def output_path(folder: str | os.PathLike, relative: PurePath, suffix: str) -> Path:
    """``folder/<relative path with its extension><suffix>``, e.g. ``sub/a.png.overlay.png``."""
    relative = PurePath(relative)
    return Path(folder) / relative.parent / f"{relative.name}{suffix}"


def relative_to_root(file: str | os.PathLike, root: str | os.PathLike) -> PurePath:
    """``file``'s path under ``root``; a file outside ``root`` keeps only its name (never a path that escapes)."""
    relative = PurePath(os.path.relpath(os.path.abspath(file), os.path.abspath(root)))
    return PurePath(relative.name) if relative.parts[:1] == ("..",) else relative
