"""Benchmark: the torch path, ONNX Runtime and OpenVINO side by side on the same exported model.

Builds the full CLIP ViT-L/14@336px with seeded random weights (``bench_inference``'s
:func:`benchmark_state_dict`, at CLIP's activation scale) and random prompts, wraps them in
:class:`AnomalyCLIPInference` (518 px, features_list 24, DPAM 20, sigma 4), exports it with
``export.py``'s functions (ONNX, then OpenVINO IR from the ONNX) and times on the CPU, batch 1,
fp32, one random image:

* ``torch``: the inference module's forward (in this process);
* ``onnxruntime`` and ``openvino``: :class:`AnomalyCLIP_lib.runtime.ExportedModel`, each in its
  own worker process (so that its peak RSS is its own), the same input;
* variants where this CPU offers them: ONNX Runtime int8 (``quantize_dynamic``: int8 weights,
  dynamically quantised activations), OpenVINO with fp16-compressed weights, OpenVINO's f16 /
  bf16 inference precision when the CPU lists FP16 / BF16 among its capabilities, and OpenVINO
  on the int8 ONNX. Each gets its largest score and map difference from the torch fp32
  outputs. Random weights say nothing about the accuracy of int8 on the real model.

Every runtime: latency = median of ``--repeats`` timed runs after ``--warmup`` untimed ones;
GFLOP/s from the analytic FLOP count (``bench_inference.forward_flops``); peak RSS of the
inference (model resident; VmHWM after a reset once the model is loaded) and of the load.
Beside them, measured just before and just after each runtime's runs, the rate of a plain fp32
torch matmul of the ViT-L linear shapes (one block's qkv, out, fc and proj at the 518-px token
count): each runtime's ``fraction_of_matmul`` is its GFLOP/s over the mean of its two matmul
rates, i.e. what share of this CPU's matmul rate in those same minutes it reaches.

Prints progress on stderr and ONE JSON line on stdout; exits 1 when an fp32 runtime differs from
the torch path by more than 1e-4.

Usage::

    python benchmarks/bench_runtimes.py                      # ViT-L/14@336 at 518 px (~10 min on 2 cores)
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_runtimes.py
    python benchmarks/bench_runtimes.py --quick              # tiny backbone at 56 px: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

TOLERANCE = 1e-4
AVX2_PINS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")

from AnomalyCLIP_lib.constants import DPAM_LAYER  # noqa: E402
from deploy.runtime import openvino_core  # noqa: E402
from measure import reset_peak_rss, status_mb  # noqa: E402


# --- measurement helpers (torch-free: the workers use them) --------------------------------------


def timed_runs(forward: Callable[[], Any], warmup: int, repeats: int, label: str) -> tuple[list[float], Any]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones, and the first call's result."""
    first = None
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        result = forward()
        wall = time.perf_counter() - start
        first = result if first is None else first
        if index >= warmup:
            times.append(wall)
        print(f"  {label}: {wall:.3f} s{' (warm-up)' if index < warmup else ''}", file=sys.stderr, flush=True)
    return times, first


def summarise(times: list[float], flops: float, load_s: float, load_peak: float | None, peak: float | None) -> dict:
    latency = statistics.median(times)
    return {"latency_s": round(latency, 4), "times_s": [round(t, 3) for t in times],
            "gflop_s": round(flops / latency / 1e9, 1), "load_s": round(load_s, 2),
            "peak_rss_mb": None if peak is None else round(peak, 1),
            "load_peak_rss_mb": None if load_peak is None else round(load_peak, 1)}


# --- worker: one runtime in its own process -------------------------------------------------------


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Load an export with one runtime, time it on the saved input, save its outputs."""
    from deploy.runtime import ExportedModel

    images = np.load(spec["input"])
    started = time.perf_counter()
    model = ExportedModel(spec["model_dir"], spec["runtime"], threads=spec["threads"], graph=spec.get("graph"),
                          openvino_precision=spec.get("openvino_precision", "f32"))
    model.predict(images)  # first inference finishes lazy initialisation: part of the load
    load_s = time.perf_counter() - started
    load_peak = status_mb("VmHWM")
    reset_peak_rss()
    times, (scores, maps) = timed_runs(lambda: model.predict(images), spec["warmup"], spec["repeats"], spec["name"])
    np.savez(spec["output"], scores=scores, maps=maps)
    return summarise(times, spec["flops"], load_s, load_peak, status_mb("VmHWM"))


def spawn_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh interpreter; its JSON line, or ``{"error": ...}``."""
    print(f"{spec['name']}:", file=sys.stderr, flush=True)
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=False,
                               capture_output=True, text=True, cwd=REPO_ROOT)
    sys.stderr.write(completed.stderr)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit status {completed.returncode}")[:300]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the parent run -------------------------------------------------------------------------------


