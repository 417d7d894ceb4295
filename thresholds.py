"""Decision thresholds: how they are chosen from data, and the ``thresholds.json`` file that holds them.

A value is flagged (image anomalous, pixel defective) when ``value >= threshold``: the same rule as
scikit-learn's ``precision_recall_curve`` thresholds, so an F1-max threshold applies as it is.

Two ways to choose them (``METHODS``):

- ``f1``: the thresholds that attain the image and pixel F1-max on labelled data
  (:func:`metrics.decision_metrics`);
- ``normal_fpr``: from normal data only. The threshold is the smallest float32 value that at most
  ``floor(target_fpr * n)`` of the ``n`` normal values reach; with ``target_fpr = 0.01`` at most 1 %
  of good parts (or good pixels) are flagged. This is the zero-shot deployment case, where a user has
  good parts only.

The file::

    {"version": 1, "classes": {"<class>": {"image_threshold": float, "pixel_threshold": float,
                                           "method": "f1" | "normal_fpr", ...}}, ...}

Kept free of torch so the deployment runtimes can read it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from atomic import atomic_write_text

THRESHOLDS_VERSION = 1
METHODS = ("f1", "normal_fpr")


def check_target_fpr(target_fpr: float) -> float:
    """Return ``target_fpr`` when it is a fraction in [0, 1), else raise a one-line error."""
    if not (isinstance(target_fpr, (int, float)) and 0.0 <= target_fpr < 1.0):
        raise AnomalyCLIPError(f"--target_fpr {target_fpr} is not a fraction in [0, 1): give e.g. 0.01 for 1 %")
    return float(target_fpr)


def allowed_false_positives(n_normal: int, target_fpr: float) -> int:
    """How many of ``n_normal`` normal values may reach the threshold at ``target_fpr``."""
    return math.floor(check_target_fpr(target_fpr) * n_normal + 1e-9)


def _just_above(value: float) -> float:
    """The smallest float32 strictly greater than ``value`` (a float32), as a Python float."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


class NormalTail:
    """Exact ``normal_fpr`` threshold over a stream of normal values, keeping only the top tail.

    ``total`` is the number of normal values that will be given (known up front from the dataset
    index: images × pixels). Memory is ``4 * (floor(target_fpr * total) + 1)`` bytes.
    """

    def __init__(self, total: int, target_fpr: float) -> None:
        if total <= 0:
            raise AnomalyCLIPError("no normal values to calibrate a threshold from: give at least one good image")
        self.total = total
        self.allowed = allowed_false_positives(total, target_fpr)
        self._keep = self.allowed + 1
        self._top = np.empty(0, dtype=np.float32)
        self.seen = 0

    def update(self, values: np.ndarray) -> None:
        """Add a batch of normal values (any shape; cast to float32)."""
        flat = np.asarray(values, dtype=np.float32).ravel()
        self.seen += flat.size
        if self.seen > self.total:
            raise ValueError(f"NormalTail was given {self.seen} values, more than the announced {self.total}")
        merged = np.concatenate([self._top, flat])
        if merged.size > self._keep:
            merged = np.partition(merged, merged.size - self._keep)[merged.size - self._keep:]
        self._top = merged

    def threshold(self) -> float:
        """The smallest float32 threshold that at most ``allowed`` of the values reach."""
        if self.seen != self.total:
            raise ValueError(f"NormalTail saw {self.seen} values, {self.total} were announced")
        if np.isnan(self._top).any():
            raise AnomalyCLIPError("the normal scores hold NaN: the model produced invalid values")
        # The (allowed + 1)-th largest value must not be flagged, so the threshold lies just above it.
        return _just_above(float(self._top.min()))


def normal_fpr_threshold(normal_values: np.ndarray, target_fpr: float) -> float:
    """The ``normal_fpr`` threshold of one array of normal values (image scores, or pixels)."""
    values = np.asarray(normal_values, dtype=np.float32).ravel()
    tail = NormalTail(values.size, target_fpr)
    tail.update(values)
    return tail.threshold()


def class_entry(image_threshold: float, pixel_threshold: float | None, method: str, **fields: object) -> dict:
    """One class's entry of ``thresholds.json``."""
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; expected one of {METHODS}")
    entry: dict[str, object] = {"image_threshold": _finite_or_none(image_threshold),
                                "pixel_threshold": _finite_or_none(pixel_threshold), "method": method}
    entry.update(fields)
    return entry


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def save_thresholds(path: str | os.PathLike, classes: dict[str, dict], **fields: object) -> Path:
    """Write ``thresholds.json`` atomically; ``fields`` are extra top-level keys (source, fpr, ...)."""
    document = {"version": THRESHOLDS_VERSION, **fields, "classes": classes}
    return atomic_write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", path)


def load_thresholds(path: str | os.PathLike) -> dict[str, dict]:
    """Read and check ``thresholds.json``; returns its ``classes`` mapping."""
    path = Path(path)
    if not path.is_file():
        raise AnomalyCLIPError(f"thresholds file {path} does not exist: give the thresholds.json written by "
                               "test.py or by test_one_example.py --calibrate")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnomalyCLIPError(f"thresholds file {path} is not readable JSON ({exc}): write it again") from None
    classes = document.get("classes") if isinstance(document, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise AnomalyCLIPError(f"thresholds file {path} has no 'classes' mapping: it is not a thresholds.json")
    for name, entry in classes.items():
        if not isinstance(entry, dict) or "image_threshold" not in entry:
            raise AnomalyCLIPError(f"thresholds file {path}: class {name!r} has no image_threshold")
    return classes


def select_thresholds(classes: dict[str, dict], class_name: str | None, source: str | os.PathLike = "thresholds"
                      ) -> tuple[float | None, float | None]:
    """``(image_threshold, pixel_threshold)`` of ``class_name``, or of the only class when None."""
    if class_name is None:
        if len(classes) != 1:
            raise AnomalyCLIPError(f"{source} holds {len(classes)} classes ({', '.join(sorted(classes))}): "
                                   "choose one with --class_name")
        class_name = next(iter(classes))
    if class_name not in classes:
        raise AnomalyCLIPError(f"{source} has no class {class_name!r}; it has: {', '.join(sorted(classes))}")
    entry = classes[class_name]
    return entry.get("image_threshold"), entry.get("pixel_threshold")
