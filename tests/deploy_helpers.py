"""Shared builders for the deployment tests (inference module, export, runtimes)."""

from __future__ import annotations

from pathlib import Path

import torch

from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details

TINY_SIZE = 56
FEATURES = (6, 12, 18, 24)


def random_prompt_learner(model, seed: int = 0) -> AnomalyCLIP_PromptLearner:
    """A prompt learner with seeded random (non-trivial) prompts for ``model``."""
    torch.manual_seed(seed)
    learner = AnomalyCLIP_PromptLearner(model, design_details(n_ctx=12, depth=9, t_n_ctx=4))
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
    return learner


def save_prompt_checkpoint(learner: AnomalyCLIP_PromptLearner, path: Path) -> Path:
    """``learner`` as a prompt checkpoint in the original's format."""
    torch.save({"prompt_learner": learner.state_dict()}, path)
    return path


def random_images(batch: int, size: int = TINY_SIZE, seed: int = 0) -> torch.Tensor:
    """Seeded preprocessed-looking images ``(B, 3, S, S)``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
