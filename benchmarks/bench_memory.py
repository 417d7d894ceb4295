"""Benchmark: what a few-shot memory costs, at the full ViT-L/14@336 width, for K = 1, 2, 4, 8, 16 references.

Builds ViT-L/14@336px with seeded random weights (``bench_inference.benchmark_state_dict``; speed
does not depend on the values) and random text features, wrapped in :class:`AnomalyCLIPInference`
(518 px, features_list 24, DPAM 20, sigma 4), and a memory at the default settings (layers
6 12 18 24, DPAM tokens, weight 0.5) from K random reference images. On the CPU, batch 1, fp32:

* ``encode_s_per_reference``: encoding one reference (median over the references encoded);
* per K: ``build_s`` = K x that + the memory's build (normalised banks and the leave-one-out
  scales, measured), ``memory_mb`` (the banks: K x 1369 patches x 768 x 4 layers x 4 bytes at
  518 px), ``latency_s`` (median of ``--repeats``), ``added`` (its latency over zero-shot's - 1),
  ``memory_part_s`` (the memory's own work per image, timed alone: nearest neighbours, upsampling and
  the second map's Gaussian filter; median of 5) and ``memory_part_share`` (that over zero-shot's
  latency: the added cost without the forward-to-forward noise of a busy machine), and ``peak_rss_mb``
  during its forwards;
* zero-shot's latency, measured interleaved with every K's (zero-shot, K=1, K=2, ... per round),
  so a change of the machine's load hits all alike.

Prints progress on stderr and ONE JSON line on stdout. The goal: K = 4 adds at most 10 % to a CPU
image's latency.

Usage::

    python benchmarks/bench_memory.py                  # ViT-L/14@336 at 518 px (~5 min on 2 quiet cores)
    python benchmarks/bench_memory.py --quick          # tiny backbone at 56 px: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig  # noqa: E402
from AnomalyCLIP_lib.memory import build_memory  # noqa: E402
from AnomalyCLIP_lib.memory_config import MemorySettings  # noqa: E402
from AnomalyCLIP_lib.model import build_model  # noqa: E402
from AnomalyCLIP_lib.scoring import gaussian_smooth_torch  # noqa: E402
from bench_inference import benchmark_state_dict  # noqa: E402
from measure import peak_rss_mb, reset_peak_rss  # noqa: E402
from pipeline.random_weights import TINY, VIT_L14_336  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny backbone at 56 px (smoke test)")
    parser.add_argument("--image_size", type=int, default=None, help="default 518 (56 with --quick)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TINY if args.quick else VIT_L14_336
    size = args.image_size or (56 if args.quick else 518)
    torch.manual_seed(0)
    model = build_model(benchmark_state_dict(0, config)).eval()
    width = model.visual.proj.shape[1]
    text = torch.nn.functional.normalize(torch.randn(1, 2, width), dim=-1)
    zero_shot = AnomalyCLIPInference(model.visual, text, ScoringConfig(image_size=size, features_list=(24,))).eval()
    settings = MemorySettings()
    shots = sorted(set(args.shots))
    references = torch.randn(max(shots), 3, size, size)
    image = torch.randn(1, 3, size, size)

    encode_times, tokens = [], []
    for index in range(max(shots)):
        start = time.perf_counter()
        tokens.append(zero_shot.reference_tokens(references[index:index + 1], settings))
        encode_times.append(time.perf_counter() - start)
        print(f"  reference {index + 1}: {encode_times[-1]:.2f} s", file=sys.stderr, flush=True)
    encode_s = statistics.median(encode_times)

    modules, per_k = {0: zero_shot}, {}
    for k in shots:
        per_layer = [torch.cat([one[layer] for one in tokens[:k]]) for layer in range(len(settings.layers))]
        start = time.perf_counter()
        memory = build_memory(per_layer, settings)
        build_only = time.perf_counter() - start
        modules[k] = zero_shot.with_memory(memory)
        per_k[k] = {"build_s": round(k * encode_s + build_only, 3), "memory_build_only_s": round(build_only, 3),
                    "memory_mb": round(sum(b.numel() * b.element_size() for b in memory.banks) / 2**20, 4)}
        print(f"K={k}: memory {per_k[k]['memory_mb']} MiB, built in {build_only:.2f} s", file=sys.stderr, flush=True)

    # The memory's own work per image (nearest neighbours, upsampling, the second map's filter), timed alone:
    # short and repeated, so a busy machine disturbs it less than the forward-to-forward difference.
    test_tokens = zero_shot.reference_tokens(image, settings)
    for k in shots:
        memory = modules[k].memory
        parts = [_seconds(lambda memory=memory: gaussian_smooth_torch(memory.distance_maps(test_tokens, size), 4.0))
                 for _ in range(5)]
        per_k[k]["memory_part_s"] = round(statistics.median(parts), 4)

    latencies: dict[int, list[float]] = {k: [] for k in modules}
    peaks: dict[int, float] = {}
    for round_number in range(args.repeats + 1):  # round 0 warms up
        for k, module in modules.items():
            reset_peak_rss()
            wall = _seconds(lambda module=module: module.predict(image))
            peaks[k] = max(peaks.get(k, 0.0), peak_rss_mb())
            if round_number:
                latencies[k].append(wall)
            print(f"  round {round_number} K={k}: {wall:.2f} s", file=sys.stderr, flush=True)
    zero_latency = statistics.median(latencies[0])
    for k in shots:
        latency = statistics.median(latencies[k])
        per_k[k].update(latency_s=round(latency, 3), added=round(latency / zero_latency - 1, 4),
                        memory_part_share=round(per_k[k]["memory_part_s"] / zero_latency, 4),
                        peak_rss_mb=round(peaks[k], 1))
    result = {"benchmark": "memory", "backbone": "tiny" if args.quick else "ViT-L/14@336px (random weights)",
              "image_size": size, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "settings": settings.to_dict(), "encode_s_per_reference": round(encode_s, 3),
              "zero_shot": {"latency_s": round(zero_latency, 3), "peak_rss_mb": round(peaks[0], 1)},
              "per_k": {str(k): values for k, values in per_k.items()}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
