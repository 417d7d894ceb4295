"""Evaluation metrics of AnomalyCLIP (method §7) and the results table.

All functions take numpy arrays and return python floats:

* image level: :func:`image_auroc`, :func:`image_ap` (sklearn semantics);
* pixel level: :func:`pixel_auroc` (equal to sklearn's ``roc_auc_score`` on the flattened arrays,
  in bounded memory) and :func:`pixel_aupro`, whose default ``"cflow"`` mode reproduces the
  released ``cal_pro_score`` bit for bit without its per-threshold re-labelling, and whose
  ``"exact"`` mode is the MVTec AD official PRO integral;
* decision metrics: :func:`image_f1_max`, :func:`pixel_ap` and :func:`pixel_f1_max` (sklearn's
  precision-recall curve, the pixel ones in bounded memory), gathered by :func:`decision_metrics`;
* :func:`per_defect_type_auroc`: image and pixel AUROC of each defect type against the normals.
* :func:`pro_curve`: the PRO curve :func:`pixel_aupro` integrates, for plots.

The pixel AUROC, AP and F1-max share one counting step (:func:`_tie_counts`): the pixel scores
are split into two sorted copies and, chunk by chunk, every distinct score of one population is
counted in both, so ties are exact and no curve over all pixels is ever materialised.

A metric that is undefined for its input (a single image label, no anomalous or no normal
pixel, constant maps in cflow mode, fewer than two usable thresholds) returns NaN and emits an
:class:`UndefinedMetricWarning`; malformed input (mismatched shapes, NaN or infinite scores)
raises ``ValueError``.

:func:`format_results_table` renders per-class results exactly like the original test.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score
from tabulate import tabulate

IMAGE_AUROC = "image_auroc"
IMAGE_AP = "image_ap"
PIXEL_AUROC = "pixel_auroc"
PIXEL_AUPRO = "pixel_aupro"
IMAGE_F1_MAX = "image_f1_max"
IMAGE_F1_THRESHOLD = "image_f1_threshold"
PIXEL_AP = "pixel_ap"
PIXEL_F1_MAX = "pixel_f1_max"
PIXEL_F1_THRESHOLD = "pixel_f1_threshold"
DECISION_KEYS = (IMAGE_F1_MAX, IMAGE_F1_THRESHOLD, PIXEL_AP, PIXEL_F1_MAX, PIXEL_F1_THRESHOLD)

METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "image-level": (IMAGE_AUROC, IMAGE_AP),
    "pixel-level": (PIXEL_AUROC, PIXEL_AUPRO),
    "image-pixel-level": (PIXEL_AUROC, PIXEL_AUPRO, IMAGE_AUROC, IMAGE_AP),
}

AUPRO_MODES = ("cflow", "exact")

# 8-connectivity inside each image of an (N, H, W) stack, no connection between images: labelling
# a stack at once numbers regions image by image in raster order, as labelling each image does.
_STACKED_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_STACKED_8_CONNECTIVITY[1] = True

# Images are processed in groups of about this many pixels, so temporaries stay small.
_CHUNK_PIXELS = 1 << 20

# numpy's float32 sum is pairwise; every partial sum of 0/1 values up to this size is exact.
_FLOAT32_EXACT_COUNT = 1 << 24


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is undefined for its input and was returned as NaN."""


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined: {reason}; returning NaN", UndefinedMetricWarning, stacklevel=3)
    return math.nan


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def _image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten image labels and scores and check that their lengths match."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    return labels, scores


def _image_metric(
    name: str, sklearn_metric: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray, scores: np.ndarray
) -> float:
    labels, scores = _image_inputs(labels, scores)
    if np.unique(labels).size < 2:
        return _undefined(name, "the labels hold a single class")
    return float(sklearn_metric(labels, scores))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (``sklearn.metrics.roc_auc_score``).

    Args:
        labels: (N,) 0/1 image labels (1 = anomalous).
        scores: (N,) image anomaly scores.

    Returns:
        The AUROC, or NaN with an :class:`UndefinedMetricWarning` when only one label occurs.
    """
    return _image_metric("image AUROC", roc_auc_score, labels, scores)


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level average precision (``sklearn.metrics.average_precision_score``).

    Args:
        labels: (N,) 0/1 image labels (1 = anomalous).
        scores: (N,) image anomaly scores.

    Returns:
        The AP, or NaN with an :class:`UndefinedMetricWarning` when only one label occurs.
    """
    return _image_metric("image AP", average_precision_score, labels, scores)


# --------------------------------------------------------------------------------------------
# Pixel level: shared input handling
# --------------------------------------------------------------------------------------------


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring masks and maps to matching (N, H, W) stacks and reject non-finite scores."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    if maps.size == 0:
        raise ValueError("masks and maps are empty")
    if not (np.isfinite(maps.min()) and np.isfinite(maps.max())):
        raise ValueError("anomaly maps contain NaN or infinite values")
    return masks, maps


