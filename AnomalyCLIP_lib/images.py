"""Reading image and mask files as the preprocessing expects them (torch-free).

Used by the torch transform (:mod:`AnomalyCLIP_lib.transform`), the deployment runtime
(:mod:`deploy.runtime`), the overlays and the dataset indexers, so all read every file the same
way: 8-bit files stay in their stored mode (bit-identical to the original), high-bit-depth
single-channel files become ``'L'`` by a per-image min-max stretch, and every file Pillow cannot
read goes through :func:`read_image`, which raises :class:`UnreadableImageError` (one line naming it).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import AnomalyCLIPError, read_error_line

logger = logging.getLogger(__name__)

# The files an image folder is searched for (the dataset indexers, test_one_example.py), any case.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# What Pillow raises for a file it cannot read: UnidentifiedImageError is an OSError; some plugins'
# parsers raise SyntaxError or ValueError; DecompressionBombError is none of them (a plain Exception).
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Fits a dataset's file and an image given on the command line alike.
_REPLACE = "replace it, or remove it (and re-run the dataset indexer if a meta.json lists it)"
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class UnreadableImageError(AnomalyCLIPError):
    """A file Pillow cannot read; the message is one line naming it and the fix (:func:`unreadable_error`).

    Constructible from the message alone, as every exception a DataLoader worker re-raises must be.

    Attributes:
        path: The file.
        reason: Pillow's words (the exception's name when it has none).
        missing: The file does not exist.
        too_large: Its header claims more pixels than Pillow decodes safely (the header itself is readable).
        not_content: The file is not read for a cause outside it (its permissions, a failing disk):
            the message names that cause (:func:`errors.read_error_line`), not a corrupt file.
    """

    path: Path
    reason: str = ""
    missing: bool = False
    too_large: bool = False
    not_content: bool = False


def unreadable_error(what: str, path: str | Path, reason: str, missing: bool = False,
                     too_large: bool = False) -> UnreadableImageError:
    """The one line for a file Pillow cannot read (``what``: ``"image file"``, ``"mask file"``)."""
    if missing:
        line = f"{what} {path} does not exist; restore it, or re-run the dataset indexer if it was removed"
    elif too_large:
        line = (f"cannot read {what} {path}: its header claims more pixels than Pillow decodes safely ({reason}); "
                f"the file is corrupt or hostile: {_REPLACE}")
    else:
        line = f"cannot read {what} {path} ({reason}); the file is corrupt or not an image: {_REPLACE}"
    error = UnreadableImageError(line)
    error.path, error.reason, error.missing, error.too_large = Path(path), reason, missing, too_large
    return error


def read_image(path: str | Path, what: str = "image file", decode: bool = True, data: bytes | None = None
               ) -> Image.Image:
    """Open ``path`` with Pillow: the one place where Pillow's read errors become ours.

    Args:
        path: The file (with ``data``: only the name the messages give, e.g. an upload's file name).
        what: How the error names the file (``"image file"``, ``"mask file"``).
        decode: Decode every pixel (a file cut inside its pixel data is found only then); ``False``
            reads the header alone (a few kilobytes): size and mode are known, the pixels are not.
        data: The file's bytes, already in memory (an upload to the service); ``path`` is not opened.

    Returns:
        The image, its file closed (decoded unless ``decode`` is False).

    Raises:
        UnreadableImageError: Missing, not an image, cut short, or too large to decode safely.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's warning names no file and takes two raw lines: one line of ours instead (_warn_if_large).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path if data is None else io.BytesIO(data))
        with image:
            if decode:
                _warn_if_large(image, path, what)  # once a file, when decoded (not at the header check too)
                image.load()
            return image
    except READ_ERRORS as error:
        not_content = read_error_line(error, path, what) if isinstance(error, OSError) else None
        if not_content:  # permissions, a folder, a failing disk: not a corrupt file
            raised = UnreadableImageError(not_content)
            raised.path, raised.reason, raised.not_content = Path(path), not_content, True
            raise raised from error
        raise unreadable_error(what, path, str(error) or type(error).__name__,
                               missing=isinstance(error, FileNotFoundError),
                               too_large=isinstance(error, Image.DecompressionBombError)) from error


def _warn_if_large(image: Image.Image, path: str | Path, what: str) -> None:
    """One warning line naming a file over Pillow's decompression-bomb limit (up to twice it is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.size[0] * image.size[1]
    if limit and pixels > limit:
        logger.warning("warning: %s %s has %d pixels, over Pillow's decompression-bomb limit of %d; decoded anyway: "
                       "check it is the image you meant", what, path, pixels, limit)


def unreadable_headers(paths: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """The files among ``paths`` whose header Pillow cannot read, with the reason of each.

    Only headers are read (a few kilobytes a file), so a folder of images is checked before a
    model loads; a file cut inside its pixel data is found when it is decoded.
    """
    bad = []
    for path in paths:
        try:
            read_image(path, decode=False)
        except UnreadableImageError as error:
            if error.not_content:  # its own line: a permission or disk error, not a file to replace
                raise
            if not error.too_large:  # decoding refuses it, with its own line; the header is fine
                bad.append((error.path, error.reason))
    return bad


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Read an image file as the preprocessing expects it.

    Args:
        path: The image file (with ``data``: the name the messages give).
        data: The file's bytes, already in memory (see :func:`read_image`).

    Returns:
        The decoded PIL image in its stored mode for 8-bit files (untouched, so results match
        the original bit for bit); high-bit-depth single-channel files become ``'L'`` by a
        per-image min-max stretch (module docstring).

    Raises:
        AnomalyCLIPError: The file is missing or cannot be decoded.
    """
    image = read_image(path, "image file", data=data)
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
    image = read_image(path, "mask file")
    if image.mode in _HIGH_BIT_MODES:
        foreground = np.asarray(image) > 0
    else:
        foreground = np.asarray(image.convert("L")) > 0
    return Image.fromarray(foreground.astype(np.uint8) * 255, mode="L")
