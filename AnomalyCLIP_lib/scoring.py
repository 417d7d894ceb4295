"""The one scoring path (method §5): text features, image scores and anomaly maps.

``test.py``, ``train.py`` and single-image inference all go through these functions:
training uses :func:`image_logits` and :func:`similarity_maps` (differentiable in the text
features), evaluation uses :func:`predict` (or the module
:class:`AnomalyCLIP_lib.inference.AnomalyCLIPInference`), which adds the map sum and the
Gaussian filter.

The Gaussian filter exists twice: :func:`gaussian_smooth` is scipy's (the reference, on the
CPU); :func:`gaussian_smooth_torch` is the same filter as a torch operation (separable
convolution, scipy's ``reflect`` boundary, ``truncate=4``), equal to scipy's to ~1e-7, which
runs on the GPU and exports to ONNX.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .constants import DPAM_LAYER
from .model import CLIP, VisionTransformer, normalize_layers

logger = logging.getLogger(__name__)

TEMPERATURE = 0.07
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


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
    """Normalised text features ``(1, 2, D)``: index 0 normal, 1 abnormal (method §4).

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
    """Per-layer two-class probability maps ``(B, 2, S, S)`` before any filtering (method §5).

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
        _, count, classes = probs.shape
        side = math.isqrt(int(count))
        # -1 for the batch: the same values, and an exported graph keeps its batch axis dynamic.
        probs = probs.reshape(-1, side, side, classes).permute(0, 3, 1, 2)
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


def gaussian_kernel(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> np.ndarray:
    """scipy's 1-D Gaussian weights: radius ``int(truncate * sigma + 0.5)``, normalised (float64)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (float(sigma) * float(sigma)) * x**2)
    return weights / weights.sum()


def reflect_indices(length: int, radius: int) -> np.ndarray:
    """Source indices of a line of ``length`` padded by ``radius`` on each side, scipy's ``reflect``.

    scipy's ``reflect`` is the half-sample symmetric extension ``d c b a | a b c d | d c b a``
    (the edge sample repeats; torch's ``'reflect'`` pad does not repeat it, its ``'replicate'``
    is another thing again). A pad wider than the line reflects again and again: the
    extension is periodic with period ``2 * length``.
    """
    positions = np.arange(-radius, length + radius) % (2 * length)
    return np.where(positions < length, positions, 2 * length - 1 - positions)


