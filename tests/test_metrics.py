"""Tests of metrics.py against sklearn, the direct reference loops and the original's goldens."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import metrics
from metrics import UndefinedMetricWarning
from tests.metrics_reference import reference_cflow_aupro, reference_cflow_pro_curve, reference_exact_aupro

GOLDEN_CLASSES = ("01", "02", "03")
GOLDEN_EVALS = ("eval_btad_f24_s84", "eval_btad_f6_12_18_24_s56_sigma2")
# npz metric key suffix -> table column
GOLDEN_METRICS = {
    "pixel-auroc": "pixel_auroc",
    "pixel-aupro": "pixel_aupro",
    "image-auroc": "image_auroc",
    "image-ap": "image_ap",
}


# --------------------------------------------------------------------------------------------
# Synthetic cases
# --------------------------------------------------------------------------------------------


def random_case(seed: int, n: int = 6, size: int = 24, levels: int | None = 50) -> tuple[np.ndarray, np.ndarray]:
    """Masks (uint8) and float32 maps: several blobs per mask, some at the border, some masks empty.

    With ``levels`` the maps are quantised, so many pixels tie with each other and thresholds.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        if i % 3 == 2:
            continue  # a normal image
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(-2, size - 2, 2)  # may start off the edge: touches the border
            h, w = rng.integers(2, size // 3, 2)
            masks[i, max(y, 0) : y + h, max(x, 0) : x + w] = 1
        masks[i] &= rng.random((size, size)) < 0.9  # ragged regions, sometimes split
    noise = ndimage.gaussian_filter(rng.standard_normal(masks.shape), (0, 1.5, 1.5))
    maps = noise + rng.uniform(0.2, 1.0) * ndimage.gaussian_filter(masks.astype(float), (0, 1, 1))
    if levels is not None:
        maps = np.round((maps - maps.min()) / np.ptp(maps) * levels) / levels
    return masks, maps.astype(np.float32)


def assert_undefined(function, *args, **kwargs) -> None:
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(function(*args, **kwargs))


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(30), 1).astype(np.float32)  # ties
    assert metrics.image_auroc(labels, scores) == roc_auc_score(labels, scores)
    assert metrics.image_ap(labels, scores) == average_precision_score(labels, scores)


@pytest.mark.parametrize("function", [metrics.image_auroc, metrics.image_ap])
@pytest.mark.parametrize("label", [0, 1])
def test_image_metrics_single_class_is_nan(function, label: int) -> None:
    assert_undefined(function, np.full(5, label), np.arange(5.0))


def test_image_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        metrics.image_auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------------------------
# Pixel AUROC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_pixels", [1 << 20, 700])
def test_pixel_auroc_matches_sklearn(seed: int, chunk_pixels: int, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", chunk_pixels)
    masks, maps = random_case(seed, levels=20 if seed % 2 else None)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(metrics.pixel_auroc(masks, maps) - expected) <= 1e-9
    # Anomalous pixels the majority: the other population is the one searched.
    flipped = 1 - masks
    assert abs(metrics.pixel_auroc(flipped, maps) - roc_auc_score(flipped.ravel(), maps.ravel())) <= 1e-9


def test_pixel_auroc_accepts_float_masks_and_4d_stacks() -> None:
    masks, maps = random_case(7)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    value = metrics.pixel_auroc(masks[:, None].astype(np.float32), maps[:, None].astype(np.float64))
    assert abs(value - expected) <= 1e-9


@pytest.mark.parametrize("fill", [0, 1])
def test_pixel_auroc_single_class_is_nan(fill: int) -> None:
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert_undefined(metrics.pixel_auroc, np.full((2, 5, 5), fill, np.uint8), maps)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_pixel_metrics_reject_non_finite_maps(bad: float) -> None:
    masks, maps = random_case(0)
    maps[1, 2, 3] = bad
    for function in (metrics.pixel_auroc, metrics.pixel_aupro):
        with pytest.raises(ValueError, match="NaN or infinite"):
            function(masks, maps)


def test_pixel_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.pixel_aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


# --------------------------------------------------------------------------------------------
# Pixel AUPRO, cflow (released) mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_cflow_aupro_equals_reference_loop(seed: int) -> None:
    masks, maps = random_case(seed, levels=40 if seed % 2 else None)
    assert metrics.pixel_aupro(masks, maps) == reference_cflow_aupro(masks, maps)


@pytest.mark.parametrize("seed", range(3))
def test_cflow_aupro_is_independent_of_chunking(seed: int, monkeypatch) -> None:
    masks, maps = random_case(seed, n=7)
    expected = reference_cflow_aupro(masks, maps)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 1)  # one image per chunk
    assert metrics.pixel_aupro(masks, maps) == expected
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 3 * 24 * 24)
    assert metrics.pixel_aupro(masks, maps) == expected


