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

:func:`choose_class_thresholds` applies these rules to one class's evaluation results (test.py).

Kept free of torch so the deployment runtimes can read it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.pretrained import backbone_sha256, sha256_of
from pipeline import strict_json
from pipeline.atomic import atomic_write_text
from pipeline.config import ModelSpec, ScoringSpec
from pipeline.threshold_values import check_classes, summed_layers  # noqa: F401 - re-exported

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


def thresholds_text(classes: dict[str, dict], **fields: object) -> str:
    """The text of ``thresholds.json``; ``fields`` are extra top-level keys (source, fpr, ...)."""
    document = {"version": THRESHOLDS_VERSION, **fields, "classes": classes}
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def save_thresholds(path: str | os.PathLike, classes: dict[str, dict], **fields: object) -> Path:
    """Write ``thresholds.json`` atomically (:func:`thresholds_text`)."""
    return atomic_write_text(thresholds_text(classes, **fields), path)


def load_thresholds(path: str | os.PathLike) -> dict[str, dict]:
    """Read and check ``thresholds.json``; returns its ``classes`` mapping."""
    path = Path(path)
    if not path.is_file():
        raise AnomalyCLIPError(f"thresholds file {path} does not exist: give the thresholds.json written by "
                               "test.py or by test_one_example.py --calibrate")
    document = strict_json.read_file(
        path, twice=lambda key: f"thresholds file {path} lists {key!r} twice in one object, and only the last "
                                "would be used: keep one",
        unreadable=lambda error: f"thresholds file {path} is not readable JSON ({error}): write it again",
        what="thresholds file")
    return thresholds_classes(document, f"thresholds file {path}")


