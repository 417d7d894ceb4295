"""Benchmark: memory and post-processing time of test.py's evaluation path at MVTec AD's size.

Runs ``test.collect_metrics`` (per-class gathering, then each class's metrics: image AUROC/AP,
pixel AUROC, cflow AUPRO) on a stream of synthetic ``test.ImageResult``s shaped like MVTec AD's
test set: 15 classes with its real test-set sizes (1,725 images; 467 normal), 518x518 float32
anomaly maps and uint8 masks, in dataset order. The model forward is replaced by maps made on
the fly: smoothed noise plus a blurred copy of the image's mask (1-3 irregular blobs per
anomalous image, none for normal ones), cut from a few precomputed random fields at per-image
offsets, so that making one costs about a millisecond. Each raw map then goes through
``AnomalyCLIP_lib.scoring.gaussian_smooth`` (sigma 4), as ``scoring.predict`` does in a real run.

Before that, the full-size backbone (``random_state_dict(**VIT_L14_336)`` in fp16, as OpenAI
ships it, through ``build_model``) is loaded into the process, so that the peak RSS includes the
model weights as in a real run (``--no-model`` skips it).

Prints ONE JSON line: peak RSS (``ru_maxrss``: the whole process, model loading included) and
the peak during evaluation alone, the time outside the model (post-processing = Gaussian
filter + gathering + metrics, i.e. ``collect_metrics`` wall time minus the time spent making the
synthetic maps), per image, and the metric values' mean. Exits 1 if the peak RSS exceeds
``--limit-mb`` (default 6 GB = 6144 MiB).

Usage::

    python benchmarks/bench_eval_memory.py                   # MVTec AD size, full model: about 1 minute
    python benchmarks/bench_eval_memory.py --no-model --size 64 --max-per-class 4   # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))

import metrics  # noqa: E402
from AnomalyCLIP_lib.model import build_model  # noqa: E402
from pipeline.random_weights import PRESETS, random_state_dict  # noqa: E402
from AnomalyCLIP_lib.scoring import gaussian_smooth  # noqa: E402
from measure import peak_rss_mb, process_peak_rss_mb, reset_peak_rss  # noqa: E402
from bench_metrics import blob  # noqa: E402
from pipeline.evaluation import ImageResult, collect_metrics  # noqa: E402

# MVTec AD test set: class -> (images, normal images); 1,725 images, 467 normal.
MVTEC_AD_TEST = {
    "bottle": (83, 20), "cable": (150, 58), "capsule": (132, 23), "carpet": (117, 28), "grid": (78, 21),
    "hazelnut": (110, 40), "leather": (124, 32), "metal_nut": (115, 22), "pill": (167, 26), "screw": (160, 41),
    "tile": (117, 33), "toothbrush": (42, 12), "transistor": (100, 60), "wood": (79, 19), "zipper": (151, 32),
}
SIGMA = 4.0
N_FIELDS = 4
N_BLOBS = 24


class SyntheticResults:
    """Per-image results of a synthetic dataset, made on demand; times what making them costs.

    Attributes:
        generation_s: Time spent making masks and raw maps (the stand-in for the model).
        filter_s: Time spent in the Gaussian filter (post-processing of a real run).
        max_alive: Most per-image maps alive at once (tracked with weak references): what the
            evaluation held, at most one class's worth when it gathers class by class.
    """

    def __init__(self, sizes: dict[str, tuple[int, int]], size: int, seed: int) -> None:
        self.sizes = sizes
        self.size = size
        self.rng = np.random.default_rng(seed)
        pad = size // 2
        self.fields = [ndimage.gaussian_filter(self.rng.standard_normal((size + pad, size + pad)).astype(np.float32), 3)
                       for _ in range(N_FIELDS)]
        self.blobs = [blob(self.rng, size) for _ in range(N_BLOBS)]
        self.blurred = [ndimage.gaussian_filter(b.astype(np.float32), 4) for b in self.blobs]
        self.generation_s = 0.0
        self.filter_s = 0.0
        self.alive = 0
        self.max_alive = 0

    def _released(self) -> None:
        self.alive -= 1

    def _one(self, anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
        """(mask uint8, raw map float32) of one image."""
        size, rng = self.size, self.rng
        mask = np.zeros((size, size), dtype=np.uint8)
        signal = np.zeros((size, size), dtype=np.float32)
        if anomalous:
            for _ in range(rng.integers(1, 4)):
                k = int(rng.integers(N_BLOBS))
                shift = tuple(int(s) for s in rng.integers(-size // 4, size // 4, 2))
                mask |= np.roll(self.blobs[k], shift, axis=(0, 1))
                signal += np.roll(self.blurred[k], shift, axis=(0, 1))
        field = self.fields[int(rng.integers(N_FIELDS))]
        y, x = (int(v) for v in rng.integers(0, field.shape[0] - size, 2))
        raw = 0.3 + 0.5 * field[y:y + size, x:x + size] + signal * np.float32(rng.uniform(0.0, 0.15))
        return mask, raw.astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[ImageResult]:
        index = 0
        for cls_name, (count, n_normal) in self.sizes.items():
            labels = np.r_[np.zeros(n_normal, dtype=np.int64), np.ones(count - n_normal, dtype=np.int64)]
            self.rng.shuffle(labels)
            for label in labels:
                start = time.perf_counter()
                mask, raw = self._one(bool(label))
                score = float(np.clip(0.5 + 0.1 * label + 0.2 * self.rng.standard_normal(), 0, 1))
                filtered_start = time.perf_counter()
                anomaly_map = gaussian_smooth(torch.from_numpy(raw)[None], SIGMA)[0].numpy()
                done = time.perf_counter()
                self.generation_s += filtered_start - start
                self.filter_s += done - filtered_start
                self.alive += 1
                self.max_alive = max(self.max_alive, self.alive)
                weakref.finalize(anomaly_map, self._released)
                path = f"{cls_name}/test/{'defect' if label else 'good'}/{index:03d}.png"
                yield ImageResult(index=index, img_path=path, image_file=path, cls_name=cls_name, label=int(label),
                                  score=score, anomaly_map=anomaly_map, mask=mask)
                index += 1


def class_sizes(max_classes: int | None, max_per_class: int | None) -> dict[str, tuple[int, int]]:
    """MVTec AD's test-set sizes, optionally fewer classes or fewer images (keeping the normal share)."""
    sizes = dict(list(MVTEC_AD_TEST.items())[:max_classes])
    if max_per_class:
        sizes = {name: (min(count, max_per_class), max(1, min(count, max_per_class) * normal // count))
                 for name, (count, normal) in sizes.items()}
    return sizes


def load_backbone(preset: str) -> object:
    """The backbone with random weights, fp16 in the state dict as OpenAI ships it, fp32 after loading."""
    model = build_model(random_state_dict(0, dtype=torch.float16, **PRESETS[preset]))
    gc.collect()
    return model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=518, help="map side (pixels)")
    parser.add_argument("--max-classes", type=int, default=None, help="use only the first classes")
    parser.add_argument("--max-per-class", type=int, default=None, help="at most this many images per class")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ViT-L/14@336px", help="backbone loaded first")
    parser.add_argument("--no-model", action="store_true", help="do not load a backbone first")
    parser.add_argument("--limit-mb", type=float, default=6144.0, help="fail above this peak RSS (MiB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 48:
        parser.error("--size must be at least 48 (the synthetic blobs need it)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    model = None if args.no_model else load_backbone(args.preset)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_mb()
    rss_reset = reset_peak_rss()
    rss_before = peak_rss_mb() if rss_reset else None

    sizes = class_sizes(args.max_classes, args.max_per_class)
    results = SyntheticResults(sizes, args.size, args.seed)
    expected = {name: count for name, (count, _) in sizes.items()}
    n_images = sum(expected.values())
    score_rows: list[tuple[str, str, int, float]] = []
    consumers = [lambda r: score_rows.append((r.img_path, r.cls_name, r.label, r.score))]  # as test.evaluate

    start = time.perf_counter()
    per_class = collect_metrics(results, expected, "image-pixel-level", "cflow", consumers)
    total_s = time.perf_counter() - start
    outside_s = total_s - results.generation_s
    eval_peak = peak_rss_mb() if rss_reset else None
    peak = max(process_peak_rss_mb(), load_peak, eval_peak or 0.0)

    map_mb = args.size * args.size * (4 + 1) / 2**20  # one map (float32) and one mask (uint8)
    columns = metrics.metric_columns("image-pixel-level")
    mean = metrics.mean_over_classes(per_class, columns)
    result = {
        "peak_rss_mb": round(peak, 1),
        "limit_mb": args.limit_mb,
        "within_limit": peak <= args.limit_mb,
        "model": None if model is None else args.preset,
        "model_load_s": round(load_s, 1),
        "rss_after_model_mb": None if rss_before is None else round(rss_before, 1),
        "eval_peak_rss_mb": None if eval_peak is None else round(eval_peak, 1),
        "eval_rss_increase_mb": None if eval_peak is None else round(eval_peak - rss_before, 1),
        "max_maps_alive": results.max_alive,
        "largest_class_images": max(expected.values()),
        "largest_class_maps_masks_mb": round(max(expected.values()) * map_mb, 1),
        "all_maps_masks_mb": round(n_images * map_mb, 1),
        "images": n_images,
        "classes": len(expected),
        "size": args.size,
        "collect_metrics_s": round(total_s, 2),
        "generation_s": round(results.generation_s, 2),
        "outside_model_s": round(outside_s, 2),
        "outside_model_ms_per_image": round(outside_s / n_images * 1e3, 2),
        "gaussian_filter_ms_per_image": round(results.filter_s / n_images * 1e3, 2),
        "metrics_ms_per_image": round((outside_s - results.filter_s) / n_images * 1e3, 2),
        "mean_metrics": {k: round(float(v), 4) for k, v in mean.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    failures = []
    if not result["within_limit"]:
        failures.append(f"peak RSS {peak:.0f} MiB exceeds {args.limit_mb:.0f} MiB")
    if results.max_alive > max(expected.values()) + 1:  # + the result in the consumer loop
        failures.append(f"{results.max_alive} maps alive at once: more than one class's")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
