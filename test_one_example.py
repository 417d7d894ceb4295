"""Score single images (or every image of a folder) and write their heat-map overlays.

Example::

    python test_one_example.py --image_path bottle.png \
        --checkpoint_path ./checkpoints/9_12_4_multiscale_visa/epoch_15.pth --threshold 0.5

Prints one line per image: path, anomaly score in [0, 1] and, with ``--threshold``, the
verdict; the overlay (the original's JET blend) goes to ``save_path/<name>.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.precision import PRECISIONS, autocast
from AnomalyCLIP_lib.transform import image_transform, load_image
from utils import DPAM_LAYER, add_model_args, load_model_and_prompts, resolve_device, run_cli, setup_seed
from visualize import save_overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Anomaly score and heat map for single images.")
    parser.add_argument("--image_path", required=True, help="an image file, or a folder of images")
    parser.add_argument("--checkpoint_path", required=True, help="prompt checkpoint (ours or the original's)")
    parser.add_argument("--save_path", default="./results/single", help="folder for the overlays")
    add_model_args(parser)
    parser.add_argument("--sigma", type=float, default=4, help="Gaussian filter sigma for the maps")
    parser.add_argument("--threshold", type=float, default=None, help="print 'anomalous' when score >= threshold")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16/bf16 autocast on CUDA only")
    return parser.parse_args(argv)


def image_files(path: str | Path) -> list[Path]:
    """The image itself, or the images of a folder (sorted by name, non-images ignored)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
        raise AnomalyCLIPError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); pass an image or a folder of them")
    raise AnomalyCLIPError(f"--image_path {path} does not exist")


def score_images(args: argparse.Namespace) -> list[tuple[Path, float, Path]]:
    """Score every image; returns ``(image, score, overlay)`` per image, in order."""
    setup_seed(args.seed)
    device = resolve_device(args.device)
    files = image_files(args.image_path)
    model, prompt_learner, _ = load_model_and_prompts(args, device, args.checkpoint_path)
    with torch.inference_mode():
        text_feats = scoring.text_features(model, prompt_learner.eval())
    preprocess = image_transform(args.image_size)
    save_path = Path(args.save_path)
    results = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = torch.stack([preprocess(load_image(file)) for file in chunk]).to(device)
        with autocast(device, args.precision):
            prediction = scoring.predict(model, text_feats, images, args.features_list, DPAM_LAYER, args.sigma,
                                         args.feature_map_layer[0])
        for file, score, anomaly_map in zip(chunk, prediction.scores.tolist(), prediction.maps.numpy()):
            overlay = save_overlay(file, anomaly_map, save_path / file.stem)
            results.append((file, score, overlay))
            verdict = "" if args.threshold is None else ("\tanomalous" if score >= args.threshold else "\tnormal")
            print(f"{file}\t{score:.4f}{verdict}\t{overlay}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    score_images(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
