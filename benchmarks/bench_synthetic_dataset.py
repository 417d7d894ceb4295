"""Benchmark: how long synthetic_dataset takes to write the demo-sized datasets.

Writes the MVTec-layout and the VisA-layout synthetic datasets as ``demo.sh`` does
(synthetic_dataset's defaults: 3 classes each, 8 training, 4 normal and 8 defective test images
per class, 128x128 px) into a temporary folder, ``--repeats`` times, and prints ONE JSON line:
the fastest and the median wall time of writing both, the number of files written and the images
per second. Exits 1 if the fastest run exceeds ``--limit-s`` (default 10 s, the budget a demo can afford).

Usage::

    python benchmarks/bench_synthetic_dataset.py                 # demo size: about a second
    python benchmarks/bench_synthetic_dataset.py --size 32 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import synthetic as synth  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defect", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-s", type=float, default=10.0, help="exit 1 if the fastest run is slower")
    return parser.parse_args(argv)


def write_both(root: Path, args: argparse.Namespace) -> int:
    """Write both layouts under ``root``; returns the number of files written."""
    sizes = {"n_train": args.n_train, "n_test_good": args.n_test_good, "n_test_defect": args.n_test_defect,
             "image_size": (args.size, args.size)}
    synth.make_mvtec_like(root / "mvtec", **sizes)
    synth.make_visa_like(root / "visa", **sizes)
    return sum(1 for path in root.rglob("*") if path.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    times, files = [], 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench_synth_") as folder:
            start = time.perf_counter()
            files = write_both(Path(folder), args)
            times.append(time.perf_counter() - start)
    classes = len(synth.MVTEC_CLASSES) + len(synth.VISA_CLASSES)
    images = classes * (args.n_train + args.n_test_good + args.n_test_defect)
    best = min(times)
    result = {
        "benchmark": "synthetic_dataset",
        "size": args.size,
        "images": images,
        "files": files,
        "best_s": round(best, 3),
        "median_s": round(statistics.median(times), 3),
        "images_per_s": round(images / best, 1),
        "repeats": args.repeats,
        "limit_s": args.limit_s,
        "within_limit": best <= args.limit_s,
    }
    print(json.dumps(result))
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
