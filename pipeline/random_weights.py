"""Randomly initialised CLIP ViTs in OpenAI's state-dict layout, for offline use.

Tests, the offline demo and the benchmarks need a backbone without the 900 MB download: this
builds one of any size (the tiny stand-in, or the full ViT-L/14@336 architecture) with seeded
random weights of realistic scale. Its scores mean nothing about anomaly detection.

Two kinds of weights:

* :func:`random_state_dict` (the default): every block matrix drawn with a fixed standard
  deviation chosen for the tiny model (width 128). Fine for speed, shapes and parity at any
  size, but at ViT-L's width 1024 its q, k and v are about 3x CLIP's scale, the attention
  logits about 10x: the softmaxes saturate and 24 layers amplify any change of the input. Its
  forward is *chaotic*: an input perturbation of relative size 1e-3 moves the image embedding
  by ~100 % and the patch tokens by ~70 % (``--preset ViT-L/14@336px``, 224 px, fp32).
* :func:`stable_state_dict` (``--stable``): the same draws with the vision blocks' matrices
  scaled by ``sqrt(128 / width)``, which gives every unit the tiny model's scale (in_proj std
  ~ width^-0.5, as CLIP's own initialisation). Its forward is smooth as a trained model's is:
  the same 1e-3 perturbation moves its outputs by ~1e-3 (:func:`input_sensitivity`). This is
  the stand-in for precision questions: a lower precision's rounding is a small perturbation
  too, and only on a non-chaotic network does its effect on the scores say anything about a
  trained model's (benchmarks/bench_precision.py). Its speed is the same.

Command line::

    python -m pipeline.random_weights --preset tiny --out tiny_clip.pt
    python -m pipeline.random_weights --preset ViT-L/14@336px --stable --out vit_l_stable.pt
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from AnomalyCLIP_lib.constants import DPAM_LAYER
from AnomalyCLIP_lib.model import CLIP, VisionTransformer
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


_BLOCK_MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def stable_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32,
                      **architecture: int) -> dict[str, torch.Tensor]:
    """:func:`random_state_dict` with a non-chaotic vision tower (module docstring): the vision blocks'
    matrices scaled by ``sqrt(128 / vision_width)``, so every width computes at the tiny model's scale."""
    state = random_state_dict(seed, torch.float32, **architecture)
    factor = (TINY["vision_width"] / {**TINY, **architecture}["vision_width"]) ** 0.5
    for key, value in state.items():
        if key.startswith("visual.transformer.") and key.endswith(_BLOCK_MATRICES):
            value.mul_(factor)
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}


def input_sensitivity(visual: VisionTransformer, image_size: int, epsilon: float = 1e-3, seed: int = 0,
                      features_list: Sequence[int] = (24,), dpam_layer: int = DPAM_LAYER) -> dict[str, float]:
    """How far a relative input perturbation of size ``epsilon`` moves the tower's outputs (fp32).

    A random image ``x`` and a random direction ``d`` scaled to ``|d| = epsilon |x|``; returns
    ``|f(x + d) - f(x)| / |f(x)|`` (Frobenius norms) of the image embedding and of the patch
    tokens of the last of ``features_list``. About ``epsilon`` for a smooth network; near 1 for a
    chaotic one.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(1, 3, image_size, image_size, generator=generator)
    direction = torch.randn(images.shape, generator=generator)
    direction *= epsilon * images.norm() / direction.norm()
    with torch.inference_mode():
        embedding, tokens = visual.encode(images, features_list, dpam_layer)
        moved_embedding, moved_tokens = visual.encode(images + direction, features_list, dpam_layer)
    return {"image_embedding": float((moved_embedding - embedding).norm() / embedding.norm()),
            "patch_tokens": float((moved_tokens[-1] - tokens[-1]).norm() / tokens[-1].norm())}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a random backbone of ``--preset`` to ``--out`` (run it through ``run_cli``)."""
    parser = cli_parser("Write a random CLIP backbone (no download) as a state dict.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stable", action="store_true",
                        help="a non-chaotic stand-in (vision blocks at CLIP's scale): for precision questions")
    parser.add_argument("--out", required=True, help="output .pt file")
    args = parser.parse_args(argv)
    make = stable_state_dict if args.stable else random_state_dict
    state = make(args.seed, **PRESETS[args.preset])
    atomic_torch_save(state, args.out)
    print(f"wrote a random{' stable' if args.stable else ''} {args.preset} CLIP stand-in to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
