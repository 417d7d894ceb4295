"""Benchmark: training from the frozen-feature cache against the uncached trainer, and torchrun test.py.

Builds the full CLIP ViT-L/14@336px architecture with seeded random weights (no download; the
cost of a forward does not depend on the weights' values) and a small synthetic MVTec-layout
dataset, then runs ``train.py`` in this process:

* cached, 1 epoch and ``--epochs`` epochs; uncached (``--no_cache``), ``--epochs`` epochs;
* an untimed warm-up run, then a start-up run (model and data loading only: a resume from the last epoch, which has
  nothing to do), subtracted from each wall time to give the training time proper;
* the number of frozen image forwards of each run (from its log), and the largest difference
  between the cached and the uncached checkpoints of the last epoch.

With ``--torchrun`` it also times ``torchrun --nproc_per_node 2 test.py`` against one process on
the same data and the cached checkpoint (gloo on the CPU). On a 2-core machine little or no
speed-up is expected: the two ranks share the same cores. The value is on several GPUs or
machines.

Prints progress on stderr and ONE JSON line on stdout.

Usage::

    python benchmarks/bench_train.py                     # ViT-L/14@336, 336 px, 4 images, 4 epochs (~3 min, 2 cores)
    python benchmarks/bench_train.py --torchrun          # plus test.py under torchrun, 2 ranks vs 1
    python benchmarks/bench_train.py --preset tiny --image-size 56 --epochs 2   # seconds, smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import training as train  # noqa: E402
from pipeline.random_weights import PRESETS, random_state_dict  # noqa: E402
from pipeline.synthetic import make_mvtec_like  # noqa: E402

TARGET_RATIO = 1.6  # E cached epochs at most this many times one cached epoch (the target for E = 4)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train(common: list[str], save_path: Path, *extra: str) -> tuple[float, int]:
    """Wall time of one ``train.py`` run in this process, and its frozen image forwards."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main([*common, "--save_path", str(save_path), *extra]) == 0
    wall = time.perf_counter() - started
    forwards = [int(n) for n in re.findall(r"frozen image forwards: (\d+)", (save_path / "log.txt").read_text())]
    _log(f"  train {' '.join(extra)}: {wall:.1f} s, forwards {forwards}")
    return wall, sum(forwards)


def _max_diff(a: Path, b: Path) -> float:
    first = torch.load(a, weights_only=True)["prompt_learner"]
    second = torch.load(b, weights_only=True)["prompt_learner"]
    return max(float((first[key] - second[key]).abs().max()) for key in first)


def _torchrun_test(nproc: int, data: Path, checkpoint: Path, save_path: Path, design: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "test.py", "--data_path", str(data), "--checkpoint_path", str(checkpoint), "--save_path",
               str(save_path), "--batch_size", "2", "--num_workers", "0", *design]
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"torchrun test.py with {nproc} processes failed:\n{completed.stderr[-3000:]}")
    _log(f"  torchrun test.py x{nproc}: {wall:.1f} s")
    return wall


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    backbone = work / "backbone.pt"
    architecture = dict(PRESETS[args.preset])
    torch.save(random_state_dict(0, dtype=torch.float16, **architecture), backbone)
    data = work / "data"
    n_defect = args.n_images // 2
    make_mvtec_like(data, class_names=("stripes",), n_train=1, n_test_good=args.n_images - n_defect,
                    n_test_defect=n_defect, image_size=(args.image_size, args.image_size), seed=0)
    design = ["--backbone", str(backbone), "--image_size", str(args.image_size), "--features_list",
              *map(str, args.features_list), "--device", "cpu"]
    common = ["--train_data_path", str(data), "--batch_size", str(args.batch_size), "--num_workers", "0", *design]

    E = args.epochs
    _train(common, work / "warmup", "--epoch", "1")  # untimed: first-run costs (thread pools, page cache)
    startup, _ = _train(common, work / "startup", "--epoch", "1", "--resume", str(work / "warmup" / "epoch_1.pth"))
    cached_1, forwards_cached_1 = _train(common, work / "cached_1", "--epoch", "1")
    cached_e, forwards_cached_e = _train(common, work / "cached_e", "--epoch", str(E))
    uncached_e, forwards_uncached_e = _train(common, work / "uncached_e", "--epoch", str(E), "--no_cache")
    train_1, train_e, train_uncached = (max(t - startup, 1e-9) for t in (cached_1, cached_e, uncached_e))
    result: dict[str, object] = {
        "preset": args.preset, "image_size": args.image_size, "n_images": args.n_images, "epochs": E,
        "batch_size": args.batch_size, "features_list": args.features_list,
        "startup_s": round(startup, 2),
        "cached_1_epoch_s": round(train_1, 2), f"cached_{E}_epochs_s": round(train_e, 2),
        f"uncached_{E}_epochs_s": round(train_uncached, 2),
        "cached_ratio_E_over_1": round(train_e / train_1, 3),
        "target_ratio": TARGET_RATIO,
        "speedup_cached_vs_uncached": round(train_uncached / train_e, 3),
        "forwards_cached_1_epoch": forwards_cached_1, f"forwards_cached_{E}_epochs": forwards_cached_e,
        f"forwards_uncached_{E}_epochs": forwards_uncached_e,
        "max_abs_diff_cached_vs_uncached": _max_diff(work / "cached_e" / f"epoch_{E}.pth",
                                                     work / "uncached_e" / f"epoch_{E}.pth"),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }
    if args.torchrun:
        checkpoint = work / "cached_e" / f"epoch_{E}.pth"
        one = _torchrun_test(1, data, checkpoint, work / "test_1", design)
        two = _torchrun_test(2, data, checkpoint, work / "test_2", design)
        same = (work / "test_1" / "scores.csv").read_bytes() == (work / "test_2" / "scores.csv").read_bytes()
        result.update({"test_1_process_s": round(one, 2), "test_2_processes_s": round(two, 2),
                       "test_speedup_2_vs_1": round(one / two, 3), "test_scores_csv_identical": same})
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ViT-L/14@336px")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--n-images", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (released: 8)")
    parser.add_argument("--features-list", type=int, nargs="+", default=[24])
    parser.add_argument("--torchrun", action="store_true", help="also time test.py under torchrun, 2 ranks vs 1")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        result = run(args, Path(work))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
