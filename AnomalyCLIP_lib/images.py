"""Reading image and mask files as the preprocessing expects them (torch-free).

Used by the torch transform (:mod:`AnomalyCLIP_lib.transform`) and by the deployment runtime
(:mod:`AnomalyCLIP_lib.runtime`), so both read every file the same way: 8-bit files stay in their
stored mode (bit-identical to the original), high-bit-depth single-channel files become ``'L'``
by a per-image min-max stretch, and unreadable files raise one line naming them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import AnomalyCLIPError

# Fits a dataset's file and an image given on the command line alike.
_REPLACE = "replace it, or remove it (and re-run the dataset indexer if a meta.json lists it)"
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _open(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (so no file handle stays open), or raise naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError as error:
        raise AnomalyCLIPError(
            f"{what} {path} does not exist; restore it, or re-run the dataset indexer if it was removed"
        ) from error
    except Image.DecompressionBombError as error:  # an Exception, not an OSError
        raise AnomalyCLIPError(
            f"cannot read {what} {path}: its header claims more pixels than Pillow decodes safely ({error}); "
            "the file is corrupt or hostile: " + _REPLACE
        ) from error
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise unreadable_error(what, path, str(error)) from error


def unreadable_error(what: str, path: str | Path, reason: str) -> AnomalyCLIPError:
    """The one line for a file Pillow cannot read (``what``: ``"image file"``, ``"mask file"``)."""
    return AnomalyCLIPError(f"cannot read {what} {path} ({reason}); the file is corrupt or not an image: {_REPLACE}")


def unreadable_headers(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """The files among ``paths`` whose header Pillow cannot read, with the reason of each.

    Only headers are read (a few kilobytes a file), so a folder of images is checked before a
    model loads; a file cut inside its pixel data is found when it is decoded.
    """
    bad = []
    for path in paths:
        try:
            with Image.open(path):
                pass
        except Image.DecompressionBombError:  # decoding refuses it, with its own line; the header is fine
            continue
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            bad.append((Path(path), str(error) or type(error).__name__))
    return bad


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as the preprocessing expects it.

    Args:
        path: The image file.

    Returns:
        The decoded PIL image in its stored mode for 8-bit files (untouched, so results match
        the original bit for bit); high-bit-depth single-channel files become ``'L'`` by a
        per-image min-max stretch (module docstring).

    Raises:
        AnomalyCLIPError: The file is missing or cannot be decoded.
    """
    image = _open(path, "image file")
    if image.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_stretch_to_uint8(np.asarray(image)), mode="L")
    return image


def load_mask(path: str | Path) -> Image.Image:
    """Read a mask file and binarise it as the original does: luma ``> 0`` -> 255, else 0.

    Args:
        path: The mask file (any mode; high-bit-depth files are binarised on raw values).

    Returns:
        An ``'L'`` image holding only 0 and 255, the input of :func:`mask_transform`.

    Raises:
        AnomalyCLIPError: The file is missing or cannot be decoded.
    """
    image = _open(path, "mask file")
    if image.mode in _HIGH_BIT_MODES:
        foreground = np.asarray(image) > 0
    else:
        foreground = np.asarray(image.convert("L")) > 0
    return Image.fromarray(foreground.astype(np.uint8) * 255, mode="L")
