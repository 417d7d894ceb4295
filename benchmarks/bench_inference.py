"""Benchmark: DPAM image-encoder inference (latency, throughput, GFLOP/s, memory) against the original.

Builds the full CLIP ViT-L/14@336px architecture with seeded random weights at CLIP's activation
scale (no download, see :func:`benchmark_state_dict`; the speed of a forward does not depend on
the weights' values), then times ``encode_image`` with DPAM (``dpam_layer`` 20) on random
518x518 images:

* batch 1 and batch 4 (per-image latency = median over ``--repeats`` timed runs after
  ``--warmup`` untimed ones), images/s, achieved GFLOP/s (FLOPs counted analytically for the
  forward that runs, see :func:`forward_flops`), peak RSS of the inference (model weights
  included, model construction excluded) or peak GPU memory;
* with fp32 (the default), :func:`original_structure_encode`: the released code's forward
  structure on the same weights and images, interleaved with ours at batch 1. Its outputs must
  equal ours to fp32 rounding (max |diff| <= 1e-5 x the output's max magnitude, or <= 1e-4);
  the script exits 1 otherwise. The speed-up is the ratio of the two medians.

Prints progress on stderr (each run's wall time, CPU user/sys time and page faults) and ONE JSON
line on stdout. ``other_load`` is the share of the machine's CPU time that other processes used
while the timed runs ran: timings with a noticeable value (say > 0.05) were disturbed, run again.
The original's latency also depends on how fast the OS hands it fresh pages for its 120 MB
attention matrices (hundreds of thousands of page faults per image, varying between runs).

Default run (CPU fp32, ViT-L/14@336, 518 px, features_list 24, warm-up 1 + 3 timed runs for
each of ours batch 1, original batch 1, ours batch 4): about 5 minutes on 2 cores.

Usage::

    python benchmarks/bench_inference.py                       # CPU fp32, with the original for comparison
    python benchmarks/bench_inference.py --device cuda --precision fp16    # or bf16; no comparison
    python benchmarks/bench_inference.py --preset tiny --image-size 56 --repeats 1   # seconds, smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from AnomalyCLIP_lib.constants import DPAM_LAYER  # noqa: E402
from AnomalyCLIP_lib.model import CLIP, build_model, normalize_layers  # noqa: E402
from AnomalyCLIP_lib.precision import PRECISIONS, autocast  # noqa: E402
from pipeline.random_weights import PRESETS, stable_state_dict  # noqa: E402
from measure import current_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402

REL_TOLERANCE = 1e-5  # of the output's max magnitude
ABS_TOLERANCE = 1e-4
TARGET_SPEEDUP = 2.0
TARGET_GFLOP_S = 100.0

Outputs = tuple[torch.Tensor, list[torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# The original code structure (reference for speed and outputs; not part of the library)
# ---------------------------------------------------------------------------------------------


def _released_plain_attention(block, x: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention(x, x, x, need_weights=False)`` of the released plain blocks, on LND input.

    The released model keeps ``nn.MultiheadAttention`` (sequence-first, so without the fused
    fast path) in the blocks before DPAM; this is the function that module calls.
    """
    attn = block.attn
    width = attn.in_proj_weight.shape[1]
    return F.multi_head_attention_forward(
        x, x, x, width, attn.heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False,
    )[0]


