"""Evaluation metrics of AnomalyCLIP (SPEC §7) and the results table.

All functions take numpy arrays and return python floats:

* image level: :func:`image_auroc`, :func:`image_ap` (sklearn semantics);
* pixel level: :func:`pixel_auroc` (equal to sklearn's ``roc_auc_score`` on the flattened arrays,
  in bounded memory) and :func:`pixel_aupro`, whose default ``"cflow"`` mode reproduces the
  released ``cal_pro_score`` bit for bit without its per-threshold re-labelling, and whose
  ``"exact"`` mode is the MVTec AD official PRO integral.

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

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score
from tabulate import tabulate

IMAGE_AUROC = "image_auroc"
IMAGE_AP = "image_ap"
PIXEL_AUROC = "pixel_auroc"
PIXEL_AUPRO = "pixel_aupro"

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


def _image_metric(
    name: str, sklearn_metric: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray, scores: np.ndarray
) -> float:
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
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


def _chunks(masks: np.ndarray, maps: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (anomalous-pixel boolean mask, map) for consecutive groups of whole images."""
    step = max(1, _CHUNK_PIXELS // (maps.shape[1] * maps.shape[2]))
    for start in range(0, len(maps), step):
        yield masks[start : start + step] != 0, maps[start : start + step]


def _split_scores(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (normal pixel scores, anomalous pixel scores) as flat copies in the maps' dtype."""
    n_anomalous = int(np.count_nonzero(masks))
    normal = np.empty(maps.size - n_anomalous, dtype=maps.dtype)
    anomalous = np.empty(n_anomalous, dtype=maps.dtype)
    n_done = a_done = 0
    for chunk_mask, chunk_map in _chunks(masks, maps):
        values = chunk_map[chunk_mask]
        anomalous[a_done : a_done + values.size] = values
        a_done += values.size
        values = chunk_map[~chunk_mask]
        normal[n_done : n_done + values.size] = values
        n_done += values.size
    return normal, anomalous


# --------------------------------------------------------------------------------------------
# Pixel AUROC
# --------------------------------------------------------------------------------------------


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC, equal to ``roc_auc_score(masks.ravel(), maps.ravel())``.

    Computed as the Mann-Whitney statistic (ties count 1/2): the larger of the two pixel
    populations is sorted, the smaller is located in it with ``searchsorted`` in chunks, and the
    integer statistic is divided once. Extra memory is one copy of the scores plus a boolean mask
    of one chunk, instead of sklearn's several float64 copies of the whole class.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly scores.

    Returns:
        The AUROC, or NaN with an :class:`UndefinedMetricWarning` when the masks hold only
        anomalous or only normal pixels.
    """
    masks, maps = _pixel_inputs(masks, maps)
    normal, anomalous = _split_scores(masks, maps)
    if anomalous.size == 0 or normal.size == 0:
        return _undefined("pixel AUROC", "the masks hold a single class")
    # Sum over the smaller population of 2*(#other below) + (#other equal) = (left + right).
    small, large, small_is_anomalous = (
        (anomalous, normal, True) if anomalous.size <= normal.size else (normal, anomalous, False)
    )
    large.sort()
    small.sort()  # sorted needles make searchsorted cache-friendly
    twice_below = 0
    for start in range(0, small.size, _CHUNK_PIXELS):
        needles = small[start : start + _CHUNK_PIXELS]
        left = np.searchsorted(large, needles, side="left")
        right = np.searchsorted(large, needles, side="right")
        twice_below += int(left.sum()) + int(right.sum())
    pairs = normal.size * anomalous.size
    twice_u = twice_below if small_is_anomalous else 2 * pairs - twice_below
    return twice_u / (2 * pairs)


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
    """MVTec AD official AUPRO from sorted normal scores and weighted anomalous scores.

    Along the exact curve (thresholds descending over every distinct score), area accrues only
    where the FPR grows, i.e. at distinct normal scores u: the segment runs from
    (FPR(> u), PRO(> u)) to (FPR(>= u), PRO(>= u)). Only the top ``max_fpr`` share of normal
    scores can start such a segment below ``max_fpr``.
    """
    name = "pixel AUPRO (exact)"
    normal, anomalous, weights, n_regions = _exact_inputs(masks, maps)
    if n_regions == 0:
        return _undefined(name, "the masks hold no anomalous region")
    if normal.size == 0:
        return _undefined(name, "the masks hold no normal pixel")
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

    inside = x1 <= max_fpr
    area = float(np.sum(0.5 * (y0[inside] + y1[inside]) * (x1[inside] - x0[inside])))
    crossing = np.flatnonzero((x0 < max_fpr) & (x1 > max_fpr))
    if crossing.size:
        i = crossing[0]
        y_cut = y0[i] + (y1[i] - y0[i]) * (max_fpr - x0[i]) / (x1[i] - x0[i])
        area += 0.5 * (y0[i] + y_cut) * (max_fpr - x0[i])
    return area / max_fpr


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


def _cell(value: float) -> str:
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
    rows = [[name, *(_cell(values[column]) for column in columns)] for name, values in per_class.items()]
    means = mean_over_classes(per_class, columns)
    rows.append(["mean", *(_cell(means[column]) for column in columns)])
    return tabulate(rows, headers=["objects", *columns], tablefmt="pipe")