@pytest.mark.parametrize("max_fpr, num_thresholds", [(0.5, 200), (0.3, 37), (1.0, 10)])
def test_cflow_aupro_parameters_follow_reference(max_fpr: float, num_thresholds: int) -> None:
    masks, maps = random_case(11)
    expected = reference_cflow_aupro(masks, maps, max_step=num_thresholds, expect_fpr=max_fpr)
    assert metrics.pixel_aupro(masks, maps, max_fpr=max_fpr, num_thresholds=num_thresholds) == expected


@pytest.mark.parametrize("seed", range(3))
def test_cflow_aupro_pixels_equal_to_thresholds(seed: int) -> None:
    """Maps on the grid k/8 with 8 steps: many pixels equal a threshold exactly (``>`` is strict)."""
    masks, maps = random_case(seed, levels=8)
    low, high = maps.min(), maps.max()
    thresholds = np.arange(low, high, (high - low) / 8)  # the original's thresholds
    assert np.isin(maps, thresholds).mean() > 0.5
    assert metrics.pixel_aupro(masks, maps, num_thresholds=8) == reference_cflow_aupro(masks, maps, max_step=8)


def test_cflow_aupro_with_201_thresholds() -> None:
    """float32 min 0.405 / max 0.605 make np.arange yield 201 thresholds: reproduce the call."""
    masks, maps = random_case(3, levels=None)
    maps = (0.405 + 0.2 * (maps - maps.min()) / np.ptp(maps)).astype(np.float32)
    maps.flat[np.argmin(maps)], maps.flat[np.argmax(maps)] = np.float32(0.405), np.float32(0.605)
    thresholds, fprs, pros = metrics._cflow_pro_curve(masks, maps)
    assert thresholds.size == fprs.size == pros.size == 201
    assert metrics.pixel_aupro(masks, maps) == reference_cflow_aupro(masks, maps)


@pytest.mark.parametrize("offset, spread", [(1000.0, 0.01), (-3.0, 1e-4), (0.0, 1e6)])
def test_threshold_counts_equal_the_original_comparison(offset: float, spread: float) -> None:
    """Pixels exceeding each threshold, counted as ``amap > th`` compares (float32 vs float64)."""
    rng = np.random.default_rng(5)
    maps = (offset + spread * rng.random((3, 16, 16))).astype(np.float32)
    thresholds = metrics._cflow_thresholds(maps, 200)
    comparable = metrics._comparable_thresholds(thresholds, maps.dtype)
    counts = metrics._thresholds_exceeded(maps.ravel(), comparable)
    expected = np.array([(maps.ravel() > th).sum() for th in thresholds])
    assert np.array_equal(np.bincount(counts, minlength=thresholds.size + 1)[::-1].cumsum()[::-1][1:], expected)
    assert np.array_equal(counts, (maps.ravel()[:, None] > thresholds[None, :]).sum(axis=1))


def test_flat_pro_curve_gives_negative_zero() -> None:
    """Anomalous pixels never exceed a kept threshold: PRO stays 0 and the area is -0.0."""
    masks, maps = random_case(2, levels=None)
    maps[masks == 1] = maps.min()
    value = metrics.pixel_aupro(masks, maps)
    assert value == 0.0 and math.copysign(1.0, value) == -1.0
    assert math.copysign(1.0, reference_cflow_aupro(masks, maps)) == -1.0


def test_float32_normal_count_replays_numpy_rounding() -> None:
    """Above 2**24 normal pixels the original's float32 sum of (1 - masks) is not the count."""
    masks = np.zeros((1, 2, 2**24 + 1), dtype=np.uint8)
    masks[0, 0, :3] = 1
    expected = (1 - masks.astype(np.float32)).sum()
    assert int(expected) != masks.size - 3
    assert metrics._float32_normal_count(masks) == expected
    assert metrics._float32_normal_count(masks[:, :1, :1000]) == 997


@pytest.mark.parametrize("mode", metrics.AUPRO_MODES)
def test_aupro_without_anomalous_region_is_nan(mode: str) -> None:
    masks, maps = random_case(0)
    assert_undefined(metrics.pixel_aupro, np.zeros_like(masks), maps, mode=mode)