def _image_groups(maps: np.ndarray, images: np.ndarray | None) -> Iterator[slice | np.ndarray]:
    """Index consecutive groups of whole images (all of them, or the listed ``images``)."""
    step = max(1, _CHUNK_PIXELS // (maps.shape[1] * maps.shape[2]))
    if images is None:
        for start in range(0, len(maps), step):
            yield slice(start, start + step)
    else:
        for start in range(0, len(images), step):
            yield images[start : start + step]


def _chunks(
    masks: np.ndarray, maps: np.ndarray, images: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (anomalous-pixel boolean mask, map) for consecutive groups of whole images.

    With ``images`` (indices into the stacks) only those images are visited, a group at a time,
    so a subset is never copied whole.
    """
    for group in _image_groups(maps, images):
        yield masks[group] != 0, maps[group]


def _split_scores(
    masks: np.ndarray, maps: np.ndarray, images: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (normal pixel scores, anomalous pixel scores) as flat copies in the maps' dtype.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly scores.
        images: Indices of the images to use; all of them when None.
    """
    n_anomalous = sum(int(np.count_nonzero(masks[group])) for group in _image_groups(maps, images))
    n_pixels = maps.size if images is None else len(images) * maps.shape[1] * maps.shape[2]
    normal = np.empty(n_pixels - n_anomalous, dtype=maps.dtype)
    anomalous = np.empty(n_anomalous, dtype=maps.dtype)
    n_done = a_done = 0
    for chunk_mask, chunk_map in _chunks(masks, maps, images):
        values = chunk_map[chunk_mask]
        anomalous[a_done : a_done + values.size] = values
        a_done += values.size
        values = chunk_map[~chunk_mask]
        normal[n_done : n_done + values.size] = values
        n_done += values.size
    return normal, anomalous


# --------------------------------------------------------------------------------------------
# Pixel level: the shared counting step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TieCounts:
    """Counts at consecutive distinct values of a sorted population ("needles"), ascending.

    Attributes:
        values: The distinct needle values.
        needles_below: Needles strictly below each value.
        needles_equal: Needles equal to each value.
        others_below: Scores of the other population strictly below each value.
        others_equal: Scores of the other population equal to each value.
    """

    values: np.ndarray
    needles_below: np.ndarray
    needles_equal: np.ndarray
    others_below: np.ndarray
    others_equal: np.ndarray


def _run_starts(needles: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Positions in ``needles[start:stop]`` (relative) where a new value begins; sorted needles."""
    chunk = needles[start:stop]
    first = np.empty(chunk.size, dtype=bool)
    first[0] = start == 0 or chunk[0] != needles[start - 1]
    np.not_equal(chunk[1:], chunk[:-1], out=first[1:])
    return np.flatnonzero(first)


def _tie_counts(needles: np.ndarray, others: np.ndarray) -> Iterator[_TieCounts]:
    """Count every distinct needle value in both populations, chunk by chunk.

    Each distinct value is reported exactly once (a run of equal needles that spans chunks
    belongs to the chunk where it begins), so temporaries are a few arrays of ``_CHUNK_PIXELS``.

    Args:
        needles: Sorted (ascending) scores whose distinct values are visited.
        others: Sorted (ascending) scores of the other population.

    Yields:
        :class:`_TieCounts` for consecutive groups of distinct values, ascending.
    """
    for start in range(0, needles.size, _CHUNK_PIXELS):
        stop = min(start + _CHUNK_PIXELS, needles.size)
        starts = _run_starts(needles, start, stop)
        if starts.size == 0:
            continue  # the whole chunk continues a run that began earlier
        values = needles[start + starts]
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:]
        ends[-1] = np.searchsorted(needles, values[-1], side="right") - start
        below = np.searchsorted(others, values, side="left")
        equal = np.searchsorted(others, values, side="right") - below
        yield _TieCounts(values, starts + start, ends - starts, below, equal)


def _sorted_split(
    masks: np.ndarray, maps: np.ndarray, images: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(normal, anomalous) pixel scores as :func:`_split_scores` returns them, each sorted in place."""
    normal, anomalous = _split_scores(masks, maps, images)
    normal.sort()
    anomalous.sort()
    return normal, anomalous


# --------------------------------------------------------------------------------------------
# Pixel AUROC
# --------------------------------------------------------------------------------------------


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC, equal to ``roc_auc_score(masks.ravel(), maps.ravel())``.

    Computed as the Mann-Whitney statistic (ties count 1/2) from :func:`_tie_counts`: both pixel
    populations are sorted, every distinct score of the smaller one is counted in the larger one
    chunk by chunk, and the integer statistic is divided once. Extra memory is one copy of the
    scores plus a few arrays of one chunk, instead of sklearn's several float64 copies of the class.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly scores.

    Returns:
        The AUROC, or NaN with an :class:`UndefinedMetricWarning` when the masks hold only
        anomalous or only normal pixels.
    """
    masks, maps = _pixel_inputs(masks, maps)
    normal, anomalous = _sorted_split(masks, maps)
    if anomalous.size == 0 or normal.size == 0:
        return _undefined("pixel AUROC", "the masks hold a single class")
    return _auroc_of_sorted(normal, anomalous)


def _auroc_of_sorted(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Mann-Whitney AUROC of two sorted, non-empty score populations (anomalous should rank high)."""
    # Sum over the smaller population of 2*(#other below) + (#other equal).
    small, large, small_is_anomalous = (
        (anomalous, normal, True) if anomalous.size <= normal.size else (normal, anomalous, False)
    )
    twice_below = 0
    for counts in _tie_counts(small, large):
        twice_below += int(np.sum(counts.needles_equal * (2 * counts.others_below + counts.others_equal)))
    pairs = normal.size * anomalous.size
    twice_u = twice_below if small_is_anomalous else 2 * pairs - twice_below
    return twice_u / (2 * pairs)


# --------------------------------------------------------------------------------------------
# Precision-recall: average precision and F1-max (image and pixel level)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PrecisionRecallSummary:
    """Average precision, maximum F1 and the (lowest) threshold attaining it."""

    ap: float
    f1_max: float
    threshold: float


def _precision_recall_summary(normal: np.ndarray, anomalous: np.ndarray) -> _PrecisionRecallSummary:
    """AP and F1-max of ``precision_recall_curve`` from two sorted populations, chunk by chunk.

    With thresholds descending, recall only moves at anomalous scores, so sklearn's AP,
    ``-sum(diff(recall) * precision[:-1])``, is a sum over the distinct anomalous values v of
    ``(recall(v) - recall(next higher threshold)) * precision(v)``. F1 is also maximal only there:
    at any other threshold the true positives equal those of the next higher anomalous value
    while the false positives are strictly more. Precision, recall and F1 are computed with
    sklearn's own float64 expressions on the same integer counts, so every per-threshold value is
    bit for bit sklearn's; only the AP sum is accumulated in a different order.

    Args:
        normal: Sorted scores of the negatives (may be empty).
        anomalous: Sorted scores of the positives, not empty.

    Returns:
        The summary; the threshold is the lowest score attaining the F1 maximum, as
        ``np.argmax`` over sklearn's ascending thresholds picks it.
    """
    ap, best_f1, best_threshold = 0.0, -math.inf, math.nan
    for counts in _tie_counts(anomalous, normal):
        ap_part, f1 = _chunk_ap_and_f1(counts, anomalous.size, normal.size)
        ap += ap_part
        best = int(np.argmax(f1))
        if f1[best] > best_f1:  # strict: chunks ascend, so ties keep the lowest threshold
            best_f1, best_threshold = float(f1[best]), float(counts.values[best])
    return _PrecisionRecallSummary(ap, best_f1, best_threshold)


def _chunk_ap_and_f1(counts: _TieCounts, n_anomalous: int, n_normal: int) -> tuple[float, np.ndarray]:
    """One chunk's share of the AP sum, and F1 at each of its distinct anomalous values.

    The values are sklearn's expressions (``P = tps / (tps + fps)``, ``R = tps / tps[-1]``,
    ``2 * P * R / (P + R)``) evaluated in float64 on exact integer counts; they are written with
    ``out=`` so that a chunk needs three float64 temporaries.
    """
    tps = np.subtract(n_anomalous, counts.needles_below, dtype=np.float64)
    precision = np.subtract(n_normal, counts.others_below, dtype=np.float64)  # fps, for now
    np.add(tps, precision, out=precision)
    np.divide(tps, precision, out=precision)
    recall = tps / n_anomalous
    work = np.subtract(tps, counts.needles_equal, out=tps)  # true positives above the value
    np.divide(work, n_anomalous, out=work)  # recall at the next higher threshold
    np.subtract(recall, work, out=work)
    np.multiply(work, precision, out=work)
    ap_part = float(np.sum(work))
    np.multiply(2, precision, out=work)
    np.multiply(work, recall, out=work)
    np.add(precision, recall, out=recall)  # > 0: every value here has tps >= 1
    return ap_part, np.divide(work, recall, out=work)


def _binary_image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image labels as booleans (1 = anomalous) and finite scores; raises ``ValueError`` otherwise."""
    labels, scores = _image_inputs(labels, scores)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"image labels must be 0 or 1, got {np.unique(labels)}")
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("image scores contain NaN or infinite values")
    return labels == 1, scores


def _image_summary(anomalous: np.ndarray, scores: np.ndarray) -> _PrecisionRecallSummary:
    """Precision-recall summary of image scores; at least one anomalous image."""
    return _precision_recall_summary(np.sort(scores[~anomalous]), np.sort(scores[anomalous]))


def image_f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Image-level maximum F1 over all thresholds, and the threshold attaining it.

    Equal to ``f1 = 2 * P * R / (P + R)`` (0 where ``P + R == 0``) over sklearn's
    ``P, R, T = precision_recall_curve(labels, scores)``, then ``f1.max()`` and
    ``T[np.argmax(f1)]``; an image is predicted anomalous when ``score >= threshold``.

    Args:
        labels: (N,) 0/1 image labels (1 = anomalous).
        scores: (N,) image anomaly scores.

    Returns:
        (F1-max, threshold), or (NaN, NaN) with an :class:`UndefinedMetricWarning` when no image
        is anomalous.

    Raises:
        ValueError: On labels other than 0/1, non-finite scores or mismatched lengths.
    """
    anomalous, scores = _binary_image_inputs(labels, scores)
    if not anomalous.any():
        return _undefined("image F1-max", "the labels hold no anomalous image"), math.nan
    summary = _image_summary(anomalous, scores)
    return summary.f1_max, summary.threshold


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level average precision, ``average_precision_score(masks.ravel(), maps.ravel())``.

    Bounded memory: one sorted copy of the scores (split into normal and anomalous pixels) plus a
    few arrays of ``_CHUNK_PIXELS``, shared with :func:`pixel_auroc` (see
    :func:`_precision_recall_summary`).

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly scores.

    Returns:
        The AP, or NaN with an :class:`UndefinedMetricWarning` when no pixel is anomalous.
    """
    masks, maps = _pixel_inputs(masks, maps)
    normal, anomalous = _sorted_split(masks, maps)
    if anomalous.size == 0:
        return _undefined("pixel AP", "the masks hold no anomalous pixel")
    return _precision_recall_summary(normal, anomalous).ap


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float]:
    """Pixel-level maximum F1 and its threshold, as :func:`image_f1_max` over all pixels.

    Same bounded-memory computation as :func:`pixel_ap`.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly scores.

    Returns:
        (F1-max, threshold), or (NaN, NaN) with an :class:`UndefinedMetricWarning` when no pixel
        is anomalous.
    """
    masks, maps = _pixel_inputs(masks, maps)
    normal, anomalous = _sorted_split(masks, maps)
    if anomalous.size == 0:
        return _undefined("pixel F1-max", "the masks hold no anomalous pixel"), math.nan
    summary = _precision_recall_summary(normal, anomalous)
    return summary.f1_max, summary.threshold


def decision_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None
) -> dict[str, float]:
    """Image F1-max, pixel AP and pixel F1-max of one class, with the F1-max thresholds.

    The pixel metrics share one split, sort and counting pass.

    Args:
        labels: (N,) 0/1 image labels (1 = anomalous).
        scores: (N,) image anomaly scores.
        masks: (N, H, W) ground truth, nonzero = anomalous; None when the data have no masks.
        maps: (N, H, W) anomaly scores; None when the data have no masks.

    Returns:
        ``{key: value}`` for the keys of ``DECISION_KEYS``, in that order. The image keys are NaN
        (one :class:`UndefinedMetricWarning`) unless both image labels occur; the pixel keys are
        NaN (one warning) unless there are both anomalous and normal pixels, and NaN without a
        warning when ``masks`` or ``maps`` is None.
    """
    anomalous_images, scores = _binary_image_inputs(labels, scores)
    if anomalous_images.any() and not anomalous_images.all():
        image = _image_summary(anomalous_images, scores)
        image_values = (image.f1_max, image.threshold)
    else:
        image_values = (_undefined("image F1-max", "the labels hold a single class"), math.nan)
    if masks is None or maps is None:
        return dict(zip(DECISION_KEYS, (*image_values, math.nan, math.nan, math.nan), strict=True))
    masks, maps = _pixel_inputs(masks, maps)
    normal, anomalous = _sorted_split(masks, maps)
    if anomalous.size and normal.size:
        pixel = _precision_recall_summary(normal, anomalous)
        pixel_values = (pixel.ap, pixel.f1_max, pixel.threshold)
    else:
        pixel_values = (_undefined("pixel AP (and F1-max)", "the masks hold a single class"), math.nan, math.nan)
    return dict(zip(DECISION_KEYS, (*image_values, *pixel_values), strict=True))


# --------------------------------------------------------------------------------------------
# Per defect type
# --------------------------------------------------------------------------------------------


def per_defect_type_auroc(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    types: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Image and pixel AUROC of each defect type's images against the class's normal images.

    Args:
        labels: (N,) image labels, 0 = normal (its type is ignored), 1 = anomalous.
        scores: (N,) image anomaly scores.
        masks: (N, H, W) ground truth, nonzero = anomalous; None when the data have no masks.
        maps: (N, H, W) anomaly scores; None when the data have no masks.
        types: N defect type names, one per image.

    Returns:
        ``{type: {"image_auroc": ..., "pixel_auroc": ...}}`` over the types of the anomalous
        images, sorted by name. Each value is :func:`image_auroc` / :func:`pixel_auroc` on the
        normal images plus that type's images (NaN with a warning where those are undefined,
        e.g. with no normal image or no anomalous pixel; the pixel AUROC is NaN without a warning
        when ``masks`` or ``maps`` is None).

    Raises:
        ValueError: When labels, scores, maps and types differ in length.
    """
    labels, scores = _image_inputs(labels, scores)
    pixel = masks is not None and maps is not None
    if pixel:
        masks, maps = _pixel_inputs(masks, maps)
    types = np.array([str(name) for name in types])
    if not len(labels) == len(types) == (len(maps) if pixel else len(labels)):
        raise ValueError(f"{len(labels)} labels, {len(types)} types and {len(maps) if pixel else 'no'} maps "
                         "differ in number")
    normal = labels == 0
    results = {}
    for name in sorted(set(types[~normal])):
        subset = np.flatnonzero(normal | (types == name))
        results[name] = {
            IMAGE_AUROC: image_auroc(labels[subset], scores[subset]),
            PIXEL_AUROC: _subset_pixel_auroc(masks, maps, subset) if pixel else math.nan,
        }
    return results


def _subset_pixel_auroc(masks: np.ndarray, maps: np.ndarray, images: np.ndarray) -> float:
    """:func:`pixel_auroc` of the listed images, without copying them out of the stacks."""
    normal, anomalous = _sorted_split(masks, maps, images)
    if anomalous.size == 0 or normal.size == 0:
        return _undefined("pixel AUROC", "the masks hold a single class")
    return _auroc_of_sorted(normal, anomalous)


# --------------------------------------------------------------------------------------------
# Pixel AUPRO
# --------------------------------------------------------------------------------------------


def pixel_aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    mode: str = "cflow",
    max_fpr: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """Pixel-level area under the per-region-overlap curve.

    Regions are the 8-connected components of each mask.

    * ``"cflow"`` (default, the released numbers): thresholds
      ``np.arange(min, max, (max - min) / num_thresholds)`` over the maps (as the original
      computes them, so sometimes one more than ``num_thresholds``); at each, PRO = mean detected
      fraction over all regions and FPR = false positives / normal pixels; thresholds with
      FPR < ``max_fpr`` are kept, their FPRs min-max normalised to [0, 1], and the area is
      ``sklearn.metrics.auc``. Bit for bit the original ``cal_pro_score`` wherever that returns
      a number (a flat PRO curve gives -0.0, as there); where it crashes, this returns NaN.
    * ``"exact"``: the MVTec AD definition: the exact PRO curve over every distinct score,
      integrated over FPR in [0, ``max_fpr``] (linear interpolation at ``max_fpr``) and divided by
      ``max_fpr``. ``num_thresholds`` is unused. Constant maps give the chance value
      ``max_fpr / 2``.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous (0/1 as in the original).
        maps: (N, H, W) anomaly scores (float32 in the evaluation pipeline).
        mode: ``"cflow"`` or ``"exact"``.
        max_fpr: FPR limit of the integral.
        num_thresholds: cflow threshold steps.

    Returns:
        The AUPRO, or NaN with an :class:`UndefinedMetricWarning` when there is no anomalous
        region or no normal pixel, and in cflow mode when the maps are constant or fewer than two
        thresholds with distinct FPRs stay under ``max_fpr``.

    Raises:
        ValueError: On an unknown mode, a bad ``max_fpr``/``num_thresholds``, mismatched shapes
            or non-finite maps.
    """
    if mode not in AUPRO_MODES:
        raise ValueError(f"unknown AUPRO mode {mode!r}; expected one of {AUPRO_MODES}")
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be positive, got {num_thresholds}")
    masks, maps = _pixel_inputs(masks, maps)
    if mode == "cflow":
        return _cflow_aupro(masks, maps, max_fpr, num_thresholds)
    return _exact_aupro(masks, maps, max_fpr)


def _cflow_pro_curve(
    masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original's PRO curve at every threshold, before the FPR cut.

    Each mask is labelled once; every pixel gets the number of thresholds it exceeds
    (``map > th``), and one ``bincount`` per chunk over (region, that number) yields the detected
    pixels of every region at every threshold.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous, with at least one anomalous pixel.
        maps: (N, H, W) finite, non-constant anomaly scores.
        num_thresholds: Threshold steps.

    Returns:
        (thresholds, fprs, pros), each of length ``len(thresholds)``.
    """
    thresholds = _cflow_thresholds(maps, num_thresholds)
    comparable = _comparable_thresholds(thresholds, maps.dtype)
    bins = thresholds.size + 1
    normal_hist = np.zeros(bins, dtype=np.int64)
    region_hists = []
    for chunk_mask, chunk_map in _chunks(masks, maps):
        exceeded = _thresholds_exceeded(chunk_map.ravel().astype(comparable.dtype, copy=False), comparable)
        chunk_hist = np.bincount(exceeded, minlength=bins)
        if chunk_mask.any():
            labels, n_regions = ndimage.label(chunk_mask, structure=_STACKED_8_CONNECTIVITY)
            anomalous = chunk_mask.ravel()
            keys = (labels.ravel()[anomalous] - 1).astype(np.intp) * bins + exceeded[anomalous]
            hist = np.bincount(keys, minlength=n_regions * bins).reshape(n_regions, bins)
            chunk_hist -= hist.sum(axis=0)
            region_hists.append(hist)
        normal_hist += chunk_hist
    # Pixels with count b exceed thresholds 0..b-1: detected at threshold k = sum of bins > k.
    fp = _counts_above(normal_hist[None])[0]
    region_hist = np.concatenate(region_hists)
    detected = _counts_above(region_hist)
    areas = region_hist.sum(axis=1)
    fprs = fp / _float32_normal_count(masks)
    fractions = np.ascontiguousarray((detected / areas[:, None]).T)
    # One mean per threshold over the regions in label order, as the original's np.mean(list).
    pros = np.array([row.mean() for row in fractions])
    return thresholds, fprs, pros


def _cflow_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float, num_thresholds: int) -> float:
    name = "pixel AUPRO (cflow)"
    if not np.any(masks):
        return _undefined(name, "the masks hold no anomalous region")
    if np.all(masks):
        return _undefined(name, "the masks hold no normal pixel")
    if not maps.max() > maps.min():
        return _undefined(name, "the anomaly maps are constant")
    _, fprs, pros = _cflow_pro_curve(masks, maps, num_thresholds)
    kept = fprs < max_fpr
    fprs = fprs[kept]
    if fprs.size < 2 or not fprs.max() > fprs.min():
        return _undefined(name, f"fewer than two thresholds with distinct FPRs below {max_fpr}")
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros[kept]))


def _cflow_thresholds(maps: np.ndarray, num_thresholds: int) -> np.ndarray:
    """The original's threshold call, with its dtypes: float32 min/max/step, float64 result."""
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / num_thresholds
    return np.arange(min_th, max_th, delta)


def _comparable_thresholds(thresholds: np.ndarray, map_dtype: np.dtype) -> np.ndarray:
    """Thresholds in the dtype the per-pixel comparisons can run in, with unchanged outcomes.

    The original compares float32 maps with float64 thresholds, in float64 (NEP 50). For a float32
    value v and t32 = t rounded down to float32, ``v > t`` exactly when ``v > t32``, so the
    comparisons run in float32 on float32 maps (half the memory traffic). Other map dtypes are
    compared in the promoted dtype, as numpy does.
    """
    map_dtype = np.dtype(map_dtype)
    if not (np.issubdtype(map_dtype, np.floating) and map_dtype.itemsize < thresholds.dtype.itemsize):
        return thresholds.astype(np.promote_types(map_dtype, thresholds.dtype))
    rounded = thresholds.astype(map_dtype)
    return np.where(rounded > thresholds, np.nextafter(rounded, map_dtype.type(-np.inf)), rounded)


def _thresholds_exceeded(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each value, how many of the ascending thresholds (same dtype) it is greater than.

    Equal to ``np.searchsorted(thresholds, values, side="left")``, but guessed from the
    near-uniform spacing and then checked exactly against the thresholds: several times faster
    than a binary search per pixel. The rare value whose guess is off by more than one falls back
    to ``searchsorted``.
    """
    count = thresholds.size
    span = float(thresholds[-1]) - float(thresholds[0])
    guess = values - thresholds[0]
    if count > 1 and span > 0:
        guess *= values.dtype.type((count - 1) / span)
        np.ceil(guess, out=guess)
    else:
        guess[:] = 0
    exceeded = np.clip(guess, 0, count, out=guess).astype(np.intp)
    bounds = np.concatenate(([-np.inf], thresholds, [np.inf])).astype(values.dtype)
    # exceeded = b is right iff thresholds[b-1] < value <= thresholds[b]; a guess within one
    # step is fixed by these two moves.
    exceeded -= bounds[exceeded] >= values
    exceeded += bounds[exceeded + 1] < values
    wrong = (bounds[exceeded] >= values) | (bounds[exceeded + 1] < values)
    if wrong.any():
        exceeded[wrong] = np.searchsorted(thresholds, values[wrong], side="left")
    return exceeded


def _counts_above(hist: np.ndarray) -> np.ndarray:
    """(R, T+1) histograms of 'thresholds exceeded' -> (R, T) pixels above each threshold."""
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _float32_normal_count(masks: np.ndarray) -> np.float32:
    """The original's FPR denominator, ``(1 - masks).sum()`` on float32 masks, without the copy.

    numpy sums float32 pairwise (halving, each half a multiple of 8 long); partial sums of 0/1
    values are exact up to 2**24, so only the splits above that size are replayed in float32.
    Below 2**24 normal pixels this is simply the exact count.
    """
    flat = masks.reshape(-1)

    def pairwise(start: int, length: int) -> np.float32:
        if length <= _FLOAT32_EXACT_COUNT:
            return np.float32(length - np.count_nonzero(flat[start : start + length]))
        half = length // 2
        half -= half % 8
        return np.float32(pairwise(start, half) + pairwise(start + half, length - half))

    return pairwise(0, flat.size)


def _exact_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """MVTec AD official AUPRO: the area under :func:`_exact_pro_segments` up to ``max_fpr``."""
    name = "pixel AUPRO (exact)"
    segments = _exact_pro_segments(masks, maps, max_fpr)
    if isinstance(segments, str):
        return _undefined(name, segments)
    x0, x1, y0, y1 = segments
    inside = x1 <= max_fpr
    area = float(np.sum(0.5 * (y0[inside] + y1[inside]) * (x1[inside] - x0[inside])))
    crossing = np.flatnonzero((x0 < max_fpr) & (x1 > max_fpr))
    if crossing.size:
        i = crossing[0]
        y_cut = y0[i] + (y1[i] - y0[i]) * (max_fpr - x0[i]) / (x1[i] - x0[i])
        area += 0.5 * (y0[i] + y_cut) * (max_fpr - x0[i])
    return area / max_fpr


def _exact_pro_segments(
    masks: np.ndarray, maps: np.ndarray, max_fpr: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | str:
    """The exact PRO curve's segments that start below ``max_fpr``, or why there are none.

    Along the exact curve (thresholds descending over every distinct score), the FPR grows only
    at distinct normal scores u: the segment runs from (FPR(> u), PRO(> u)) to
    (FPR(>= u), PRO(>= u)). Only the top ``max_fpr`` share of normal scores can start such a
    segment below ``max_fpr``.

    Returns:
        ``(x0, x1, y0, y1)`` with FPR ascending, or the reason the curve is undefined.
    """
    normal, anomalous, weights, n_regions = _exact_inputs(masks, maps)
    if n_regions == 0:
        return "the masks hold no anomalous region"
    if normal.size == 0:
        return "the masks hold no normal pixel"
    normal.sort()
    order = np.argsort(anomalous, kind="stable")
    anomalous = anomalous[order]
    # pro_from[i] = PRO of the anomalous pixels from sorted position i upwards.
    pro_from = np.append(np.cumsum(weights[order][::-1])[::-1], 0.0) / n_regions

    n_normal = normal.size
    top = normal[max(0, n_normal - (math.floor(max_fpr * n_normal) + 1)) :]
    distinct = top[np.append(top[1:] != top[:-1], True)][::-1]
    x0 = (n_normal - np.searchsorted(normal, distinct, side="right")) / n_normal
    x1 = (n_normal - np.searchsorted(normal, distinct, side="left")) / n_normal
    y0 = np.minimum(pro_from[np.searchsorted(anomalous, distinct, side="right")], 1.0)
    y1 = np.minimum(pro_from[np.searchsorted(anomalous, distinct, side="left")], 1.0)
    return x0, x1, y0, y1


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, mode: str = "cflow", max_fpr: float = 0.3, num_thresholds: int = 200
) -> tuple[np.ndarray, np.ndarray] | None:
    """The PRO curve that :func:`pixel_aupro` integrates, as points with FPR in [0, ``max_fpr``].

    * ``"cflow"``: the original's thresholds with FPR < ``max_fpr``; FPRs as measured, not
      min-max normalised as the area computation does.
    * ``"exact"``: every vertex of the exact curve, cut at ``max_fpr`` by linear interpolation.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly scores.
        mode: ``"cflow"`` or ``"exact"``.
        max_fpr: FPR limit.
        num_thresholds: cflow threshold steps.

    Returns:
        ``(fprs, pros)`` ordered by ascending FPR, or None where :func:`pixel_aupro` is NaN for
        want of a curve (no anomalous region, no normal pixel, constant maps in cflow mode).
    """
    if mode not in AUPRO_MODES:
        raise ValueError(f"unknown AUPRO mode {mode!r}; expected one of {AUPRO_MODES}")
    masks, maps = _pixel_inputs(masks, maps)
    if mode == "cflow":
        if not np.any(masks) or np.all(masks) or not maps.max() > maps.min():
            return None
        _, fprs, pros = _cflow_pro_curve(masks, maps, num_thresholds)
        kept = np.flatnonzero(fprs < max_fpr)[::-1]  # thresholds ascend, so FPRs descend
        return fprs[kept].astype(np.float64), pros[kept]
    segments = _exact_pro_segments(masks, maps, max_fpr)
    if isinstance(segments, str):
        return None
    x0, x1, y0, y1 = segments
    fprs = np.column_stack([x0, x1]).ravel()
    pros = np.column_stack([y0, y1]).ravel()
    beyond = np.flatnonzero(fprs > max_fpr)
    if beyond.size:
        i = beyond[0]  # i > 0: every segment starts below max_fpr
        cut = pros[i - 1] + (pros[i] - pros[i - 1]) * (max_fpr - fprs[i - 1]) / (fprs[i] - fprs[i - 1])
        fprs, pros = np.append(fprs[:i], max_fpr), np.append(pros[:i], cut)
    return fprs, pros


def _exact_inputs(
    masks: np.ndarray, maps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Normal scores, anomalous scores, each anomalous pixel's 1 / (its region's area), regions."""
    normal, anomalous = _split_scores(masks, maps)
    weights = np.empty(anomalous.size, dtype=np.float64)
    done = n_regions = 0
    for chunk_mask, _ in _chunks(masks, maps):
        labels, chunk_regions = ndimage.label(chunk_mask, structure=_STACKED_8_CONNECTIVITY)
        region_of_pixel = labels[chunk_mask]  # boolean indexing keeps the order _split_scores used
        areas = np.bincount(region_of_pixel)
        weights[done : done + region_of_pixel.size] = 1.0 / areas[region_of_pixel]
        done += region_of_pixel.size
        n_regions += chunk_regions
    return normal, anomalous, weights, n_regions


# --------------------------------------------------------------------------------------------
# Per-class evaluation and the results table
# --------------------------------------------------------------------------------------------


def metric_columns(metric_set: str) -> list[str]:
    """Table columns (metric names) of a ``--metrics`` choice, in the original's order.

    Raises:
        ValueError: On an unknown metric set.
    """
    try:
        return list(METRIC_COLUMNS[metric_set])
    except KeyError:
        raise ValueError(f"unknown metric set {metric_set!r}; expected one of {list(METRIC_COLUMNS)}") from None


def compute_class_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    metric_set: str = "image-pixel-level",
    aupro_mode: str = "cflow",
) -> dict[str, float]:
    """Compute the metrics of one class, so that evaluation can proceed class by class.

    Args:
        labels: (N,) image labels (1 = anomalous).
        scores: (N,) image anomaly scores.
        masks: (N, H, W) uint8 ground truth; needed unless ``metric_set`` is image-level.
        maps: (N, H, W) float32 anomaly maps; needed unless ``metric_set`` is image-level.
        metric_set: ``image-level``, ``pixel-level`` or ``image-pixel-level``.
        aupro_mode: ``pixel_aupro`` mode.

    Returns:
        ``{column: value}`` in the column order of ``metric_columns(metric_set)``.

    Raises:
        ValueError: On an unknown metric set, or pixel metrics requested without masks and maps.
    """
    columns = metric_columns(metric_set)
    if PIXEL_AUROC in columns and (masks is None or maps is None):
        raise ValueError(f"metric set {metric_set!r} needs pixel masks and anomaly maps")
    results = {}
    for column in columns:
        if column == IMAGE_AUROC:
            results[column] = image_auroc(labels, scores)
        elif column == IMAGE_AP:
            results[column] = image_ap(labels, scores)
        elif column == PIXEL_AUROC:
            results[column] = pixel_auroc(masks, maps)
        else:
            results[column] = pixel_aupro(masks, maps, mode=aupro_mode)
    return results


def format_cell(value: float) -> str:
    """The original's cell text: ``str(np.round(value * 100, decimals=1))``."""
    return str(np.round(value * 100, decimals=1))


def _mean(values: Sequence[float]) -> float:
    """Mean of the defined (non-NaN) values, as ``np.mean`` computes it; NaN if none is defined."""
    defined = [value for value in values if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan


def mean_over_classes(per_class: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> dict[str, float]:
    """``{column: mean over classes}`` of the unrounded values, NaN classes left out (see :func:`_mean`)."""
    return {column: _mean([values[column] for values in per_class.values()]) for column in columns}


def format_results_table(per_class: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """The original's results table: a tabulate pipe table with a final ``mean`` row.

    Rows follow the mapping's order; cells are ``str(np.round(v * 100, 1))`` (tabulate re-parses
    them, so 90.0 prints ``90`` and -0.0 prints ``-0``). The ``mean`` row averages the unrounded
    per-class values. A NaN value prints ``nan`` in its row and is left out of the mean (a column
    with no defined value has a ``nan`` mean), so one undefined class does not hide the others.

    Args:
        per_class: ``{class name: {column: value in [0, 1]}}``.
        columns: Metric columns, e.g. ``metric_columns("image-pixel-level")``.
    """
    rows = [[name, *(format_cell(values[column]) for column in columns)] for name, values in per_class.items()]
    means = mean_over_classes(per_class, columns)
    rows.append(["mean", *(format_cell(means[column]) for column in columns)])
    return tabulate(rows, headers=["objects", *columns], tablefmt="pipe")