def _released_dpam_attention(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released DPAM ``Attention`` module: both paths with explicit attention matrices.

    ``x`` is LND; the released block transposes it to (B, N, C), runs ``qkv`` (the block's
    in_proj weights) and ``proj`` (its out_proj), and transposes the results back.
    Returns ``(a_v, a_ori)`` in LND: value-value attention and ordinary attention.
    """
    attn = block.attn
    x = x.transpose(0, 1)
    batch, tokens, width = x.shape
    heads = attn.heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (width // heads) ** -0.5
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, h, N, N) materialised
    k = v
    q = k
    attn_v = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, h, N, N) materialised
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(batch, tokens, width)
    x_v = (attn_v @ v).transpose(1, 2).reshape(batch, tokens, width)
    x_v = attn.out_proj(x_v)
    x_ori = attn.out_proj(x_ori)
    return x_v.transpose(0, 1), x_ori.transpose(0, 1)


def original_structure_encode(
    model: CLIP, images: torch.Tensor, features_list: Sequence[int], dpam_layer: int | None
) -> Outputs:
    """``encode_image`` as the released AnomalyCLIP code structures it, on ``model``'s weights.

    What the released forward does, step by step (upstream's April 2025 aliasing fix included):

    * stem as ours (conv1, class token, positions, ln_pre), then sequence-first (LND) layout;
    * blocks before DPAM: ``x + MHA(ln_1(x))``, ``x + mlp(ln_2(x))`` through
      ``nn.MultiheadAttention``'s packed-projection function;
    * the last ``dpam_layer - 1`` blocks: explicit ``softmax(q k^T * scale) @ v`` for BOTH paths
      (attention matrices materialised), both streams through EVERY DPAM layer and every token
      whatever ``features_list`` asks for (the last block's MLP and ordinary attention included),
      in-place residual adds on the streams, a copy of each collected output (the fix of the
      aliasing bug: the released code appended the tensor that later in-place adds overwrote);
    * ``ln_post`` + ``proj`` on the collected layers (the same ``features_list`` as ours, for a
      fair comparison), image embedding = class token of the original stream ``@ proj``.
    """
    visual = model.visual
    layers = normalize_layers(features_list, visual.num_layers)
    num_layers = visual.num_layers
    first_dpam = num_layers + 1 if dpam_layer is None else num_layers - dpam_layer + 2

    x = visual.conv1(images)
    grid = x.shape[-1]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([visual.class_embedding.to(x.dtype) + zeros, x], dim=1)
    # The released code resizes the table and writes it back into the parameter; same values.
    x = x + visual.positional_embedding_for(grid).to(x.dtype)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND

    x_ori = None
    out_tokens = []
    for idx, block in enumerate(visual.transformer.resblocks, start=1):
        if idx < first_dpam:
            x = x + _released_plain_attention(block, block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        elif x_ori is None:  # start of the dual path
            x_res, x_ori_res = _released_dpam_attention(block, block.ln_1(x))
            x_ori = x + x_ori_res
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
            x += x_res  # no MLP on the DPAM stream
        else:
            x_res, x_ori_res = _released_dpam_attention(block, block.ln_1(x_ori))
            x_ori += x_ori_res
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
            x += x_res
        if idx in layers:
            out_tokens.append(x.clone())
    if x_ori is None:
        x_ori = x
    patch_tokens = [visual.ln_post(tokens.permute(1, 0, 2)) @ visual.proj for tokens in out_tokens]
    return x_ori[0, :, :] @ visual.proj, patch_tokens


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------


def forward_flops(
    config: dict[str, int], image_size: int, features_list: Sequence[int], dpam_layer: int | None, original: bool
) -> float:
    """FLOPs of one image's ``encode_image`` forward (a multiply-add counts 2), counted analytically.

    Notation: d = vision width, e = embed dim, p = patch, g = image_size / p, N = 1 + g^2 tokens,
    n = number of query tokens whose output a block computes (N, or 1 for the class token only).
    Per block (summing over heads, d = heads x head_dim):

    * qkv projection, always on all N tokens: ``2 N d 3d = 6 N d^2`` (one, shared by both paths)
    * one attention path, n queries: ``QK^T 2 n N d`` + ``AV 2 n N d`` = ``4 n N d``
    * its out_proj: ``2 n d^2``
    * MLP on n tokens: ``2 n d 4d + 2 n 4d d = 16 n d^2``
    * plain block:  ``6Nd^2 + 4N^2 d + 2Nd^2 + 16Nd^2 = 24 N d^2 + 4 N^2 d``
    * DPAM block:   ``6Nd^2 + 2 (4N^2 d + 2Nd^2) + 16Nd^2 = 26 N d^2 + 8 N^2 d``
    * ours, last block when only the image embedding needs the original stream (n = 1 for it):
      ``6Nd^2 + (4Nd + 2d^2 + 16d^2) + (4N^2 d + 2Nd^2)`` for DPAM (DPAM path on all tokens),
      ``6Nd^2 + 4Nd + 18d^2`` for a plain block; and ours runs DPAM only up to the deepest
      requested layer (plain blocks after it), the original through every DPAM layer.

    Plus the stem ``2 g^2 (3 p^2) d``, ``ln_post + proj`` = ``2 N d e`` per returned layer and the
    image embedding ``2 d e``. Not counted: LayerNorm, softmax, QuickGELU, biases, residual adds
    (O(N d) each, under 1% together). Matmul FLOPs equal ``torch.utils.flop_counter``'s count
    of either forward (with the math SDPA backend, which it can see into). ViT-L/14 at 518 px
    (N = 1370, d = 1024), features_list [24], dpam_layer 20: original 1216.4 GFLOP, ours 1182.9.
    """
    d, e, p = config["vision_width"], config["embed_dim"], config["vision_patch_size"]
    num_layers = config["vision_layers"]
    g = image_size // p
    n_tokens = 1 + g * g
    layers = normalize_layers(features_list, num_layers)
    first_dpam = num_layers + 1 if dpam_layer is None else num_layers - dpam_layer + 2
    last_dpam = num_layers if original else layers[-1]

    def path(n_query: int) -> float:  # attention and out_proj of one path
        return 4 * n_query * n_tokens * d + 2 * n_query * d * d

    flops = 2 * g * g * 3 * p * p * d
    for number in range(1, num_layers + 1):
        dpam_here = first_dpam <= number <= last_dpam
        needs_full = original or number < num_layers or (number in layers and not dpam_here)
        n_query = n_tokens if needs_full else 1
        flops += 6 * n_tokens * d * d + path(n_query) + 16 * n_query * d * d
        if dpam_here:
            flops += path(n_tokens)
    return flops + len(layers) * 2 * n_tokens * d * e + 2 * d * e


def benchmark_state_dict(seed: int, config: dict[str, int]) -> dict[str, torch.Tensor]:
    """Random weights of ``config`` at CLIP's activation scale, whatever the width.

    ``random_state_dict`` draws block matrices with fixed standard deviations chosen for the
    tiny model (width 128). At width 1024 they make q, k, v about 3x larger than in CLIP, so
    the attention logits ~10x: softmaxes saturate and 24 layers amplify fp32 rounding until
    two correct implementations differ by ~3e-4 relative (the explicit-arithmetic mode still
    matches the original bit for bit). :func:`pipeline.random_weights.stable_state_dict` scales
    the vision blocks' matrices by ``sqrt(128 / width)``, giving every unit the tiny model's
    scale, where implementations agree to ~1e-6. Speed does not depend on the scale.
    """
    return stable_state_dict(seed, **config)


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat; (0, 0) where unavailable."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def release_free_memory() -> None:
    """Hand memory that the allocator keeps after frees back to the OS (glibc ``malloc_trim``; else nothing).

    Building the model from a state dict leaves the state dict's freed pages in glibc's heap
    (~1.5 GB for ViT-L/14 in fp32), which would otherwise count in every later RSS reading.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class Timer:
    """Times calls of a forward; keeps wall times and what other processes used meanwhile."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, list[float]] = {}
        self._others_busy = 0
        self._total = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, name: str, forward: Callable[[], Outputs], timed: bool) -> Outputs:
        self._sync()
        busy0, total0 = _cpu_jiffies()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result = forward()
        self._sync()
        wall = time.perf_counter() - start
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        busy1, total1 = _cpu_jiffies()
        user, system = usage1.ru_utime - usage0.ru_utime, usage1.ru_stime - usage0.ru_stime
        cpu = user + system
        if timed:
            self.times.setdefault(name, []).append(wall)
            ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            self._others_busy += max(0.0, (busy1 - busy0) - cpu * ticks)
            self._total += total1 - total0
        print(f"  {name}: {wall:.3f} s{'' if timed else ' (warm-up)'}  [cpu user {user:.1f} s, sys {system:.2f} s, "
              f"{usage1.ru_minflt - usage0.ru_minflt} minor faults]", file=sys.stderr, flush=True)
        return result

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def other_load(self) -> float | None:
        return round(self._others_busy / self._total, 3) if self._total else None


def max_diff(ours: Outputs, reference: Outputs) -> tuple[float, float]:
    """(max |diff|, max |reference|) over the image embedding and every patch-token tensor."""
    pairs = [(ours[0], reference[0]), *zip(ours[1], reference[1], strict=True)]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    magnitude = max(b.float().abs().max().item() for _, b in pairs)
    return diff, magnitude


def speed_results(timer: Timer, batch_sizes: Sequence[int], flops: float) -> dict[str, object]:
    """Per-image latency, images/s and GFLOP/s of ours for each batch size."""
    result: dict[str, object] = {}
    for batch in batch_sizes:
        per_image = timer.median(f"ours_b{batch}") / batch
        key = "latency_s_batch1" if batch == 1 else f"latency_s_batch{batch}_per_image"
        result[key] = round(per_image, 4)
        result[f"images_per_s_batch{batch}"] = round(1 / per_image, 4)
        result[f"gflop_s_batch{batch}"] = round(flops / per_image / 1e9, 1)
    per_image = {batch: timer.median(f"ours_b{batch}") / batch for batch in batch_sizes}
    result["images_per_s"] = round(1 / min(per_image.values()), 4)
    result["gflops_per_image"] = round(flops / 1e9, 2)
    result["gflop_s"] = round(flops / per_image[batch_sizes[0]] / 1e9, 1)
    return result


def comparison_results(timer: Timer, first_outputs: dict[int, Outputs], flops_original: float) -> dict[str, object]:
    """The original structure's latency and GFLOP/s, the speed-up, and the output differences."""
    original_latency = timer.median("original_b1")
    diff, magnitude = max_diff(first_outputs[1], first_outputs[0])
    return {
        "original_latency_s_batch1": round(original_latency, 4),
        "original_gflops_per_image": round(flops_original / 1e9, 2),
        "original_gflop_s": round(flops_original / original_latency / 1e9, 1),
        "speedup": round(original_latency / timer.median("ours_b1"), 3),
        "max_abs_diff": float(f"{diff:.3g}"),
        "max_rel_diff": float(f"{diff / magnitude:.3g}") if magnitude else None,
        "parity_ok": diff <= max(REL_TOLERANCE * magnitude, ABS_TOLERANCE),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ViT-L/14@336px", help="architecture")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--features-list", type=int, nargs="+", default=[24])
    parser.add_argument("--dpam-layer", type=int, default=DPAM_LAYER)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="ours; the original runs batch 1")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16/bf16: CUDA autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--no-compare-original", action="store_true",
                        help="skip the original code structure (it runs only with fp32 anyway)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error("--repeats and --batch-sizes must be positive, --warmup non-negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = PRESETS[args.preset]
    compare = not args.no_compare_original and args.precision == "fp32"

    started = time.perf_counter()
    state = benchmark_state_dict(args.seed, config)
    model = build_model(state).to(device)
    del state
    gc.collect()
    release_free_memory()
    load_s = time.perf_counter() - started
    load_peak = peak_rss_mb()
    rss_after_load = current_rss_mb()
    print(f"built {args.preset} with random weights in {load_s:.1f} s (peak RSS {load_peak:.0f} MiB)",
          file=sys.stderr, flush=True)
    rss_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    generator = torch.Generator().manual_seed(args.seed)
    max_batch = max(args.batch_sizes)
    images = torch.randn(max_batch, 3, args.image_size, args.image_size, generator=generator).to(device)
    features, dpam = args.features_list, args.dpam_layer

    def ours(batch: int) -> Callable[[], Outputs]:
        def forward() -> Outputs:
            with torch.inference_mode(), autocast(device, args.precision):
                return model.encode_image(images[:batch], features, dpam)
        return forward

    def original() -> Outputs:
        with torch.inference_mode():
            return original_structure_encode(model, images[:1], features, dpam)

    timer = Timer(device)
    first_outputs: dict[int, Outputs] = {}
    # Batch 1, interleaved with the original so that both see the same machine state.
    batches = sorted(set(args.batch_sizes) | ({1} if compare else set()))
    for batch in batches:
        runs = [("ours", ours(batch))] + ([("original", original)] if compare and batch == 1 else [])
        print(f"batch {batch}:", file=sys.stderr, flush=True)
        for timed in [False] * args.warmup + [True] * args.repeats:
            for name, forward in runs:
                outputs = timer.run(f"{name}_b{batch}", forward, timed)
                first_outputs.setdefault(batch if name == "ours" else 0, outputs)  # key 0: the original

    result = speed_results(timer, args.batch_sizes, forward_flops(config, args.image_size, features, dpam, False))
    if compare:
        result.update(comparison_results(timer, first_outputs,
                                         forward_flops(config, args.image_size, features, dpam, True)))
    if max_batch > 1 and 1 in first_outputs:
        batched = first_outputs[max_batch]
        diff = max_diff((batched[0][:1], [tokens[:1] for tokens in batched[1]]), first_outputs[1])[0]
        result["batch_vs_single_max_abs_diff"] = float(f"{diff:.3g}")
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    result.update({
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_covers": "inference" if rss_reset else "process (model construction included)",
        "load_peak_rss_mb": round(load_peak, 1),
        "rss_after_load_mb": None if rss_after_load is None else round(rss_after_load, 1),
        "other_load": timer.other_load(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "precision": args.precision,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "preset": args.preset,
        "image_size": args.image_size,
        "features_list": sorted(set(features)),
        "dpam_layer": dpam,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "total_s": round(time.perf_counter() - started, 1),
    })
    if args.preset == "ViT-L/14@336px" and device.type == "cpu" and args.precision == "fp32":
        result["targets_met"] = {
            "gflop_s_ge_100": result["gflop_s"] >= TARGET_GFLOP_S,
            **({"speedup_ge_2": result["speedup"] >= TARGET_SPEEDUP} if compare else {}),
        }
    print(json.dumps(result))
    if compare and not result["parity_ok"]:
        print(f"FAIL: outputs differ from the original structure by {result['max_abs_diff']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
