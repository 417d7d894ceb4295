"""Randomly initialised CLIP ViTs in OpenAI's state-dict layout, for offline use.

Tests, the offline demo and the benchmarks need a backbone without the 900 MB download: this
builds one of any size (the tiny stand-in, or the full ViT-L/14@336 architecture) with seeded
random weights of realistic scale. Its scores mean nothing about anomaly detection.

Command line::

    python -m pipeline.random_weights --preset tiny --out tiny_clip.pt
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from AnomalyCLIP_lib.model import CLIP
from pipeline.atomic import atomic_torch_save
from pipeline.cli import cli_parser, run_cli

TINY = {
    "embed_dim": 64, "image_resolution": 56, "vision_layers": 24, "vision_width": 128, "vision_patch_size": 14,
    "context_length": 77, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1,
    "transformer_layers": 12,
}
VIT_L14_336 = {
    "embed_dim": 768, "image_resolution": 336, "vision_layers": 24, "vision_width": 1024, "vision_patch_size": 14,
    "context_length": 77, "vocab_size": 49408, "transformer_width": 768, "transformer_heads": 12,
    "transformer_layers": 12,
}
PRESETS = {"tiny": TINY, "ViT-L/14@336px": VIT_L14_336}

# Standard deviations by parameter-name suffix: non-trivial scales, so that a wrong head split,
# scale or LayerNorm changes outputs visibly, while activations stay in a sane range.
_STD_BY_SUFFIX = {
    "in_proj_weight": 0.1,
    "out_proj.weight": 0.05,
    "c_fc.weight": 0.05,
    "c_proj.weight": 0.02,
    "conv1.weight": 0.02,
    "token_embedding.weight": 0.02,
    "class_embedding": 0.09,
}


def _random_like(key: str, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(value.shape, generator=generator)
    if ".ln_" in key or key.startswith(("ln_final", "visual.ln_")):
        return 1 + 0.05 * noise if key.endswith("weight") else 0.02 * noise
    if key.endswith("bias"):
        return 0.02 * noise
    if key == "logit_scale":
        return value.clone()
    if key == "positional_embedding":
        return 0.01 * noise
    if key == "visual.positional_embedding":
        return 0.1 * noise
    if key in ("text_projection", "visual.proj"):
        return noise * value.shape[0] ** -0.5
    return next(std for suffix, std in _STD_BY_SUFFIX.items() if key.endswith(suffix)) * noise


def random_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32,
                      **architecture: int) -> dict[str, torch.Tensor]:
    """A seeded random CLIP state dict in OpenAI's layout, with its integer entries.

    Args:
        seed: Seed of the weights.
        dtype: Floating dtype of the tensors (OpenAI ships fp16).
        **architecture: Keyword arguments of :class:`CLIP`; missing ones come from :data:`TINY`.
    """
    config = {**TINY, **architecture}
    with torch.device("meta"):
        shapes = CLIP(**config).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {key: _random_like(key, torch.empty(value.shape), generator).to(dtype) for key, value in shapes.items()}
    state["input_resolution"] = torch.tensor(config["image_resolution"])
    state["context_length"] = torch.tensor(config["context_length"])
    state["vocab_size"] = torch.tensor(config["vocab_size"])
    return state


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a random backbone of ``--preset`` to ``--out`` (run it through ``run_cli``)."""
    parser = cli_parser("Write a random CLIP backbone (no download) as a state dict.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .pt file")
    args = parser.parse_args(argv)
    state = random_state_dict(args.seed, **PRESETS[args.preset])
    atomic_torch_save(state, args.out)
    print(f"wrote a random {args.preset} CLIP stand-in to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
