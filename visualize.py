"""Heat-map overlays of anomaly maps, as the original draws them (JET colour map blended at 0.5)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from AnomalyCLIP_lib.transform import load_image
from atomic import atomic_write_bytes


def min_max_normalize(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range; a constant array gives zeros."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def overlay(image_path: str | os.PathLike, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 ``(S, S, 3)``: the image resized to the map's size, blended with the JET map.

    The map is min-max normalised per image, as in the original's ``visualizer``.
    """
    side = anomaly_map.shape[-1]
    image = np.asarray(load_image(image_path).convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float64)
    heat = cv2.applyColorMap((min_max_normalize(anomaly_map) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return (alpha * image + (1 - alpha) * heat).astype(np.uint8)


def save_overlay(image_path: str | os.PathLike, anomaly_map: np.ndarray, out_path: str | os.PathLike) -> Path:
    """Write the overlay as PNG to ``out_path`` (atomically); returns the path."""
    out_path = Path(out_path).with_suffix(".png")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overlay(image_path, anomaly_map), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {out_path}")
    atomic_write_bytes(encoded.tobytes(), out_path)
    return out_path