def matmul_gflop_s(config: dict[str, int], image_size: int, repeats: int = 3) -> float:
    """Rate of plain fp32 torch matmuls of one ViT block's linear shapes at this token count (median)."""
    import torch

    tokens = 1 + (image_size // config["vision_patch_size"]) ** 2
    width = config["vision_width"]
    generator = torch.Generator().manual_seed(0)
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    operands = [(torch.randn(tokens, k, generator=generator), torch.randn(k, n, generator=generator))
                for k, n in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    rounds = max(1, int(2e11 // flops)) if tokens > 500 else 50  # ~200 GFLOP per timing at full size

    def forward() -> None:
        for _ in range(rounds):
            for a, b in operands:
                torch.mm(a, b)

    forward()
    times, _ = timed_runs(forward, 0, repeats, "matmul")
    return flops * rounds / statistics.median(times) / 1e9


def build_module(args: argparse.Namespace, config: dict[str, int]):
    """The inference module on random ViT weights and random prompts."""
    import torch
    from bench_inference import benchmark_state_dict, release_free_memory

    from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
    from AnomalyCLIP_lib.model import build_model
    from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

    model = build_model(benchmark_state_dict(args.seed, config))
    torch.manual_seed(args.seed)
    learner = AnomalyCLIP_PromptLearner(model, design_details(12, 9, 4))
    scoring_config = ScoringConfig(image_size=args.image_size, features_list=tuple(args.features_list),
                                   dpam_layer=args.dpam_layer, sigma=4.0)
    module = AnomalyCLIPInference.from_model(model, learner, scoring_config)
    del model, learner
    release_free_memory()
    return module


def export_variants(module, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ONNX and OpenVINO exports plus the variants; returns the export timings and what failed."""
    from deploy import export
    from AnomalyCLIP_lib.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    info: dict[str, Any] = {}
    manifest = {"manifest_version": 1, "image_size": args.image_size, "graph": "anomalyclip.onnx",
                "preprocessing": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
                "scoring": module.config.to_dict()}
    started = time.perf_counter()
    export.write_graph(module.export_copy(), folder, "onnx")
    info["onnx_export_s"] = round(time.perf_counter() - started, 1)
    (folder / "anomalyclip.json").write_text(json.dumps(manifest))
    started = time.perf_counter()
    export.onnx_to_openvino(folder / "anomalyclip.onnx", folder / "anomalyclip.xml")
    info["openvino_convert_s"] = round(time.perf_counter() - started, 1)
    if args.no_variants:
        return info
    try:
        import openvino as ov

        ov.save_model(openvino_core().read_model(str(folder / "anomalyclip.xml")), str(folder / "fp16w.xml"),
                      compress_to_fp16=True)
    except Exception as exc:  # noqa: BLE001 - a variant that cannot be built is reported, not fatal
        info["openvino_fp16_weights_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        started = time.perf_counter()
        quantize_dynamic(str(folder / "anomalyclip.onnx"), str(folder / "int8.onnx"), weight_type=QuantType.QInt8)
        info["int8_quantize_s"] = round(time.perf_counter() - started, 1)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        info["int8_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return info


def openvino_capabilities() -> list[str]:
    try:

        return list(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 - no OpenVINO or no CPU plugin: no capabilities
        return []


def worker_specs(folder: Path, args: argparse.Namespace, flops: float, threads: int) -> list[dict[str, Any]]:
    """The runtimes and variants to time, in order."""
    base = {"model_dir": str(folder), "input": str(folder / "input.npy"), "threads": threads, "flops": flops,
            "warmup": args.warmup, "repeats": args.repeats}
    specs = [{"name": "onnxruntime", "runtime": "onnxruntime"},
             {"name": "openvino", "runtime": "openvino", "graph": str(folder / "anomalyclip.xml")}]
    if not args.no_variants:
        caps = openvino_capabilities()
        if (folder / "int8.onnx").is_file():
            specs += [{"name": "onnxruntime_int8", "runtime": "onnxruntime", "graph": str(folder / "int8.onnx")},
                      {"name": "openvino_on_int8_onnx", "runtime": "openvino", "graph": str(folder / "int8.onnx")}]
        if (folder / "fp16w.xml").is_file():
            specs.append({"name": "openvino_fp16_weights", "runtime": "openvino", "graph": str(folder / "fp16w.xml")})
        for precision, capability in (("f16", "FP16"), ("bf16", "BF16")):
            if capability in caps:
                specs.append({"name": f"openvino_{precision}", "runtime": "openvino", "openvino_precision": precision,
                              "graph": str(folder / "anomalyclip.xml")})
    return [{**base, **spec, "output": str(folder / f"out_{spec['name']}.npz")} for spec in specs]


def differences(output: Path, scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    found = np.load(output)
    return {"max_score_diff": float(f"{np.abs(found['scores'] - scores).max():.3g}"),
            "max_map_diff": float(f"{np.abs(found['maps'] - maps).max():.3g}")}


def _versions() -> dict[str, str]:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("onnx", "onnxruntime", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "absent"
    return versions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="architecture (default ViT-L/14@336px; tiny with --quick)")
    parser.add_argument("--image_size", "--image-size", type=int, default=None, help="default 518 (56 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny backbone at 56 px, one timed run: a smoke test")
    parser.add_argument("--features_list", type=int, nargs="+", default=[24])
    parser.add_argument("--dpam_layer", type=int, default=DPAM_LAYER)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per runtime (median; default 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: torch's)")
    parser.add_argument("--no_variants", action="store_true", help="skip int8 / fp16 variants")
    parser.add_argument("--workdir", default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "ViT-L/14@336px")
    args.image_size = args.image_size or (56 if args.quick else 518)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be positive, --warmup non-negative")
    return args


def benchmark(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The whole run; returns the JSON line's content."""
    import torch
    from bench_inference import PRESETS, _cpu_name, forward_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config = PRESETS[args.preset]
    flops = forward_flops(config, args.image_size, args.features_list, args.dpam_layer, original=False)
    started = time.perf_counter()
    matmul_before = matmul_gflop_s(config, args.image_size)

    load_started = time.perf_counter()
    module = build_module(args, config)
    load_s = time.perf_counter() - load_started
    load_peak = status_mb("VmHWM")
    images = np.random.default_rng(args.seed).standard_normal(
        (1, 3, args.image_size, args.image_size)).astype(np.float32)
    np.save(folder / "input.npy", images)
    tensor = torch.from_numpy(images)
    reset_peak_rss()
    print("torch:", file=sys.stderr, flush=True)

    def forward() -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores, maps = module(tensor)
        return scores.numpy(), maps.numpy()

    times, (scores, maps) = timed_runs(forward, args.warmup, args.repeats, "torch")
    rates = [matmul_before, matmul_gflop_s(config, args.image_size)]
    results: dict[str, Any] = {"torch": summarise(times, flops, load_s, load_peak, status_mb("VmHWM"))}
    results["torch"]["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    results["torch"]["matmul_gflop_s_around"] = [round(rate, 1) for rate in rates]
    export_info = export_variants(module, folder, args)
    module.visual = None  # frees the tower's 1.2 GB before the runtimes' processes start
    for spec in worker_specs(folder, args, flops, threads):
        before = matmul_gflop_s(config, args.image_size)
        found = spawn_worker(spec)
        after = matmul_gflop_s(config, args.image_size)
        rates += [before, after]
        found["matmul_gflop_s_around"] = [round(before, 1), round(after, 1)]
        if "error" not in found:
            found.update(differences(Path(spec["output"]), scores, maps))
        results[spec["name"]] = found
    matmul = statistics.mean(rates)

    for found in results.values():
        if "gflop_s" in found:  # against the matmul rate measured just before and after this runtime
            found["fraction_of_matmul"] = round(found["gflop_s"] / statistics.mean(found["matmul_gflop_s_around"]), 3)
    fp32 = [results[name] for name in ("onnxruntime", "openvino")]
    parity_ok = all("error" not in r and max(r["max_score_diff"], r["max_map_diff"]) <= TOLERANCE for r in fp32)
    return {
        "preset": args.preset, "image_size": args.image_size, "batch": 1, "precision": "fp32",
        "features_list": args.features_list, "dpam_layer": args.dpam_layer, "gflops_per_image": round(flops / 1e9, 2),
        "runtimes": results,
        "matmul_gflop_s": round(matmul, 1), "matmul_gflop_s_range": [round(min(rates), 1), round(max(rates), 1)],
        "parity_tolerance": TOLERANCE, "parity_ok": parity_ok, "export": export_info,
        "openvino_cpu_capabilities": openvino_capabilities(), "threads": threads, "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "pins": {name: os.environ[name] for name in AVX2_PINS if name in os.environ},
        "versions": _versions(), "repeats": args.repeats, "warmup": args.warmup,
        "note": "random weights: int8/fp16 differences say nothing about accuracy on the real model",
        "total_s": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_runtimes_") as scratch:
        folder = Path(args.workdir) if args.workdir else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = benchmark(args, folder)
    print(json.dumps(result))
    if not result["parity_ok"]:
        print(f"FAIL: an fp32 runtime differs from the torch path by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
