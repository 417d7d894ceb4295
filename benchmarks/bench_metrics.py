"""Benchmark: pixel AUPRO and pixel AUROC against their direct references.

Builds one class the size of MVTec AD's ``bottle`` test set (83 maps of 518x518, float32, with
realistic blob masks), then times

* the released AUPRO loop (``tests/metrics_reference.py``: re-label and re-measure every region
  at each of the 200 thresholds) against ``metrics.pixel_aupro`` (cflow mode);
* ``sklearn.metrics.roc_auc_score`` on the flattened class against ``metrics.pixel_auroc``,

checks that the values agree (AUPRO to 1e-6, AUROC to 1e-9), prints the times, speed-ups, the
peak memory each AUROC allocates and the process's peak RSS, and exits 1 if a value differs.

Usage: ``python benchmarks/bench_metrics.py [--images 83] [--size 518] [--seed 0]``
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metrics  # noqa: E402
from tests.metrics_reference import reference_cflow_aupro  # noqa: E402

AUPRO_TOLERANCE = 1e-6
AUROC_TOLERANCE = 1e-9
TARGET_SPEEDUP = 50.0


def blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """One irregular blob: a rotated ellipse whose radius is modulated by smooth noise."""
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(6, size / 7, 2)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    wobble = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 8)
    wobble *= 0.35 / (np.abs(wobble).max() + 1e-12)
    return u * u + v * v < (1.0 + wobble) ** 2


def make_class(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks (N, S, S) uint8 and maps (N, S, S) float32: about a quarter normal, the rest 1-3 blobs."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    for i in range(n_images):
        if rng.random() >= 0.25:
            for _ in range(rng.integers(1, 4)):
                masks[i] |= blob(rng, size)
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 3)
        signal = ndimage.gaussian_filter(masks[i].astype(np.float32), 4) * rng.uniform(0.0, 0.15)
        maps[i] = 0.3 + 0.5 * noise + signal
    return masks, maps


def timed(function: Callable[[], float], repeats: int = 1) -> tuple[float, float]:
    """(value, best wall time in seconds) over ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return value, best


def traced_peak_mib(function: Callable[[], float]) -> float:
    """Peak memory (MiB) that ``function`` allocates through Python/numpy, via tracemalloc."""
    tracemalloc.start()
    function()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=83)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    masks, maps = make_class(args.images, args.size, args.seed)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(
        f"class: {args.images} maps of {args.size}x{args.size} float32 ({maps.nbytes / 2**20:.0f} MiB), "
        f"{int((masks.reshape(len(masks), -1).max(1) == 0).sum())} normal images, {n_regions} regions, "
        f"{masks.mean() * 100:.2f}% anomalous pixels"
    )

    ours, t_ours = timed(lambda: metrics.pixel_aupro(masks, maps), repeats=3)
    print(f"pixel AUPRO, ours (cflow):        {t_ours:8.3f} s  value {ours!r}")
    reference, t_reference = timed(lambda: reference_cflow_aupro(masks, maps))
    print(f"pixel AUPRO, reference loop:      {t_reference:8.3f} s  value {reference!r}")
    aupro_ok = abs(ours - reference) <= AUPRO_TOLERANCE
    speedup = t_reference / t_ours
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    print(f"  |diff| {abs(ours - reference):.3g}; speed-up {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {verdict})")

    auroc, t_auroc = timed(lambda: metrics.pixel_auroc(masks, maps), repeats=3)
    print(f"pixel AUROC, ours:                {t_auroc:8.3f} s  value {auroc!r}")
    sk_auroc, t_sk = timed(lambda: roc_auc_score(masks.ravel(), maps.ravel()))
    print(f"pixel AUROC, sklearn:             {t_sk:8.3f} s  value {sk_auroc!r}")
    auroc_ok = abs(auroc - sk_auroc) <= AUROC_TOLERANCE
    print(f"  |diff| {abs(auroc - sk_auroc):.3g}; speed-up {t_sk / t_auroc:.1f}x")

    peak_ours = traced_peak_mib(lambda: metrics.pixel_auroc(masks, maps))
    peak_sk = traced_peak_mib(lambda: roc_auc_score(masks.ravel(), maps.ravel()))
    peak_aupro = traced_peak_mib(lambda: metrics.pixel_aupro(masks, maps))
    print(
        f"peak allocation: pixel AUROC ours {peak_ours:.0f} MiB, sklearn {peak_sk:.0f} MiB; "
        f"pixel AUPRO ours {peak_aupro:.0f} MiB (maps are {maps.nbytes / 2**20:.0f} MiB)"
    )
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    if not (aupro_ok and auroc_ok):
        print("FAIL: values differ beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