@pytest.mark.parametrize("mode", metrics.AUPRO_MODES)
def test_aupro_without_normal_pixel_is_nan(mode: str) -> None:
    masks, maps = random_case(0)
    assert_undefined(metrics.pixel_aupro, np.ones_like(masks), maps, mode=mode)


def test_cflow_aupro_constant_maps_is_nan() -> None:
    masks, _ = random_case(0)
    assert_undefined(metrics.pixel_aupro, masks, np.full(masks.shape, 0.5, np.float32))


def test_cflow_aupro_no_threshold_under_max_fpr_is_nan() -> None:
    """Half the normal pixels sit at the maximum: FPR is 0.5 at every threshold."""
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 0, 0] = 1
    maps = np.zeros((2, 4, 4), np.float32)
    maps[1] = 1.0
    assert_undefined(metrics.pixel_aupro, masks, maps)


def test_cflow_aupro_single_threshold_under_max_fpr_is_nan() -> None:
    """FPR is exactly 0.3 (not kept: the cut is strict) up to the last threshold, 0 there."""
    masks = np.zeros((1, 1, 11), np.uint8)
    masks[0, 0, 10] = 1
    maps = np.array([[[0, 0, 0, 0, 0, 0, 0, 0.9925, 0.9925, 0.9925, 1.0]]], np.float32)
    thresholds, fprs, _ = metrics._cflow_pro_curve(masks, maps)
    assert thresholds.size == 200 and np.count_nonzero(fprs < 0.3) == 1 and 0.3 in fprs
    assert_undefined(metrics.pixel_aupro, masks, maps)


def test_aupro_rejects_bad_arguments() -> None:
    masks, maps = random_case(0)
    with pytest.raises(ValueError, match="unknown AUPRO mode"):
        metrics.pixel_aupro(masks, maps, mode="fast")
    with pytest.raises(ValueError, match="max_fpr"):
        metrics.pixel_aupro(masks, maps, max_fpr=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        metrics.pixel_aupro(masks, maps, num_thresholds=0)


# --------------------------------------------------------------------------------------------
# Pixel AUPRO, exact (MVTec AD official) mode
# --------------------------------------------------------------------------------------------


def test_exact_aupro_hand_computed_step_curve() -> None:
    """Curve (0,0)-(0,.5)-(.25,.5)-(.5,.5)-(.5,1)-...: area to 0.3 is 0.15, over 0.3 is 0.5."""
    masks = np.array([[[1, 1, 0, 0, 0, 0]]], np.uint8)
    maps = np.array([[[0.9, 0.4, 0.8, 0.6, 0.2, 0.1]]], np.float32)
    assert metrics.pixel_aupro(masks, maps, mode="exact") == pytest.approx(0.5, abs=1e-12)


def test_exact_aupro_hand_computed_tie_and_interpolation() -> None:
    """A tie at 0.7 makes the segment (.25,0)-(.5,1); at FPR 0.3 it is at 0.2: area 0.005."""
    masks = np.array([[[1, 0, 0, 0, 0]]], np.uint8)
    maps = np.array([[[0.7, 0.8, 0.7, 0.1, 0.1]]], np.float32)
    assert metrics.pixel_aupro(masks, maps, mode="exact") == pytest.approx(0.005 / 0.3, abs=1e-12)


def test_exact_aupro_two_regions_average_per_region() -> None:
    """Region A (1 px) detected first, region B (3 px) never before FPR 0.3: PRO 0.5 from FPR 0."""
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0, 0]]], np.uint8)
    maps = np.array([[[0.9, 0.0, 0.1, 0.1, 0.1, 0.5, 0.4, 0.3]]], np.float32)
    assert metrics.pixel_aupro(masks, maps, mode="exact") == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_exact_aupro_matches_official_reference(seed: int, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 1000)
    masks, maps = random_case(seed, levels=30 if seed % 2 else None)
    expected = reference_exact_aupro(masks, maps)
    assert abs(metrics.pixel_aupro(masks, maps, mode="exact") - expected) <= 1e-9
    expected = reference_exact_aupro(masks, maps, max_fpr=0.6)
    assert abs(metrics.pixel_aupro(masks, maps, mode="exact", max_fpr=0.6) - expected) <= 1e-9


