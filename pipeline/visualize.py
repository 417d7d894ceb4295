"""Heat-map overlays of anomaly maps (the original's JET blend at 0.5) and binary defect masks.

Two colour scales (``VIS_SCALES``):

- ``per_image``: the map min-max normalised by its own range, as the original's ``visualizer``
  draws it. Every image then shows a red spot, even a perfect part.
- ``fixed``: relative to the pixel threshold ``t``: ``clip(map / (2 t), 0, 1)``, so ``t`` sits in
  the middle of the scale (green), values at ``2 t`` and above are red and a normal image, whose
  map stays below ``t``, looks calm (blue to green). Comparable across images.

A defect mask is ``map >= t`` after the map is resized to the image's own size, bilinearly, the
way the overlay resizes the image (PIL's bilinear filter).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from AnomalyCLIP_lib.images import load_image
from pipeline.atomic import atomic_write_bytes

VIS_SCALES = ("fixed", "per_image")
CONTOUR_RGB = (255, 255, 255)


def min_max_normalize(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range; a constant array gives zeros."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def threshold_scale(values: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """``clip(values / (2 * pixel_threshold), 0, 1)``: the threshold maps to 0.5."""
    if not pixel_threshold > 0:
        raise ValueError(f"the fixed colour scale needs a positive pixel threshold, got {pixel_threshold}")
    return np.clip(np.asarray(values, dtype=np.float64) / (2.0 * pixel_threshold), 0.0, 1.0)


def colour_scale(anomaly_map: np.ndarray, scale: str = "per_image", pixel_threshold: float | None = None) -> np.ndarray:
    """The map in [0, 1] as it is coloured: ``per_image`` min-max or ``fixed`` (see the module)."""
    if scale == "per_image":
        return min_max_normalize(anomaly_map)
    if scale == "fixed":
        if pixel_threshold is None:
            raise ValueError("the fixed colour scale needs a pixel threshold")
        return threshold_scale(anomaly_map, pixel_threshold)
    raise ValueError(f"unknown colour scale {scale!r}; expected one of {VIS_SCALES}")


_BAND_ROWS = 256  # rows of a map coloured or blended at a time (bounded float64 temporaries)


def colour_indices(anomaly_map: np.ndarray, scale: str = "per_image", pixel_threshold: float | None = None
                   ) -> np.ndarray:
    """``uint8(colour_scale(map) * 255)``, computed in row bands (the same values; bounded memory on large maps)."""
    values = np.asarray(anomaly_map)
    if scale == "per_image" and values.size:
        low, high = float(values.min()), float(values.max())  # the whole map's range, as min_max_normalize's
        bounds = np.array([low, high], dtype=np.float64)
    indices = np.empty(values.shape, dtype=np.uint8)
    for top in range(0, values.shape[0], _BAND_ROWS):
        band = values[top:top + _BAND_ROWS]
        if scale == "per_image":
            scaled = _normalized_band(band, bounds)
        else:
            scaled = colour_scale(band, scale, pixel_threshold)
        indices[top:top + _BAND_ROWS] = (scaled * 255).astype(np.uint8)
    return indices


def _normalized_band(band: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """:func:`min_max_normalize`'s arithmetic on a band, with the whole map's minimum and maximum."""
    band = np.asarray(band, dtype=np.float64)
    span = bounds[1] - bounds[0]
    return (band - bounds[0]) / span if span > 0 else np.zeros_like(band)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map (float32) resized bilinearly to ``size = (width, height)``, as PIL resizes the image."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if (values.shape[1], values.shape[0]) == tuple(size):
        return values.copy()
    return np.asarray(Image.fromarray(values).resize(tuple(size), Image.BILINEAR), dtype=np.float32)


def defect_mask(anomaly_map: np.ndarray, pixel_threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(height, width)`` mask: the map resized to ``size = (width, height)``, ``>= pixel_threshold``."""
    return resize_map(anomaly_map, size) >= np.float32(pixel_threshold)


def mask_contours(mask: np.ndarray, out_side: int | tuple[int, int]) -> list[np.ndarray]:
    """Outer and hole contours of a ``(H, W)`` mask, scaled to an ``out_side`` square image (or ``(width, height)``)."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    height, width = mask.shape
    out_width, out_height = (out_side, out_side) if isinstance(out_side, int) else out_side
    factor = np.array([out_width / width, out_height / height])
    return [np.round((c.astype(np.float64) + 0.5) * factor - 0.5).astype(np.int32) for c in contours]


def overlay(image_path: str | os.PathLike, anomaly_map: np.ndarray, alpha: float = 0.5, scale: str = "per_image",
            pixel_threshold: float | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: the image resized to the map's size, blended with the JET map.

    Args:
        image_path: The image.
        anomaly_map: ``(H, W)`` map (``(S, S)``, or the native size of a tiled image's map).
        alpha: Weight of the image in the blend.
        scale: ``per_image`` (the original's) or ``fixed`` (needs ``pixel_threshold``).
        pixel_threshold: The pixel threshold of the ``fixed`` scale.
        mask: Optional defect mask at any size; its contours are drawn on top.
    """
    return overlay_image(load_image(image_path), anomaly_map, alpha, scale, pixel_threshold, mask)


def overlay_image(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, scale: str = "per_image",
                  pixel_threshold: float | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """:func:`overlay` of an image already decoded (as :func:`AnomalyCLIP_lib.images.load_image` reads it)."""
    height, width = anomaly_map.shape[-2:]
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap(colour_indices(anomaly_map, scale, pixel_threshold), cv2.COLORMAP_JET),
                        cv2.COLOR_BGR2RGB)
    # Blended in row bands: a native-size (tiled) overlay never holds float64 copies of the whole image.
    blended = np.empty((height, width, 3), dtype=np.uint8)
    pixels = np.asarray(image)
    for top in range(0, height, _BAND_ROWS):
        rows = slice(top, top + _BAND_ROWS)
        blended[rows] = (alpha * pixels[rows].astype(np.float64) + (1 - alpha) * heat[rows]).astype(np.uint8)
    if mask is not None and mask.any():
        cv2.drawContours(blended, mask_contours(mask, (width, height)), -1, CONTOUR_RGB, thickness=1)
    return blended


def encode_png(array: np.ndarray, rgb: bool = True) -> bytes:
    """PNG bytes of a uint8 RGB ``(H, W, 3)`` or grey ``(H, W)`` array."""
    pixels = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def save_overlay(image_path: str | os.PathLike, anomaly_map: np.ndarray, out_path: str | os.PathLike,
                 **overlay_args: object) -> Path:
    """Write the overlay as PNG to ``out_path`` (suffix set to ``.png``, atomically); returns the path.

    ``overlay_args`` go to :func:`overlay` (``scale``, ``pixel_threshold``, ``mask``).
    """
    out_path = Path(out_path).with_suffix(".png")
    atomic_write_bytes(encode_png(overlay(image_path, anomaly_map, **overlay_args)), out_path, durable=False)
    return out_path


def save_mask(mask: np.ndarray, out_path: str | os.PathLike) -> Path:
    """Write a boolean mask as a grey PNG, 255 where defective and 0 elsewhere (atomically)."""
    return atomic_write_bytes(mask_png(mask), Path(out_path), durable=False)


def mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as grey PNG bytes, 255 where defective and 0 elsewhere (the mask files' content)."""
    return encode_png(np.where(mask, 255, 0).astype(np.uint8), rgb=False)
