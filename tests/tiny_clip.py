"""Tiny CLIP checkpoints in OpenAI's layout, built by the tests themselves (no download).

The weights come from :mod:`pipeline.random_weights` (preset ``tiny``): ViT-L/14's
depth (24 vision layers, so DPAM layer 20 and features 6/12/18/24 fit) and patch size 14 with
small widths, and the real vocabulary (49408) and context (77) so the tokenizer works. This
module adds the TorchScript archive, the format of OpenAI's released files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.random_weights import random_state_dict


def tiny_clip_state_dict(
    seed: int = 0,
    vision_layers: int = 24,
    text_layers: int = 12,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A random tiny CLIP state dict in OpenAI's layout, with its integer entries."""
    return random_state_dict(seed, dtype, vision_layers=vision_layers, transformer_layers=text_layers)


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
