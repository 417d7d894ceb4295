"""Benchmark: what each precision costs and gains, per runtime, on a stand-in that behaves like a trained model.

Builds the full CLIP ViT-L/14@336px with the NON-chaotic random weights
(:func:`pipeline.random_weights.stable_state_dict`: a 1e-3 input perturbation moves its outputs by
~1e-3, measured here and reported as ``sensitivity``; the default random weights move them by
~100 % and would make every precision difference meaningless) and random prompts, 518 px,
features_list 24, DPAM 20, sigma 4. It exports the inference module once to ONNX (fp32) and
once quantised (``export.py``'s ``quantize_int8``), and scores a small synthetic labelled set
(VisA layout, one class, normal and defective images with exact masks) through the one engine
(:func:`pipeline.engine.score_batches`) in every precision this CPU offers:

* ``torch`` fp32 (the reference) and bf16 (CPU autocast, where the CPU has bfloat16 instructions);
* ONNX Runtime fp32 and int8 (the quantised export);
* OpenVINO fp32, bf16 / fp16 (inference precision hint, where ``OPTIMIZATION_CAPABILITIES`` lists
  them) and int8 (the quantised export).

For each: latency per image (median over the set, batch 1, after one untimed warm-up image
whose time is reported as ``first_call_s``), the speed-up over torch fp32 of the same run, the
largest and mean score and map differences from torch fp32, and image AUROC, pixel AUROC and
AUPRO (cflow) on the set with their change from torch fp32. Beside them, ``kernels``: the
fp32 and bf16 rates of the forward's matmul shapes and of its fused attention kernel, which
explain the torch bf16 gain (``--kernels_only`` measures just these, in seconds). Random
weights detect nothing, so the metrics themselves are near chance; their *change* shows how
far a precision moves a ranking. The set is small (timing several seconds per image): read the metric changes as an
order of magnitude, and verify on your own data with ``tools/check_precision.py``.

Prints progress on stderr and ONE JSON line on stdout.

Usage::

    python benchmarks/bench_precision.py                      # ViT-L/14@336 at 518 px, 6 images (~10 min, 2 cores)
    python benchmarks/bench_precision.py --quick              # tiny backbone at 56 px: seconds (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

import torch  # noqa: E402

from AnomalyCLIP_lib.constants import DPAM_LAYER  # noqa: E402
from AnomalyCLIP_lib.errors import AnomalyCLIPError  # noqa: E402
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig  # noqa: E402
from AnomalyCLIP_lib.model import build_model  # noqa: E402
from AnomalyCLIP_lib.precision import check_cpu_bf16  # noqa: E402
from AnomalyCLIP_lib.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from pipeline.config import LoaderSpec  # noqa: E402
from pipeline.engine import Batch, ExportedScorer, Scorer, TorchScorer, dataset_batches, score_batches  # noqa: E402
from pipeline.random_weights import PRESETS, input_sensitivity, random_state_dict, stable_state_dict  # noqa: E402

import metrics  # noqa: E402

CLASS_NAME = "blobs"


# --- the model, the exports and the data ---------------------------------------------------------


def build_module(args: argparse.Namespace) -> AnomalyCLIPInference:
    """The inference module on the stable stand-in and seeded random prompts (fp32)."""
    from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

    model = build_model(stable_state_dict(args.seed, **PRESETS[args.preset]))
    torch.manual_seed(args.seed)
    learner = AnomalyCLIP_PromptLearner(model, design_details(12, 9, 4))
    config = ScoringConfig(image_size=args.image_size, features_list=(24,), dpam_layer=DPAM_LAYER, sigma=4.0)
    return AnomalyCLIPInference.from_model(model, learner, config).eval()


def chaotic_sensitivity(args: argparse.Namespace) -> dict[str, float]:
    """The default random weights' sensitivity at the same size (for the comparison)."""
    visual = build_model(random_state_dict(args.seed, **PRESETS[args.preset])).visual.eval()
    return input_sensitivity(visual, args.image_size)


