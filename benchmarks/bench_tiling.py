"""Tiled scoring (``--tile_size``): what it finds on small defects, and what it costs per megapixel.

Two parts, each printing one JSON line (and a table on stderr):

``--part gain``: the synthetic high-resolution set (:func:`pipeline.synthetic.make_highres_like`:
2048 x 2048 images, defects 10-30 pixels across, exact masks) scored with the tiny *random*
backbone, whole (one view resized to ``--image-size``) against tiled (``--tile-size``), zero-shot
and with a few-shot memory of the class's ``train/good`` references. Per mode: pixel AUROC and
AUPRO (cflow) on a ``--metrics-resolution`` grid (maps resized bilinearly, masks as test.py's
mask transform), and the fraction of defects found at the threshold: the pixel threshold is
``normal_fpr`` at ``--target-fpr`` over the good test images' native-size maps, and a defect
(one per image) counts as found when any of its pixels reaches it at native resolution.

``--part cost``: one image of 2048 x 2048 and one of 4096 x 4096 through the engine on the CPU
with the full ViT-L/14@336 architecture (random weights), whole against tiled, each in its own
process: wall time, forwards (views), seconds and peak RSS per megapixel.

Examples::

    python benchmarks/bench_tiling.py --part gain
    python benchmarks/bench_tiling.py --part cost --threads 2
    python benchmarks/bench_tiling.py --part gain --quick      # small and fast (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# As the entry scripts do: OpenMP threads that spin on a busy CPU collapse (see bench_busy_cpu.py); read when torch
# loads, and inherited by the cost part's worker processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _random_checkpoint(model, path: Path, seed: int = 0) -> Path:
    """Seeded random prompts for ``model`` as a prompt checkpoint (the original's format)."""
    import torch

    from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

    torch.manual_seed(seed)
    learner = AnomalyCLIP_PromptLearner(model, design_details(n_ctx=12, depth=9, t_n_ctx=4))
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
    torch.save({"prompt_learner": learner.state_dict()}, path)
    return path


def _tiny_files(folder: Path) -> tuple[Path, Path]:
    """The tiny random CLIP (``pipeline.random_weights``) and random prompts, saved in ``folder``."""
    import torch

    from AnomalyCLIP_lib.model import build_model
    from pipeline.random_weights import random_state_dict

    state = random_state_dict(0)
    backbone = folder / "tiny_clip.pt"
    torch.save(state, backbone)
    return backbone, _random_checkpoint(build_model(state), folder / "prompts.pth")


# --- gain ----------------------------------------------------------------------------------------


def _scorer(backbone: Path, checkpoint: Path, image_size: int, references, spec, batch_size: int):
    """The torch scorer of the tiny model, with a memory of ``references`` (built with tiling ``spec``) if given."""
    import torch

    from AnomalyCLIP_lib.memory_config import MemorySettings
    from pipeline import tiling
    from pipeline.config import ModelSpec, ScoringSpec
    from pipeline.engine import TorchScorer
    from pipeline.loading import open_scorer

    model = ModelSpec(backbone=str(backbone), image_size=image_size, features_list=(6, 12, 18, 24), device="cpu")
    scorer = open_scorer(model, ScoringSpec(checkpoint_path=str(checkpoint)), torch.device("cpu"))
    if references is None:
        return scorer
    memory = tiling.class_memory(scorer.inference, references, MemorySettings(), batch_size,
                                 {"class_name": "fabric", "image_size": image_size}, spec, progress=False)
    return TorchScorer(scorer.inference.with_memory(memory), scorer.device)


def _native_maps(scorer, files: Sequence[Path], spec, batch_size: int) -> list[tuple[float, np.ndarray]]:
    """Score and native-size map of every file through the engine (whole maps resized as the masks are made)."""
    from pipeline import tiling

    results = []
    for scored in tiling.scored_files(scorer, files, batch_size, spec, progress=False):
        for one in scored:
            results.append((one.score, tiling.resize_map(one.anomaly_map, one.size)))
    return results


def _mode_metrics(results, masks_native, labels, grid: int, target_fpr: float) -> dict[str, float]:
    import metrics
    from PIL import Image

    from pipeline.thresholds import NormalTail

    maps = np.stack([np.asarray(Image.fromarray(m).resize((grid, grid), Image.BILINEAR), np.float32)
                     for _, m in results])
    masks = np.stack([(np.asarray(Image.fromarray(m * 255).resize((grid, grid), Image.BILINEAR), np.float32) / 255
                       > 0.5).astype(np.uint8) for m in masks_native])
    normal = [m for (_, m), label in zip(results, labels) if label == 0]
    tail = NormalTail(sum(m.size for m in normal), target_fpr)
    for anomaly_map in normal:
        tail.update(anomaly_map)
    threshold = tail.threshold()
    found = [bool(np.any(anomaly_map[mask > 0] >= threshold))
             for (_, anomaly_map), mask, label in zip(results, masks_native, labels) if label == 1]
    scores = np.array([score for score, _ in results], np.float32)
    return {"pixel_auroc": metrics.pixel_auroc(masks, maps), "pixel_aupro": metrics.pixel_aupro(masks, maps),
            "image_auroc": metrics.image_auroc(np.asarray(labels), scores),
            "defects_found": float(np.mean(found)), "pixel_threshold": threshold}


def gain(args: argparse.Namespace, folder: Path) -> dict[str, object]:
    import torch
    from PIL import Image

    from pipeline.config import TilingSpec
    from pipeline.memory import Reference
    from pipeline.synthetic import make_highres_like

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = folder / "highres"
    make_highres_like(root, n_train=args.k_shot, n_test_good=args.n_good, n_test_defect=args.n_defect,
                      image_size=(args.size, args.size), seed=args.seed)
    meta = json.loads((root / "meta.json").read_text())
    items = meta["test"]["fabric"]
    files = [root / item["img_path"] for item in items]
    labels = [int(item["anomaly"]) for item in items]
    masks = [np.asarray(Image.open(root / item["mask_path"])) > 0 if item["anomaly"]
             else np.zeros((args.size, args.size), bool) for item in items]
    references = [Reference(str(root / item["img_path"]), item["img_path"], "") for item in meta["train"]["fabric"]]
    backbone, checkpoint = _tiny_files(folder)
    generated = time.perf_counter() - started
    modes = {}
    for name, tile_size, refs in (("whole", None, None), ("tiled", args.tile_size, None),
                                  ("whole + references", None, references),
                                  ("tiled + references", args.tile_size, references)):
        spec = TilingSpec(tile_size=tile_size)
        begun = time.perf_counter()
        scorer = _scorer(backbone, checkpoint, args.image_size, refs, spec, args.batch_size)
        results = _native_maps(scorer, files, spec, args.batch_size)
        modes[name] = {**_mode_metrics(results, [m.astype(np.uint8) for m in masks], labels,
                                       args.metrics_resolution, args.target_fpr),
                       "seconds": round(time.perf_counter() - begun, 2)}
        print(f"{name:>20}: " + ", ".join(f"{k} {v:.4f}" for k, v in modes[name].items()), file=sys.stderr)
    return {"part": "gain", "size": args.size, "image_size": args.image_size, "tile_size": args.tile_size,
            "tile_overlap": 0.25, "metrics_resolution": args.metrics_resolution, "target_fpr": args.target_fpr,
            "n_good": args.n_good, "n_defect": args.n_defect, "k_shot": args.k_shot, "threads": args.threads,
            "generate_s": round(generated, 2), "backbone": "tiny random (pipeline.random_weights)", "modes": modes}


# --- cost ----------------------------------------------------------------------------------------


def _cost_worker(spec: dict) -> dict[str, object]:
    """One configuration in this process: build the ViT-L/14@336 module, score one image, report time and peak RSS."""
    import torch
    from PIL import Image

    from bench_inference import benchmark_state_dict, release_free_memory
    from measure import current_rss_mb, peak_rss_mb, reset_peak_rss
    from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
    from AnomalyCLIP_lib.model import build_model
    from pipeline import tiling
    from pipeline.config import TilingSpec
    from pipeline.engine import TorchScorer
    from pipeline.random_weights import PRESETS
    from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

    torch.set_num_threads(spec["threads"])
    model = build_model(benchmark_state_dict(0, PRESETS[spec["preset"]]))
    torch.manual_seed(0)
    learner = AnomalyCLIP_PromptLearner(model, design_details(12, 9, 4))
    module = AnomalyCLIPInference.from_model(model, learner, ScoringConfig(image_size=spec["image_size"]))
    del model, learner
    release_free_memory()
    scorer = TorchScorer(module, torch.device("cpu"))
    image_path = Path(spec["folder"]) / f"image_{spec['side']}.png"
    if not image_path.exists():
        rng = np.random.default_rng(0)
        small = rng.integers(60, 200, (spec["side"] // 16, spec["side"] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((spec["side"],) * 2, Image.BICUBIC).save(image_path)
    tiling_spec = TilingSpec(tile_size=spec["tile_size"])
    baseline = current_rss_mb() or 0.0  # the model loaded, before the image
    reset_peak_rss()
    begun = time.perf_counter()
    results = [one for scored in tiling.scored_files(scorer, [image_path], spec["batch_size"], tiling_spec,
                                                     progress=False) for one in scored]
    seconds = time.perf_counter() - begun
    grid = tiling.tile_grid((spec["side"], spec["side"]), tiling_spec)
    megapixels = spec["side"] ** 2 / 1e6
    peak = peak_rss_mb()
    return {"side": spec["side"], "mode": "tiled" if spec["tile_size"] else "whole", "tile_size": spec["tile_size"],
            "forwards": 1 + (grid.count if grid else 0), "seconds": round(seconds, 2),
            "seconds_per_megapixel": round(seconds / megapixels, 2), "peak_rss_mb": round(peak, 1),
            "rss_before_mb": round(baseline, 1), "added_peak_mb": round(peak - baseline, 1),
            "added_peak_mb_per_megapixel": round((peak - baseline) / megapixels, 1),
            "map_shape": list(results[0].anomaly_map.shape)}


def cost(args: argparse.Namespace, folder: Path) -> dict[str, object]:
    rows = []
    for side in args.sides:
        for tile_size in (None, args.tile_size):
            spec = {"preset": args.preset, "image_size": args.image_size, "side": side, "tile_size": tile_size,
                    "batch_size": args.batch_size, "threads": args.threads, "folder": str(folder)}
            completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                       text=True, check=False)
            if completed.returncode != 0:
                raise SystemExit(completed.stderr[-3000:])
            rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return {"part": "cost", "preset": args.preset, "image_size": args.image_size, "tile_size": args.tile_size,
            "tile_overlap": 0.25, "batch_size": args.batch_size, "threads": args.threads, "rows": rows}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("gain", "cost"), default="gain")
    parser.add_argument("--quick", action="store_true", help="small sizes (the smoke test)")
    parser.add_argument("--size", type=int, default=2048, help="gain: side of the synthetic images")
    parser.add_argument("--image-size", type=int, default=None, help="model input (gain: 224; cost: 518)")
    parser.add_argument("--tile-size", type=int, default=None, help="tile side (gain: 256; cost: 512)")
    parser.add_argument("--metrics-resolution", type=int, default=1024, help="gain: grid of pixel AUROC/AUPRO")
    parser.add_argument("--target-fpr", type=float, default=0.01, help="gain: normal_fpr of the pixel threshold")
    parser.add_argument("--n-good", type=int, default=4)
    parser.add_argument("--n-defect", type=int, default=12)
    parser.add_argument("--k-shot", type=int, default=4, help="gain: references (the class's train/good images)")
    parser.add_argument("--sides", type=int, nargs="+", default=[2048, 4096], help="cost: image sides")
    parser.add_argument("--preset", default="ViT-L/14@336px", help="cost: architecture (pipeline.random_weights)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gain_part = args.part == "gain"
    args.image_size = args.image_size or (224 if gain_part else 518)
    args.tile_size = args.tile_size or (256 if gain_part else 512)
    if args.quick:
        args.size, args.metrics_resolution, args.n_good, args.n_defect, args.k_shot = 200, 100, 1, 2, 2
        args.image_size, args.tile_size, args.sides, args.preset = 56, 112, [200], "tiny"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_cost_worker(json.loads(args.worker))))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        result = (gain if args.part == "gain" else cost)(args, Path(folder))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
