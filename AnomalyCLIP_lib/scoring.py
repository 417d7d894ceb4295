"""The one scoring path (SPEC §5): text features, image scores and anomaly maps.

``test.py``, ``train.py`` and single-image inference all go through these functions:
training uses :func:`image_logits` and :func:`similarity_maps` (differentiable in the text
features), evaluation uses :func:`predict`, which adds the map sum and the Gaussian filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .model import CLIP

TEMPERATURE = 0.07


@dataclass
class AnomalyPrediction:
    """Per-image results of :func:`predict`.

    Attributes:
        scores: ``(B,)`` float32 image anomaly scores in [0, 1], on the CPU.
        maps: ``(B, S, S)`` float32 anomaly maps after the Gaussian filter, on the CPU.
    """

    scores: torch.Tensor
    maps: torch.Tensor


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def text_features(model: CLIP, prompt_learner: torch.nn.Module) -> torch.Tensor:
    """Normalised text features ``(1, 2, D)``: index 0 normal, 1 abnormal (SPEC §4).

    They do not depend on the image: compute them once per evaluation (under
    ``torch.inference_mode``) or once per training step (with gradients).
    """
    prompts, tokenized_prompts, deep_prompts = prompt_learner()
    features = model.encode_text_learn(prompts, tokenized_prompts, deep_prompts).float()
    features = torch.stack(torch.chunk(features, chunks=2, dim=0), dim=1)
    return l2_normalize(features)


def image_logits(image_embedding: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` logits ``f . t / 0.07`` of the normalised image embedding against the texts."""
    # A broadcast batched matmul, as the released training code computes it: gradients then
    # reduce over the batch in the same order, which keeps the fp16-rounded deep-token gradients equal.
    return (l2_normalize(image_embedding).unsqueeze(1) @ text_feats.permute(0, 2, 1))[:, 0] / TEMPERATURE


def similarity_maps(
    patch_tokens: Sequence[torch.Tensor], text_feats: torch.Tensor, image_size: int, feature_map_layer: int = 0
) -> list[torch.Tensor]:
    """Per-layer two-class probability maps ``(B, 2, S, S)`` before any filtering (SPEC §5).

    Args:
        patch_tokens: ``(B, 1 + g*g, D)`` tokens per layer, as :meth:`CLIP.encode_image` returns.
        text_feats: ``(1, 2, D)`` normalised text features.
        image_size: Output side S; maps are upsampled bilinearly (align_corners=False).
        feature_map_layer: Index into ``patch_tokens`` of the first layer used (the
            original's ``--feature_map_layer``; 0 uses every layer).
    """
    maps = []
    for tokens in patch_tokens[feature_map_layer:]:
        texts = text_feats[0]  # indexed per layer, as the released code does (same gradient order)
        # Elementwise product and sum over every token, class token included, then dropping it:
        # the released code's arithmetic, so gradients reduce in the same order.
        similarity = (l2_normalize(tokens).unsqueeze(2) * texts.view(1, 1, *texts.shape)).sum(-1)
        probs = (similarity / TEMPERATURE).softmax(-1)[:, 1:]
        batch, count, classes = probs.shape
        side = int(count**0.5)
        probs = probs.reshape(batch, side, side, classes).permute(0, 3, 1, 2)
        maps.append(F.interpolate(probs, size=(image_size, image_size), mode="bilinear", align_corners=False))
    return maps


def anomaly_map(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of ``(p_abnormal + 1 - p_normal) / 2``: ``(B, S, S)``, unfiltered."""
    return torch.stack([(m[:, 1] + 1 - m[:, 0]) / 2.0 for m in maps]).sum(dim=0)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy's ``gaussian_filter`` (mode 'reflect', truncate 4) per map, on the CPU, float32."""
    maps_np = maps.detach().float().cpu().numpy()
    if sigma <= 0:
        return torch.from_numpy(maps_np.copy())
    return torch.from_numpy(np.stack([gaussian_filter(one, sigma=sigma) for one in maps_np]))


def predict(
    model: CLIP,
    text_feats: torch.Tensor,
    images: torch.Tensor,
    features_list: Sequence[int] = (24,),
    dpam_layer: int | None = 20,
    sigma: float = 4.0,
    feature_map_layer: int = 0,
) -> AnomalyPrediction:
    """Image anomaly scores and filtered anomaly maps for a batch (SPEC §5).

    Every image is scored independently: a batch gives the same results as one image at a time.

    Args:
        model: The backbone.
        text_feats: ``(1, 2, D)`` from :func:`text_features`.
        images: ``(B, 3, S, S)`` preprocessed images on the model's device.
        features_list: Vision layers whose patch tokens make the maps.
        dpam_layer: See :meth:`CLIP.encode_image`.
        sigma: Gaussian filter sigma (0 disables the filter).
        feature_map_layer: See :func:`similarity_maps`.
    """
    with torch.inference_mode():
        image_embedding, patch_tokens = model.encode_image(images, features_list, dpam_layer)
        scores = image_logits(image_embedding.float(), text_feats).softmax(-1)[:, 1]
        maps = anomaly_map(similarity_maps([t.float() for t in patch_tokens], text_feats, images.shape[-1], feature_map_layer))
    return AnomalyPrediction(scores=scores.float().cpu(), maps=gaussian_smooth(maps, sigma))