def write_exports(module: AnomalyCLIPInference, folder: Path) -> dict[str, Any]:
    """``folder/fp32`` (ONNX) and ``folder/int8`` (quantised), each with a manifest the runtime reads."""
    from deploy.export import QUANTIZE_METHOD, quantize_int8, write_graph
    from deploy.manifest import HASHES_FIELD, files_sha256

    info: dict[str, Any] = {}
    manifest = {"manifest_version": 1, "image_size": module.config.image_size, "graph": "anomalyclip.onnx",
                "preprocessing": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
                "scoring": module.config.to_dict()}
    for name in ("fp32", "int8"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_graph(module.export_copy(), folder / "fp32", "onnx")
    info["onnx_export_s"] = round(time.perf_counter() - started, 1)
    (folder / "fp32" / "anomalyclip.json").write_text(json.dumps(
        {**manifest, HASHES_FIELD: files_sha256(folder / "fp32", ["anomalyclip.onnx"])}))
    started = time.perf_counter()
    quantize_int8(folder / "fp32" / "anomalyclip.onnx", folder / "int8" / "anomalyclip.onnx")
    info["int8_quantize_s"] = round(time.perf_counter() - started, 1)
    quantised = {**manifest, "quantization": {"precision": "int8", "method": QUANTIZE_METHOD},
                 HASHES_FIELD: files_sha256(folder / "int8", ["anomalyclip.onnx"])}
    (folder / "int8" / "anomalyclip.json").write_text(json.dumps(quantised))
    return info


def labelled_set(args: argparse.Namespace, folder: Path):
    """The synthetic set's batches (batch 1, preprocessed once, with masks) and its labels."""
    from dataset import AnomalyDataset
    from pipeline.synthetic import make_visa_like

    make_visa_like(folder / "data", class_names=(CLASS_NAME,), n_train=1, n_test_good=args.normal,
                   n_test_defect=args.anomalous, image_size=(args.data_size, args.data_size), seed=args.seed)
    dataset = AnomalyDataset(str(folder / "data"), image_size=args.image_size, split="test")
    indices = range(len(dataset))
    batches = list(dataset_batches(dataset, indices, LoaderSpec(batch_size=1, num_workers=0), torch.device("cpu"),
                                   progress=False))
    labels = np.array([int(dataset.items[index]["anomaly"]) for index in indices])
    return batches, labels


# --- why torch bf16 gains what it gains ---------------------------------------------------------------


def kernel_rates(args: argparse.Namespace, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of the forward's two big kernels in fp32 and bf16 at this token count (median of ``repeats``).

    ``matmul``: one block's four linear shapes (qkv, out, fc, proj) as ``torch.mm``; ``attention``:
    ``scaled_dot_product_attention`` over all heads. bf16 tensors are made bf16 up front (no casts timed).
    """
    config = PRESETS[args.preset]
    tokens = 1 + (args.image_size // config["vision_patch_size"]) ** 2
    width, heads = config["vision_width"], config["vision_width"] // 64
    generator = torch.Generator().manual_seed(0)
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    rates: dict[str, float] = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        operands = [(torch.randn(tokens, k, generator=generator).to(dtype),
                     torch.randn(k, n, generator=generator).to(dtype)) for k, n in shapes]
        query = torch.randn(1, heads, tokens, 64, generator=generator).to(dtype)
        kernels = {"matmul": (lambda ops=operands: [torch.mm(a, b) for a, b in ops],
                              sum(2 * tokens * k * n for k, n in shapes)),
                   "attention": (lambda q=query: torch.nn.functional.scaled_dot_product_attention(q, q, q),
                                 4 * heads * tokens * tokens * 64)}
        for name, (kernel, flops) in kernels.items():
            kernel()  # warm-up: oneDNN builds its kernels for a shape on first use
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                kernel()
                times.append(time.perf_counter() - started)
            rates[f"{name}_{dtype_name}_gflop_s"] = round(flops / statistics.median(times) / 1e9, 1)
    return rates


# --- the runs -------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """The (runtime, precision) pairs this machine offers, torch fp32 first (the reference)."""
    from deploy.runtime import openvino_capabilities

    runs = [{"name": "torch fp32", "runtime": "torch", "precision": "fp32"}]
    try:
        check_cpu_bf16()
        runs.append({"name": "torch bf16", "runtime": "torch", "precision": "bf16"})
    except AnomalyCLIPError as error:
        print(f"torch bf16 skipped: {error}", file=sys.stderr)
    runs += [{"name": "onnxruntime fp32", "runtime": "onnxruntime", "precision": "fp32", "model": "fp32"},
             {"name": "onnxruntime int8", "runtime": "onnxruntime", "precision": "int8", "model": "int8"},
             {"name": "openvino fp32", "runtime": "openvino", "precision": "fp32", "model": "fp32"}]
    offered = openvino_capabilities()
    runs += [{"name": f"openvino {precision}", "runtime": "openvino", "precision": precision, "model": "fp32"}
             for precision, capability in (("bf16", "BF16"), ("fp16", "FP16")) if capability in offered]
    runs.append({"name": "openvino int8", "runtime": "openvino", "precision": "int8", "model": "int8"})
    wanted = set(args.only or [])
    return [{**run, "model": str(folder / run["model"]) if "model" in run else None} for run in runs
            if not wanted or run["name"] in wanted]


def open_scorer(run: dict[str, Any], module: AnomalyCLIPInference, threads: int) -> Scorer:
    if run["runtime"] == "torch":
        config = ScoringConfig.from_dict({**module.config.to_dict(), "precision": run["precision"]})
        return TorchScorer(AnomalyCLIPInference(module.visual, module.text_features, config), torch.device("cpu"))
    return ExportedScorer.load(run["model"], run["runtime"], threads, run["precision"])


def timed_scores(scorer: Scorer, batches: list[Batch]) -> tuple[float, list[float], np.ndarray, np.ndarray]:
    """One untimed warm-up image (its time returned), then every image timed: scores and maps in set order."""
    started = time.perf_counter()
    next(score_batches(scorer, batches[:1]))
    first = time.perf_counter() - started
    times, scores, maps = [], [], []
    started = time.perf_counter()
    for scored in score_batches(scorer, batches):
        times.append(time.perf_counter() - started)
        scores += [image.score for image in scored]
        maps += [image.anomaly_map for image in scored]
        started = time.perf_counter()
    return first, times, np.asarray(scores, dtype=np.float32), np.stack(maps).astype(np.float32)


def set_metrics(labels: np.ndarray, masks: np.ndarray, scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    return {"image_auroc": float(metrics.image_auroc(labels, scores)),
            "pixel_auroc": float(metrics.pixel_auroc(masks, maps)),
            "aupro": float(metrics.pixel_aupro(masks, maps))}


def _g(value: float) -> float:
    return float(f"{value:.3g}")


def run_one(run: dict[str, Any], module: AnomalyCLIPInference, batches: list[Batch], threads: int) -> dict[str, Any]:
    print(f"{run['name']}:", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        scorer = open_scorer(run, module, threads)
    except AnomalyCLIPError as error:
        return {"error": str(error)}
    load_s = time.perf_counter() - started
    first, times, scores, maps = timed_scores(scorer, batches)
    del scorer
    gc.collect()
    print(f"  {statistics.median(times):.3f} s per image (first call {first:.3f} s)", file=sys.stderr, flush=True)
    return {"latency_s": round(statistics.median(times), 4), "times_s": [round(t, 3) for t in times],
            "first_call_s": round(first, 3), "load_s": round(load_s, 2), "scores": scores, "maps": maps}


def compare(found: dict[str, Any], reference: dict[str, Any], labels: np.ndarray, masks: np.ndarray) -> None:
    """Add the differences from the reference run and the set's metrics to ``found`` (arrays removed)."""
    scores, maps = found.pop("scores"), found.pop("maps")
    found.update(set_metrics(labels, masks, scores, maps))
    if reference is found:
        found["map_scale"] = _g(float(np.abs(maps).max()))
        found["score_range"] = [_g(float(scores.min())), _g(float(scores.max()))]  # what a score change is against
        return
    found["speedup"] = round(reference["latency_s"] / found["latency_s"], 2)
    found["max_score_diff"] = _g(float(np.abs(scores - reference["arrays"][0]).max()))
    map_diff = np.abs(maps - reference["arrays"][1])
    found["max_map_diff"] = _g(float(map_diff.max()))
    found["mean_map_diff"] = _g(float(map_diff.mean()))
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        found[f"delta_{name}"] = _g(found[name] - reference[name])


def benchmark(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from bench_inference import _cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    rates = kernel_rates(args)
    if args.kernels_only:
        return {"preset": args.preset, "image_size": args.image_size, "kernels": rates, "threads": threads,
                "cpu": _cpu_name(), "load_average": [round(value, 2) for value in os.getloadavg()]}
    module = build_module(args)
    print("sensitivity:", file=sys.stderr, flush=True)
    sensitivity = {name: _g(value) for name, value in input_sensitivity(module.visual, args.image_size).items()}
    chaotic = ({name: _g(value) for name, value in chaotic_sensitivity(args).items()} if args.compare_chaotic
               else None)
    batches, labels = labelled_set(args, folder)
    masks = np.concatenate([batch.masks for batch in batches])
    runs = configurations(args, folder)
    export_info = write_exports(module, folder) if any(run["model"] for run in runs) else {}
    results: dict[str, Any] = {}
    reference: dict[str, Any] | None = None
    for run in runs:
        found = run_one(run, module, batches, threads)
        results[run["name"]] = found
        if "error" in found:
            continue
        if reference is None:  # torch fp32: the first run
            reference = found
            reference["arrays"] = (found["scores"], found["maps"])
        compare(found, reference, labels, masks)
    if reference is not None:
        reference.pop("arrays", None)
    return {
        "preset": args.preset, "image_size": args.image_size, "batch": 1, "stand_in": "stable_state_dict",
        "sensitivity_1e-3": sensitivity, "sensitivity_1e-3_default_random_weights": chaotic,
        "n_images": len(labels), "n_anomalous": int(labels.sum()), "runs": results, "kernels": rates,
        "export": export_info,
        "threads": threads, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "note": "random weights: metrics near chance; their change and the differences show what rounding moves",
        "total_s": round(time.perf_counter() - started, 1),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny backbone at 56 px, 4 images: a smoke test")
    parser.add_argument("--preset", default=None, help="architecture (default ViT-L/14@336px; tiny with --quick)")
    parser.add_argument("--image_size", type=int, default=None, help="default 518 (56 with --quick)")
    parser.add_argument("--normal", type=int, default=None, help="normal images (default 3; 2 with --quick)")
    parser.add_argument("--anomalous", type=int, default=None, help="defective images (default 3; 2 with --quick)")
    parser.add_argument("--data_size", type=int, default=128, help="side of the synthetic images in pixels")
    parser.add_argument("--threads", type=int, default=None, help="threads of every runtime (default: torch's)")
    parser.add_argument("--only", nargs="+", default=None, help='runs to do by name, e.g. "torch fp32" '
                                                                '"openvino bf16" (torch fp32 first: the reference)')
    parser.add_argument("--compare_chaotic", action="store_true",
                        help="also measure the default random weights' sensitivity (builds a second model)")
    parser.add_argument("--kernels_only", action="store_true",
                        help="only the fp32/bf16 rates of the matmul and attention kernels (seconds)")
    parser.add_argument("--workdir", default=None, help="folder for the exports and data (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "ViT-L/14@336px")
    args.image_size = args.image_size or (56 if args.quick else 518)
    args.normal = args.normal or (2 if args.quick else 3)
    args.anomalous = args.anomalous or (2 if args.quick else 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as scratch:
        folder = Path(args.workdir) if args.workdir else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = benchmark(args, folder)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