def thresholds_classes(document: object, source: str) -> dict[str, dict]:
    """The checked ``classes`` of a thresholds.json document already parsed (a file's, or a service request's).

    Args:
        document: The parsed JSON.
        source: What the messages name (``thresholds file X``, ``the PUT /thresholds body``).
    """
    classes = document.get("classes") if isinstance(document, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise AnomalyCLIPError(f"{source} has no 'classes' mapping: it is not a thresholds.json")
    version = document.get("version", THRESHOLDS_VERSION)
    if version != THRESHOLDS_VERSION or isinstance(version, bool):
        raise AnomalyCLIPError(f"{source} has version {version!r}, this code reads "
                               f"{THRESHOLDS_VERSION}: write it again with this version's test.py or "
                               "test_one_example.py --calibrate")
    check_classes(classes, source)
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


# --------------------------------------------------------------------------------------------
# Provenance: what the maps a threshold was chosen on depended on
# --------------------------------------------------------------------------------------------

# The settings a threshold holds for, each with the flag that sets it (in the order an error lists them).
PROVENANCE_FLAGS = {"checkpoint_sha256": "--checkpoint_path", "backbone_sha256": "--backbone",
                    "image_size": "--image_size", "sigma": "--sigma", "features_list": "--features_list",
                    "feature_map_layer": "--feature_map_layer", "precision": "--precision",
                    "memory": "the few-shot memory"}
# A record written before the precision was recorded was made in fp32 (the only CPU precision then).
PROVENANCE_DEFAULTS = {"precision": "fp32"}
ACCEPT_FLAG = "--accept_thresholds"


def provenance_record(model: ModelSpec, scoring: ScoringSpec, manifest: dict | None = None) -> dict[str, object]:
    """The settings that shape a run's scores and maps: what a threshold chosen on them holds for.

    Args:
        model: The run's model settings (with an export, already the export's).
        scoring: The run's scoring settings.
        manifest: The export's ``anomalyclip.json`` when an exported graph scores: its recorded
            SHA-256s are used instead of hashing files again.
    """
    if manifest is not None:
        checkpoint, backbone = manifest["checkpoint"]["sha256"], manifest["backbone"]["sha256"]
    else:
        checkpoint, backbone = sha256_of(scoring.checkpoint_path), backbone_sha256(model.backbone)
    return {"checkpoint_sha256": checkpoint, "backbone_sha256": backbone, "image_size": int(model.image_size),
            "sigma": float(scoring.sigma), "features_list": sorted(int(layer) for layer in model.features_list),
            "feature_map_layer": int(model.feature_map_layer), "precision": scoring.precision}


def provenance_mismatches(recorded: object, current: dict[str, object]) -> list[str]:
    """How a class's recorded provenance differs from this run's, one phrase per setting (empty: it matches)."""
    if not isinstance(recorded, dict):
        return ["it records no settings (written by hand or by an older version)"]
    differing = []
    for name, flag in PROVENANCE_FLAGS.items():
        # "memory": only where a memory scored; "precision": fp32 in a record older than it
        theirs, ours = recorded.get(name, PROVENANCE_DEFAULTS.get(name)), current.get(name)
        if name == "features_list" and isinstance(theirs, list):
            theirs = sorted(theirs)
        if theirs == ours or (name == "sigma" and isinstance(theirs, (int, float)) and float(theirs) == ours):
            continue
        if name == "memory":
            differing.append(_memory_difference(theirs, ours))
        elif name.endswith("_sha256"):
            differing.append(f"{flag} (another file than the thresholds were made with)")
        else:
            differing.append(f"{flag} {_shown(ours)} against the thresholds' {_shown(theirs)}")
    return differing


def _memory_text(memory: object) -> str:
    if not isinstance(memory, dict):
        return "zero-shot (no memory)"
    return f"a memory of {memory.get('k')} reference(s), weight {memory.get('weight')}"


def _memory_difference(theirs: object, ours: object) -> str:
    """The few-shot memory's part of a mismatch: zero-shot against few-shot, or another memory."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return (f"another few-shot memory ({_memory_text(ours)}, against the thresholds' {_memory_text(theirs)}; "
                "other references or memory settings)")
    return f"scores of {_memory_text(ours)} against the thresholds' {_memory_text(theirs)}"


def check_provenance(classes: dict[str, dict], names: list[str], current: dict[str, object], source: str,
                     accept: bool = False) -> list[str]:
    """Refuse thresholds chosen on maps made with other settings than this run's, unless ``accept``.

    Args:
        classes: The ``classes`` of a thresholds file.
        names: The classes that will be used.
        current: This run's :func:`provenance_record`.
        source: The file (or manifest) the thresholds come from, for the message.
        accept: The override (``--accept_thresholds``): differences are returned, not refused.

    Returns:
        The differences found (``class: phrase``), empty when everything matches.

    Raises:
        AnomalyCLIPError: Some setting differs and ``accept`` is off; one line naming the setting and both values.
    """
    differences = [f"{name}: {phrase}" if len(names) > 1 else phrase
                   for name in names for phrase in provenance_mismatches(classes[name].get("provenance"), current)]
    if differences and not accept:
        raise AnomalyCLIPError(f"{source} was made for other settings than this run: {'; '.join(differences)}; "
                               "thresholds only hold for the maps they were chosen on: make them again with these "
                               f"settings (test.py or test_one_example.py --calibrate), or use them anyway with "
                               f"{ACCEPT_FLAG}")
    return differences


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return " ".join(map(str, value)) if isinstance(value, list) else "none" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# One class of an evaluation run
# --------------------------------------------------------------------------------------------


def _none_if_nan(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
    """F1 of a confusion count; 0 when nothing is flagged and nothing is anomalous."""
    denominator = 2 * true_positives + false_positives + false_negatives
    return 2 * true_positives / denominator if denominator else 0.0


def normal_pixel_threshold(maps: np.ndarray, normal_images: Iterable[int], n_normal: int, target_fpr: float) -> float:
    """The ``normal_fpr`` threshold over every pixel of the listed normal images, one image at a time.

    Args:
        maps: (N, H, W) anomaly maps.
        normal_images: Indices of the normal images.
        n_normal: How many indices ``normal_images`` yields (announced to :class:`NormalTail`).
        target_fpr: Fraction of normal pixels that may be flagged.
    """
    tail = NormalTail(n_normal * maps.shape[1] * maps.shape[2], target_fpr)
    for i in normal_images:
        tail.update(maps[i])
    return tail.threshold()


def _flagged_fraction(maps: np.ndarray, images: np.ndarray, threshold: float) -> float:
    """Fraction of the pixels of ``images`` with ``map >= threshold``."""
    flagged = sum(int(np.count_nonzero(maps[i] >= threshold)) for i in images)
    return flagged / (len(images) * maps.shape[1] * maps.shape[2])


def _confusion(flagged: np.ndarray, anomalous: np.ndarray) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of boolean flags against boolean truth."""
    hits = int(np.count_nonzero(flagged & anomalous))
    return hits, int(np.count_nonzero(flagged)) - hits, int(np.count_nonzero(anomalous)) - hits


def _pixel_f1_at(maps: np.ndarray, masks: np.ndarray, threshold: float) -> float:
    """Pixel F1 of ``map >= threshold`` against ``masks != 0``, one image at a time."""
    counts = np.zeros(3, dtype=np.int64)
    for anomaly_map, mask in zip(maps, masks):
        counts += _confusion(anomaly_map >= threshold, mask != 0)
    return _f1(*(int(c) for c in counts))


def choose_class_thresholds(
    labels: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    f1_thresholds: tuple[float, float],
    method: str = "f1",
    target_fpr: float = 0.01,
) -> dict[str, object]:
    """One class's ``thresholds.json`` entry from its evaluation results.

    ``f1`` takes the F1-max thresholds where they are defined; where one is not (a class without
    anomalous or without normal images, data without masks), that threshold falls back to
    ``normal_fpr`` and the entry says so in ``method`` / ``pixel_method`` and ``warning``.
    ``normal_fpr`` uses the normal images only: their scores, and every pixel of their maps.

    Args:
        labels: (N,) 0/1 image labels (1 = anomalous).
        scores: (N,) image scores.
        maps: (N, H, W) anomaly maps.
        masks: (N, H, W) ground truth, or None when the data have no masks.
        f1_thresholds: (image, pixel) F1-max thresholds, NaN where undefined.
        method: ``f1`` or ``normal_fpr``.
        target_fpr: Fraction of normal images / pixels ``normal_fpr`` may flag.

    Returns:
        The entry: ``image_threshold``, ``pixel_threshold``, ``method`` (the image threshold's),
        ``pixel_method``, ``target_fpr``, the image and pixel counts, the F1 each threshold
        attains on this class (None without both labels), the fraction of normal images and of
        normal-image pixels each flags, and ``warning`` (None, or why ``f1`` was not used or a
        threshold is missing).
    """
    if method not in METHODS:
        raise ValueError(f"unknown threshold method {method!r}; expected one of {METHODS}")
    check_target_fpr(target_fpr)
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float32).ravel()
    normal = np.flatnonzero(labels == 0)
    anomalous = labels == 1
    notes = []
    image_threshold, image_method = _none_if_nan(f1_thresholds[0]) if method == "f1" else None, method
    if image_threshold is None and normal.size:
        if method == "f1":
            notes.append("image: f1 needs normal and anomalous images")
        image_threshold, image_method = normal_fpr_threshold(scores[normal], target_fpr), "normal_fpr"
    pixel_threshold, pixel_method = _none_if_nan(f1_thresholds[1]) if method == "f1" else None, method
    if pixel_threshold is None and normal.size:
        if method == "f1":
            notes.append("pixel: f1 needs masks with anomalous and normal pixels")
        pixel_threshold, pixel_method = normal_pixel_threshold(maps, normal, normal.size, target_fpr), "normal_fpr"
    for level, threshold in (("image", image_threshold), ("pixel", pixel_threshold)):
        if threshold is None:
            notes.append(f"{level}: no threshold, the class has no normal image")
    both_labels = bool(normal.size) and bool(anomalous.any())
    image_flags = scores >= image_threshold if image_threshold is not None else None
    return class_entry(
        image_threshold, pixel_threshold, image_method,
        pixel_method=pixel_method,
        target_fpr=float(target_fpr),
        n_normal_images=int(normal.size),
        n_anomalous_images=int(anomalous.sum()),
        n_normal_pixels=int(normal.size * maps.shape[1] * maps.shape[2]),
        image_f1=_f1(*_confusion(image_flags, anomalous)) if both_labels and image_flags is not None else None,
        pixel_f1=(_pixel_f1_at(maps, masks, pixel_threshold)
                  if masks is not None and pixel_threshold is not None and np.any(masks) else None),
        normal_image_fpr=float(np.mean(image_flags[normal])) if normal.size and image_flags is not None else None,
        normal_pixel_fpr=(_flagged_fraction(maps, normal, pixel_threshold)
                          if normal.size and pixel_threshold is not None else None),
        warning="; ".join(notes) or None,
    )
