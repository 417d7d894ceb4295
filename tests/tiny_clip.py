"""Tiny CLIP checkpoints in OpenAI's layout, built by the tests themselves (no download).

The vision tower keeps ViT-L/14's depth (24 layers, so DPAM layer 20 and features 6/12/18/24
fit) and patch size 14, with small widths; the text tower keeps the vocabulary (49408) and
context (77) so the real tokenizer works. Weights are random with non-trivial scales so a
wrong head split, scale or LayerNorm shows up in comparisons.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from AnomalyCLIP_lib.model import CLIP


def tiny_clip_state_dict(
    seed: int = 0,
    vision_layers: int = 24,
    vision_width: int = 128,
    text_layers: int = 12,
    text_width: int = 64,
    embed_dim: int = 64,
    image_resolution: int = 56,
    patch_size: int = 14,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A random CLIP ViT state dict in OpenAI's layout, with its integer entries."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=embed_dim,
        image_resolution=image_resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=patch_size,
        context_length=77,
        vocab_size=49408,
        transformer_width=text_width,
        transformer_heads=max(text_width // 64, 1),
        transformer_layers=text_layers,
    )
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        state[key] = _random_like(key, value, generator).to(dtype)
    state["input_resolution"] = torch.tensor(image_resolution)
    state["context_length"] = torch.tensor(77)
    state["vocab_size"] = torch.tensor(49408)
    return state


_STD_BY_SUFFIX = {
    "in_proj_weight": 0.1,
    "out_proj.weight": 0.05,
    "c_fc.weight": 0.05,
    "c_proj.weight": 0.02,
    "conv1.weight": 0.02,
    "token_embedding.weight": 0.02,
    "proj": 0.1,
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
    if key == "text_projection":
        return noise * value.shape[0] ** -0.5
    std = next(std for suffix, std in _STD_BY_SUFFIX.items() if key.endswith(suffix))
    return std * noise


class _TensorHolder(nn.Module):
    """A module that only carries tensors, so TorchScript can archive a state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state_dict`` as a TorchScript archive, the format of OpenAI's released files."""
    root = _TensorHolder()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, _TensorHolder())
            module = module._modules[name]
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(root), str(path))
