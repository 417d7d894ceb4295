"""Direct reference implementations of the AUPRO variants, kept as obviously-faithful baselines.

``reference_cflow_aupro`` is the released ``cal_pro_score`` loop (AnomalyCLIP ``metrics.py``,
itself from cflow-ad) written out as the original does it: at every threshold it binarises all
maps, re-labels every mask and re-measures every region. Only ``skimage.measure.label`` /
``regionprops`` are swapped for ``scipy.ndimage.label`` with an all-ones 3x3 structure
(8-connectivity, skimage's 2-D default) and ``find_objects`` bounding boxes, which is how
``regionprops`` measures a region. It is slow on purpose; ``metrics.pixel_aupro`` must agree with it.

``reference_exact_aupro`` follows the MVTec AD official evaluation code (``compute_pro`` and
``trapezoid`` with ``x_max``), in float64, for checking ``pixel_aupro(mode="exact")``.
"""

from __future__ import annotations

from bisect import bisect

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def reference_cflow_pro_curve(
    masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Return the (min-max normalised FPRs, PROs) the original passes to ``sklearn.metrics.auc``.

    Args:
        masks: (N, H, W) ground truth, 0/1. Cast to float32 as the original's masks are.
        amaps: (N, H, W) anomaly maps.
        max_step: Number of threshold steps.
        expect_fpr: Thresholds with FPR below this are kept.
    """
    masks = np.asarray(masks, dtype=np.float32)
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks):
            labeled, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
            for region_id, region_slice in enumerate(ndimage.find_objects(labeled), start=1):
                region = labeled[region_slice] == region_id
                tp_pixels = binary_amap[region_slice][region].sum()
                pro.append(tp_pixels / region.sum())
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return fprs, pros[idxes]


def reference_cflow_aupro(
    masks: np.ndarray, amaps: np.ndarray, max_step: int = 200, expect_fpr: float = 0.3
) -> float:
    """The released ``cal_pro_score``: area under the normalised cflow PRO curve."""
    fprs, pros = reference_cflow_pro_curve(masks, amaps, max_step, expect_fpr)
    return auc(fprs, pros)


def reference_exact_aupro(masks: np.ndarray, amaps: np.ndarray, max_fpr: float = 0.3) -> float:
    """MVTec AD official PRO: exact curve, area up to ``max_fpr`` (interpolated), over ``max_fpr``."""
    fp_changes = np.zeros(amaps.shape, dtype=np.float64)
    pro_changes = np.zeros(amaps.shape, dtype=np.float64)
    num_ok_pixels = 0
    num_gt_regions = 0
    for index, gt_map in enumerate(masks):
        labeled, n_components = ndimage.label(gt_map, structure=EIGHT_CONNECTED)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_changes[index][ok_mask] = 1
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_changes[index][region_mask] = 1.0 / np.sum(region_mask)
    order = np.argsort(amaps.ravel(), kind="stable")[::-1]
    scores = amaps.ravel()[order]
    fprs = np.cumsum(fp_changes.ravel()[order]) / num_ok_pixels
    pros = np.cumsum(pro_changes.ravel()[order]) / num_gt_regions
    keep = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate(([0.0], np.clip(fprs[keep], None, 1.0), [1.0]))
    pros = np.concatenate(([0.0], np.clip(pros[keep], None, 1.0), [1.0]))
    return _trapezoid(fprs, pros, max_fpr) / max_fpr


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """The official ``trapezoid``: area under (x, y) up to ``x_max``, interpolating at ``x_max``."""
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    inside = x <= x_max
    x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)