def test_exact_aupro_constant_maps_is_chance() -> None:
    masks, _ = random_case(1)
    maps = np.full(masks.shape, 2.0, np.float32)
    assert metrics.pixel_aupro(masks, maps, mode="exact") == pytest.approx(0.15, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Parity with the original implementation (goldens)
# --------------------------------------------------------------------------------------------


def test_upstream_metrics_parity(goldens_dir: Path) -> None:
    golden = np.load(goldens_dir / "upstream_metrics.npz")
    masks, maps = golden["masks"], golden["amaps"]
    assert metrics.pixel_aupro(masks, maps) == golden["aupro"] == 0.7566331313398087
    _, fprs, pros = metrics._cflow_pro_curve(masks, maps)
    kept = fprs < 0.3
    normalised = (fprs[kept] - fprs[kept].min()) / (fprs[kept].max() - fprs[kept].min())
    assert np.array_equal(normalised, golden["aupro_auc_input_fprs_normalised"])
    assert np.array_equal(pros[kept], golden["aupro_auc_input_pros"])
    assert abs(metrics.pixel_auroc(masks, maps) - golden["pixel_auroc_sklearn"]) <= 1e-9
    assert metrics.image_auroc(golden["image_gt"], golden["image_score"]) == golden["image_auroc_sklearn"]
    assert metrics.image_ap(golden["image_gt"], golden["image_score"]) == golden["image_ap_sklearn"]


def test_reference_loop_reproduces_upstream_curve(goldens_dir: Path) -> None:
    golden = np.load(goldens_dir / "upstream_metrics.npz")
    fprs, pros = reference_cflow_pro_curve(golden["masks"], golden["amaps"])
    assert np.array_equal(fprs, golden["aupro_auc_input_fprs_normalised"])
    assert np.array_equal(pros, golden["aupro_auc_input_pros"])


@pytest.mark.parametrize("name", GOLDEN_EVALS)
def test_eval_per_class_metrics(goldens_dir: Path, name: str) -> None:
    golden = np.load(goldens_dir / f"{name}.npz")
    for cls in GOLDEN_CLASSES:
        values = metrics.compute_class_metrics(
            golden[f"{cls}__gt_sp"],
            golden[f"{cls}__pr_sp"],
            golden[f"{cls}__imgs_masks"][:, 0].astype(np.uint8),
            golden[f"{cls}__anomaly_maps"],
            metric_set="image-pixel-level",
        )
        for key, column in GOLDEN_METRICS.items():
            expected = float(golden[f"{cls}__metric__{key}"])
            assert abs(values[column] - expected) <= 1e-9, (cls, column)
        aupro = values["pixel_aupro"]
        assert aupro == float(golden[f"{cls}__metric__pixel-aupro"]), cls
        assert math.copysign(1.0, aupro) == math.copysign(1.0, float(golden[f"{cls}__metric__pixel-aupro"])), cls
        if name.endswith("sigma2") and cls == "01":
            assert aupro == 0.0 and math.copysign(1.0, aupro) == -1.0  # the original's -0.0 (README)


@pytest.mark.parametrize("name", GOLDEN_EVALS)
def test_table_matches_original(goldens_dir: Path, name: str) -> None:
    golden = np.load(goldens_dir / f"{name}.npz")
    per_class = {
        cls: {column: float(golden[f"{cls}__metric__{key}"]) for key, column in GOLDEN_METRICS.items()}
        for cls in GOLDEN_CLASSES
    }
    table = metrics.format_results_table(per_class, metrics.metric_columns("image-pixel-level"))
    assert table == (goldens_dir / f"{name}_table.txt").read_text().rstrip("\n")


# --------------------------------------------------------------------------------------------
# Table, columns, per-class evaluation
# --------------------------------------------------------------------------------------------


def test_metric_columns() -> None:
    assert metrics.metric_columns("image-level") == ["image_auroc", "image_ap"]
    assert metrics.metric_columns("pixel-level") == ["pixel_auroc", "pixel_aupro"]
    assert metrics.metric_columns("image-pixel-level") == ["pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"]
    with pytest.raises(ValueError, match="unknown metric set"):
        metrics.metric_columns("pixel")


def test_table_formats_cells_like_the_original() -> None:
    """90.0 prints 90; the mean (99.8745) is of the unrounded values, rounded once."""
    per_class = {"bottle": {"image_auroc": 0.9, "image_ap": 0.99949}, "cable": {"image_auroc": 1.0, "image_ap": 0.998}}
    assert metrics.format_results_table(per_class, metrics.metric_columns("image-level")) == (
        "| objects   |   image_auroc |   image_ap |\n"
        "|:----------|--------------:|-----------:|\n"
        "| bottle    |            90 |       99.9 |\n"
        "| cable     |           100 |       99.8 |\n"
        "| mean      |            95 |       99.9 |"
    )


def test_table_nan_cells_and_mean() -> None:
    per_class = {
        "a": {"pixel_auroc": 0.5, "pixel_aupro": math.nan},
        "b": {"pixel_auroc": math.nan, "pixel_aupro": math.nan},
        "c": {"pixel_auroc": 0.7, "pixel_aupro": math.nan},
    }
    lines = metrics.format_results_table(per_class, metrics.metric_columns("pixel-level")).splitlines()
    assert lines[3].split("|")[2:4] == ["           nan ", "           nan "]
    assert lines[-1].split("|")[2:4] == ["            60 ", "           nan "]  # mean of the defined ones


def test_compute_class_metrics_by_metric_set() -> None:
    masks, maps = random_case(4)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    image_only = metrics.compute_class_metrics(labels, scores, metric_set="image-level")
    assert image_only == {"image_auroc": roc_auc_score(labels, scores),
                          "image_ap": average_precision_score(labels, scores)}
    both = metrics.compute_class_metrics(labels, scores, masks, maps, aupro_mode="exact")
    assert list(both) == ["pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"]
    assert abs(both["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) <= 1e-9
    assert abs(both["pixel_aupro"] - reference_exact_aupro(masks, maps)) <= 1e-9
    assert (both["image_auroc"], both["image_ap"]) == (image_only["image_auroc"], image_only["image_ap"])
    pixel_only = metrics.compute_class_metrics(labels, scores, masks, maps, metric_set="pixel-level")
    assert list(pixel_only) == ["pixel_auroc", "pixel_aupro"]
    assert pixel_only["pixel_aupro"] == reference_cflow_aupro(masks, maps)  # the default mode is cflow
    with pytest.raises(ValueError, match="needs pixel masks"):
        metrics.compute_class_metrics(labels, scores, metric_set="pixel-level")


# --------------------------------------------------------------------------------------------
# Decision metrics: F1-max, pixel AP, per defect type
# --------------------------------------------------------------------------------------------


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The brief's definition: 2PR/(P+R) over ``precision_recall_curve`` (0 where P+R == 0), argmax."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall == 0, 0.0, 2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def hand_f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of predicting anomalous where ``score >= threshold``, from the confusion counts."""
    predicted = scores >= threshold
    positive = labels != 0
    tp = np.count_nonzero(predicted & positive)
    fp = np.count_nonzero(predicted & ~positive)
    fn = np.count_nonzero(~predicted & positive)
    return 2 * tp / (2 * tp + fp + fn)


def assert_threshold_attains_f1_max(labels: np.ndarray, scores: np.ndarray, f1: float, threshold: float) -> None:
    labels, scores = labels.ravel(), scores.ravel()
    assert hand_f1(labels, scores, threshold) == pytest.approx(f1, abs=1e-12)
    best_by_hand = max(hand_f1(labels, scores, t) for t in np.unique(scores))
    assert best_by_hand == pytest.approx(f1, abs=1e-12)


def random_labels_scores(seed: int, n: int = 40, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(np.int64)
    labels[:2] = [0, 1]
    scores = (rng.random(n) + 0.4 * labels).astype(np.float32)
    if decimals is not None:
        scores = np.round(scores, decimals)  # heavy ties
    return labels, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("chunk_pixels", [1 << 20, 3])
def test_image_f1_max_matches_sklearn(seed: int, decimals: int | None, chunk_pixels: int, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", chunk_pixels)  # 3: runs of ties span chunks
    labels, scores = random_labels_scores(seed, decimals=decimals)
    f1, threshold = metrics.image_f1_max(labels, scores)
    assert (f1, threshold) == sklearn_f1_max(labels, scores)
    assert_threshold_attains_f1_max(labels, scores, f1, threshold)


def test_image_f1_max_hand_computed() -> None:
    """Thresholds .9/.8/.4/.1 give F1 .5/.4/(6/7)/.75: the maximum 6/7 is at the tied 0.4."""
    f1, threshold = metrics.image_f1_max(np.array([0, 1, 1, 0, 1]), np.array([0.1, 0.4, 0.4, 0.8, 0.9]))
    assert f1 == pytest.approx(6 / 7, abs=1e-15) and threshold == 0.4


@pytest.mark.parametrize("chunk_pixels", [1 << 20, 1])
def test_f1_max_tied_maximum_takes_the_lowest_threshold(chunk_pixels: int, monkeypatch) -> None:
    """F1 is 2/3 both at 0.9 (1 TP, 0 FP) and at 0.5 (2 TP, 2 FP); sklearn's argmax takes 0.5.

    With one value per chunk the two maxima fall in different chunks.
    """
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", chunk_pixels)
    labels, scores = np.array([1, 0, 0, 1]), np.array([0.9, 0.7, 0.6, 0.5])
    assert metrics.image_f1_max(labels, scores) == (2 / 3, 0.5) == sklearn_f1_max(labels, scores)
    assert metrics.pixel_f1_max(labels.reshape(1, 2, 2), scores.reshape(1, 2, 2)) == (2 / 3, 0.5)


def test_image_f1_max_all_equal_scores() -> None:
    labels, scores = np.array([0, 1, 1, 0, 0, 1, 1]), np.full(7, 0.3)
    f1, threshold = metrics.image_f1_max(labels, scores)
    assert (f1, threshold) == sklearn_f1_max(labels, scores)
    assert f1 == pytest.approx(2 * 4 / (2 * 4 + 3), abs=1e-15) and threshold == 0.3


def test_image_f1_max_all_anomalous_is_one_at_the_lowest_score() -> None:
    labels, scores = np.ones(4, int), np.array([0.5, 0.2, 0.9, 0.2])
    assert metrics.image_f1_max(labels, scores) == (1.0, 0.2) == sklearn_f1_max(labels, scores)


def test_image_f1_max_without_anomalous_image_is_nan() -> None:
    with pytest.warns(UndefinedMetricWarning):
        f1, threshold = metrics.image_f1_max(np.zeros(5, int), np.arange(5.0))
    assert math.isnan(f1) and math.isnan(threshold)


def test_image_f1_max_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.image_f1_max(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.image_f1_max(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="differ in length"):
        metrics.image_f1_max(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_pixels", [1 << 20, 700])
def test_pixel_ap_and_f1_max_match_sklearn(seed: int, chunk_pixels: int, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", chunk_pixels)
    masks, maps = random_case(seed, levels=10 if seed % 2 else None)
    for case_masks in (masks, 1 - masks):  # anomalous pixels the minority, then the majority
        flat_masks, flat_maps = case_masks.ravel(), maps.ravel()
        assert abs(metrics.pixel_ap(case_masks, maps) - average_precision_score(flat_masks, flat_maps)) <= 1e-12
        f1, threshold = metrics.pixel_f1_max(case_masks, maps)
        assert (f1, threshold) == sklearn_f1_max(flat_masks, flat_maps)
        assert_threshold_attains_f1_max(flat_masks, flat_maps, f1, threshold)


def test_pixel_ap_hand_computed_with_ties() -> None:
    """Descending: 0.9 (A), then 0.5 tied between A and N, then 0.1 (A, N): AP = 1/3 + 1/3 * 2/3 + 1/3 * 3/5."""
    masks = np.array([[[1, 1, 0, 1, 0]]], np.uint8)
    maps = np.array([[[0.9, 0.5, 0.5, 0.1, 0.1]]], np.float32)
    expected = 1 / 3 + (1 / 3) * (2 / 3) + (1 / 3) * (3 / 5)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-15)


def test_pixel_ap_and_f1_max_constant_maps() -> None:
    masks, _ = random_case(1)
    maps = np.full(masks.shape, 0.25, np.float32)
    prevalence = masks.mean()
    assert average_precision_score(masks.ravel(), maps.ravel()) == pytest.approx(prevalence, abs=1e-12)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(prevalence, abs=1e-12)
    f1, threshold = metrics.pixel_f1_max(masks, maps)
    assert (f1, threshold) == sklearn_f1_max(masks.ravel(), maps.ravel())
    assert f1 == pytest.approx(2 * prevalence / (1 + prevalence), abs=1e-12) and threshold == 0.25


def test_pixel_ap_and_f1_max_without_anomalous_pixel_are_nan() -> None:
    masks, maps = random_case(0)
    assert_undefined(metrics.pixel_ap, np.zeros_like(masks), maps)
    with pytest.warns(UndefinedMetricWarning):
        f1, threshold = metrics.pixel_f1_max(np.zeros_like(masks), maps)
    assert math.isnan(f1) and math.isnan(threshold)


def test_pixel_ap_rejects_non_finite_maps() -> None:
    masks, maps = random_case(0)
    maps[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.pixel_ap(masks, maps)


def traced_peak_bytes(function, *args) -> int:
    """Peak bytes allocated through Python/numpy while ``function(*args)`` runs (tracemalloc)."""
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("function", [metrics.pixel_auroc, metrics.pixel_ap, metrics.pixel_f1_max])
def test_pixel_metrics_memory_is_one_copy_plus_chunks(function, monkeypatch) -> None:
    """1M float32 pixels: one 4 MiB copy of the scores plus chunk temporaries, never a float64 copy.

    As ``benchmarks/bench_metrics.py`` measures it; sklearn's ``average_precision_score``
    allocates over ten times the maps here.
    """
    chunk_pixels = 1 << 13
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", chunk_pixels)
    rng = np.random.default_rng(0)
    masks = (rng.random((64, 128, 128)) < 0.3).astype(np.uint8)
    maps = (rng.random(masks.shape) + 0.1 * masks).astype(np.float32)  # nearly all distinct: full chunks
    peak = traced_peak_bytes(function, masks, maps)
    # 5.1 MiB; a float64 copy of the scores alone (8 MiB) would break it.
    assert peak <= maps.nbytes + 128 * chunk_pixels + (1 << 16)


def test_decision_metrics_match_sklearn() -> None:
    masks, maps = random_case(5, n=9, levels=15)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    scores = np.round(maps.reshape(len(maps), -1).max(axis=1), 1)
    values = metrics.decision_metrics(labels, scores, masks, maps)
    assert list(values) == ["image_f1_max", "image_f1_threshold", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold"]
    assert (values["image_f1_max"], values["image_f1_threshold"]) == sklearn_f1_max(labels, scores)
    assert abs(values["pixel_ap"] - average_precision_score(masks.ravel(), maps.ravel())) <= 1e-12
    assert (values["pixel_f1_max"], values["pixel_f1_threshold"]) == sklearn_f1_max(masks.ravel(), maps.ravel())


@pytest.mark.parametrize("label", [0, 1])
def test_decision_metrics_single_image_label_gives_nan_image_keys(label: int) -> None:
    masks, maps = random_case(2)
    with pytest.warns(UndefinedMetricWarning):
        values = metrics.decision_metrics(np.full(len(masks), label), np.arange(len(masks)) / 10, masks, maps)
    assert math.isnan(values["image_f1_max"]) and math.isnan(values["image_f1_threshold"])
    assert values["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)


@pytest.mark.parametrize("fill", [0, 1])
def test_decision_metrics_single_pixel_class_gives_nan_pixel_keys(fill: int) -> None:
    _, maps = random_case(2)
    labels = np.arange(len(maps)) % 2
    scores = np.arange(len(maps)) / 10
    with pytest.warns(UndefinedMetricWarning):
        values = metrics.decision_metrics(labels, scores, np.full(maps.shape, fill, np.uint8), maps)
    assert all(math.isnan(values[key]) for key in ("pixel_ap", "pixel_f1_max", "pixel_f1_threshold"))
    assert (values["image_f1_max"], values["image_f1_threshold"]) == sklearn_f1_max(labels, scores)


def defect_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Nine images: three normal (type 'good'), then 'crack' and 'hole' ones."""
    masks, maps = random_case(6, n=9, levels=25)
    masks[[0, 3, 6]] = 0
    masks[[1, 2, 4, 5, 7, 8], 5:9, 5:9] = 1  # every defect image has anomalous pixels
    labels = masks.reshape(len(masks), -1).max(axis=1)
    scores = np.round(maps.reshape(len(maps), -1).mean(axis=1) + 0.01 * labels, 3)
    types = ["good", "crack", "hole", "good", "crack", "crack", "good", "hole", "hole"]
    return labels, scores, masks, maps, types


def test_per_defect_type_auroc_matches_sklearn_on_subsets(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 2 * 24 * 24)  # subsets gathered in several groups
    labels, scores, masks, maps, types = defect_case()
    results = metrics.per_defect_type_auroc(labels, scores, masks, maps, types)
    assert list(results) == ["crack", "hole"]
    for name, images in (("crack", [0, 1, 3, 4, 5, 6]), ("hole", [0, 2, 3, 6, 7, 8])):
        assert results[name]["image_auroc"] == roc_auc_score(labels[images], scores[images])
        expected = roc_auc_score(masks[images].ravel(), maps[images].ravel())
        assert abs(results[name]["pixel_auroc"] - expected) <= 1e-12


def test_per_defect_type_auroc_ignores_the_type_of_normal_images() -> None:
    labels, scores, masks, maps, types = defect_case()
    types[0] = "crack"  # a normal image is a normal image whatever its type says
    results = metrics.per_defect_type_auroc(labels, scores, masks, maps, types)
    images = [0, 1, 3, 4, 5, 6]
    assert results["crack"]["image_auroc"] == roc_auc_score(labels[images], scores[images])


def test_per_defect_type_auroc_undefined_cases() -> None:
    labels, scores, masks, maps, types = defect_case()
    defects = labels == 1  # no normal image: the image AUROC has a single label
    with pytest.warns(UndefinedMetricWarning):
        results = metrics.per_defect_type_auroc(labels[defects], scores[defects], masks[defects], maps[defects],
                                                [t for t, d in zip(types, defects) if d])
    assert math.isnan(results["hole"]["image_auroc"])
    hole = [2, 7, 8]
    assert abs(results["hole"]["pixel_auroc"] - roc_auc_score(masks[hole].ravel(), maps[hole].ravel())) <= 1e-12
    with pytest.raises(ValueError, match="differ in number"):
        metrics.per_defect_type_auroc(labels, scores, masks, maps, types[:-1])


def test_decision_metrics_without_masks_leave_pixel_keys_nan(recwarn) -> None:
    labels, scores = np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    values = metrics.decision_metrics(labels, scores, None, None)
    assert (values["image_f1_max"], values["image_f1_threshold"]) == sklearn_f1_max(labels, scores)
    assert all(math.isnan(values[key]) for key in ("pixel_ap", "pixel_f1_max", "pixel_f1_threshold"))
    assert not [w for w in recwarn if issubclass(w.category, UndefinedMetricWarning)]


def test_per_defect_type_auroc_without_masks() -> None:
    labels, scores, _, _, types = defect_case()
    results = metrics.per_defect_type_auroc(labels, scores, None, None, types)
    images = [0, 2, 3, 6, 7, 8]
    assert results["hole"]["image_auroc"] == roc_auc_score(labels[images], scores[images])
    assert math.isnan(results["hole"]["pixel_auroc"])


# --------------------------------------------------------------------------------------------
# PRO curve (the report's plot)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_cflow_pro_curve_is_the_reference_curve_before_normalisation(seed: int) -> None:
    masks, maps = random_case(seed, levels=40)
    fprs, pros = metrics.pro_curve(masks, maps, mode="cflow")
    reference_fprs, reference_pros = reference_cflow_pro_curve(masks, maps)
    assert np.all(np.diff(fprs) >= 0) and fprs.max() < 0.3
    # The reference walks thresholds upwards (FPR descending); the curve is in FPR order.
    np.testing.assert_allclose(pros, reference_pros[::-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose((fprs - fprs.min()) / (fprs.max() - fprs.min()), reference_fprs[::-1], atol=1e-12)


def test_exact_pro_curve_hand_computed() -> None:
    """The step case above: PRO 0.5 from FPR 0 to the cut at 0.3 (vertices at 0.25)."""
    masks = np.array([[[1, 1, 0, 0, 0, 0]]], np.uint8)
    maps = np.array([[[0.9, 0.4, 0.8, 0.6, 0.2, 0.1]]], np.float32)
    fprs, pros = metrics.pro_curve(masks, maps, mode="exact")
    np.testing.assert_allclose(fprs, [0.0, 0.25, 0.25, 0.3], atol=1e-12)
    np.testing.assert_allclose(pros, [0.5, 0.5, 0.5, 0.5], atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_exact_pro_curve_area_is_the_exact_aupro(seed: int) -> None:
    masks, maps = random_case(seed, levels=30 if seed % 2 else None)
    fprs, pros = metrics.pro_curve(masks, maps, mode="exact")
    area = float(np.sum(0.5 * (pros[1:] + pros[:-1]) * np.diff(fprs)))
    assert fprs[0] == 0.0 and fprs[-1] == pytest.approx(0.3) and np.all(np.diff(fprs) >= 0)
    assert area / 0.3 == pytest.approx(reference_exact_aupro(masks, maps), abs=1e-9)


@pytest.mark.parametrize("mode", metrics.AUPRO_MODES)
def test_pro_curve_undefined_is_none(mode: str) -> None:
    masks, maps = random_case(1)
    assert metrics.pro_curve(np.zeros_like(masks), maps, mode=mode) is None
    assert metrics.pro_curve(np.ones_like(masks), maps, mode=mode) is None