def _smooth_axis(maps: torch.Tensor, weights: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate every line of ``maps`` (B, H, W) along ``axis`` (1 or 2) with ``weights``."""
    radius = (weights.numel() - 1) // 2
    lines = maps if axis == 2 else maps.transpose(1, 2)
    count, length = int(lines.shape[1]), int(lines.shape[2])  # static sides; the batch stays dynamic
    index = torch.from_numpy(reflect_indices(length, radius)).to(lines.device)
    padded = lines.index_select(2, index).reshape(-1, 1, length + 2 * radius)
    out = F.conv1d(padded, weights.view(1, 1, -1)).reshape(-1, count, length)
    return out if axis == 2 else out.transpose(1, 2)


def gaussian_smooth_torch(
    maps: torch.Tensor,
    sigma: float,
    truncate: float = GAUSSIAN_TRUNCATE,
    compute_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """scipy's ``gaussian_filter(mode='reflect', truncate=4)`` per map, as a torch operation.

    A separable filter: rows, then columns, each a 1-D convolution over the line padded by
    :func:`reflect_indices` (a gather, so kernels wider than the map work too). It runs where
    ``maps`` lives and exports to ONNX as Gather + Conv.

    scipy accumulates in float64 and rounds once. In float64 (the default) this agrees with it
    to half a float32 ulp (~2.4e-7 on maps up to 4); in float32 (``compute_dtype=None`` on
    float32 maps, what an exported graph runs) to a few ulps (~1.5e-6 on maps up to 4).

    Args:
        maps: ``(B, H, W)`` floating maps.
        sigma: Standard deviation in pixels; 0 returns ``maps`` unchanged.
        truncate: Radius in standard deviations, as scipy's argument.
        compute_dtype: Dtype of the arithmetic (float64 falls back to float32 on devices
            without it, e.g. MPS); ``None`` computes in the maps' dtype.

    Returns:
        ``(B, H, W)`` filtered maps, same dtype and device as ``maps``.
    """
    if sigma <= 0:
        return maps
    dtype = compute_dtype or maps.dtype
    if dtype == torch.float64 and maps.device.type == "mps":
        dtype = torch.float32
    weights = torch.from_numpy(gaussian_kernel(sigma, truncate)).to(maps.device, dtype)
    # scipy filters the last axis first, then the first; the order only moves rounding.
    smoothed = _smooth_axis(_smooth_axis(maps.to(dtype), weights, axis=2), weights, axis=1)
    return smoothed.to(maps.dtype)


def raw_predict(
    visual: VisionTransformer,
    text_feats: torch.Tensor,
    images: torch.Tensor,
    features_list: Sequence[int] = (24,),
    dpam_layer: int | None = DPAM_LAYER,
    feature_map_layer: int = 0,
    batched: bool = False,
    reference_arithmetic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(B,)`` and UNFILTERED anomaly maps ``(B, S, S)``, float32, on the images' device.

    Args:
        visual: The vision tower (``model.visual``).
        batched: Run the vision tower on the whole batch in one pass even on a CPU (what an
            exported graph needs: one graph for any batch size); see :meth:`VisionTransformer.encode`.
        reference_arithmetic: The released code's attention arithmetic; see :meth:`VisionTransformer.encode`.
        Others: see :func:`predict`.
    """
    image_embedding, patch_tokens, _ = encode_tokens(visual, images, features_list, dpam_layer, batched,
                                                     reference_arithmetic)
    return zero_shot(image_embedding, patch_tokens, text_feats, images.shape[-1], feature_map_layer)


def zero_shot(image_embedding: torch.Tensor, patch_tokens: Sequence[torch.Tensor], text_feats: torch.Tensor,
              image_size: int, feature_map_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(B,)`` and UNFILTERED maps ``(B, S, S)`` of encoded images against the text features."""
    scores = image_logits(image_embedding.float(), text_feats).softmax(-1)[:, 1]
    maps = anomaly_map(similarity_maps([t.float() for t in patch_tokens], text_feats, image_size, feature_map_layer))
    return scores.float(), maps


def encode_tokens(
    visual: VisionTransformer,
    images: torch.Tensor,
    features_list: Sequence[int],
    dpam_layer: int | None,
    batched: bool = False,
    reference_arithmetic: bool = False,
    memory_layers: Sequence[int] = (),
    memory_stream: str = "dpam",
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One pass of the vision tower for the zero-shot maps and, optionally, a few-shot memory.

    Args:
        memory_layers: Layers whose tokens the memory compares (``()``: none).
        memory_stream: ``dpam``: those layers' tokens of the stream the maps use; ``plain``: the
            original CLIP stream's.
        Others: see :func:`raw_predict`.

    Returns:
        ``(image_embedding, [tokens per features_list layer], [tokens per memory layer])``.
    """
    layers = normalize_layers(features_list, visual.num_layers)
    memory = sorted({int(layer) for layer in memory_layers})
    dpam_extra = [layer for layer in memory if layer not in layers] if memory_stream == "dpam" else []
    requested = sorted(set(layers) | set(dpam_extra))
    plain = memory if memory_stream == "plain" else []
    if batched:
        embedding, tokens = visual._encode(images, requested, visual._first_dpam_layer(dpam_layer),
                                           reference_arithmetic, plain)
    else:
        embedding, tokens = visual.encode(images, requested, dpam_layer, reference_arithmetic, plain)
    by_layer = dict(zip(requested, tokens[: len(requested)]))
    memory_tokens = tokens[len(requested):] if plain else [by_layer[layer] for layer in memory]
    return embedding, [by_layer[layer] for layer in layers], memory_tokens


def predict(
    model: CLIP,
    text_feats: torch.Tensor,
    images: torch.Tensor,
    features_list: Sequence[int] = (24,),
    dpam_layer: int | None = DPAM_LAYER,
    sigma: float = 4.0,
    feature_map_layer: int = 0,
    reference_arithmetic: bool = False,
) -> AnomalyPrediction:
    """Image anomaly scores and filtered anomaly maps for a batch (method §5).

    Every image is scored independently: a batch gives the same results as one image at a time.

    Args:
        model: The backbone.
        text_feats: ``(1, 2, D)`` from :func:`text_features`.
        images: ``(B, 3, S, S)`` preprocessed images on the model's device.
        features_list: Vision layers whose patch tokens make the maps.
        dpam_layer: See :meth:`CLIP.encode_image`.
        sigma: Gaussian filter sigma (0 disables the filter).
        feature_map_layer: See :func:`similarity_maps`.
        reference_arithmetic: See :meth:`CLIP.encode_image`.
    """
    with torch.inference_mode():
        scores, maps = raw_predict(model.visual, text_feats, images, features_list, dpam_layer, feature_map_layer,
                                   reference_arithmetic=reference_arithmetic)
    return AnomalyPrediction(scores=scores.cpu(), maps=gaussian_smooth(maps, sigma))
