"""The one inference module: preprocessed images in, image scores and anomaly maps out.

:class:`AnomalyCLIPInference` holds what scoring needs and nothing else: the vision tower, the
two text features (computed once from the prompt learner and the text tower, kept as a
buffer) and the scoring settings as a frozen :class:`ScoringConfig`. Its ``forward`` is what
:func:`AnomalyCLIP_lib.scoring.predict` computes, with the Gaussian filter as a torch
operation, so it runs on the GPU and traces into one exportable graph (``export.py``).

Typical use (what ``test.py`` and ``test_one_example.py`` do)::

    inference = AnomalyCLIPInference.from_model(model, prompt_learner, ScoringConfig(image_size=518))
    prediction = inference.predict(images)          # AnomalyPrediction on the CPU
    scores, maps = inference(images)                # tensors on the module's device

The Gaussian filter (``ScoringConfig.smoothing``):

* ``"auto"`` (default): scipy's filter with ``reference_arithmetic`` (the parity mode: results
  bit-identical to ``scoring.predict`` and the original), the torch filter otherwise.
* ``"torch"``: :func:`scoring.gaussian_smooth_torch` (float64 arithmetic in eager mode, equal
  to scipy's to ~2e-7; float32 in an exported graph).
* ``"scipy"``: :func:`scoring.gaussian_smooth` on the CPU, whatever the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import scoring
from .errors import AnomalyCLIPError
from .constants import DPAM_LAYER
from .memory import MemorySettings, PatchMemory
from .model import CLIP, VisionTransformer, normalize_layers
from .precision import PRECISIONS, autocast

logger = logging.getLogger(__name__)

SMOOTHING_MODES = ("auto", "torch", "scipy")


@dataclass(frozen=True)
class ScoringConfig:
    """The scoring settings of an inference module (frozen).

    Attributes:
        image_size: Input side S in pixels; maps are S x S.
        features_list: Vision layers whose patch tokens make the maps (sorted, distinct).
        dpam_layer: The last ``dpam_layer - 1`` blocks run DPAM; ``None`` for plain CLIP.
        sigma: Gaussian filter sigma in pixels (0: no filter).
        feature_map_layer: Index into ``features_list`` of the first layer summed into the map.
        reference_arithmetic: The released code's attention arithmetic (the parity mode).
        precision: ``fp32``, or ``fp16`` / ``bf16`` autocast on CUDA (bf16 also on a CPU with bfloat16 instructions).
        smoothing: Which Gaussian filter (module docstring).
    """

    image_size: int = 518
    features_list: tuple[int, ...] = (24,)
    dpam_layer: int | None = DPAM_LAYER
    sigma: float = 4.0
    feature_map_layer: int = 0
    reference_arithmetic: bool = False
    precision: str = "fp32"
    smoothing: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "features_list", tuple(sorted({int(layer) for layer in self.features_list})))
        object.__setattr__(self, "sigma", float(self.sigma))
        if self.image_size < 1 or self.sigma < 0:
            raise AnomalyCLIPError(f"image_size must be positive and sigma non-negative; "
                                   f"got {self.image_size}, {self.sigma}")
        if not self.features_list:
            raise AnomalyCLIPError("features_list is empty; pass at least one layer, e.g. --features_list 24")
        if not 0 <= self.feature_map_layer < len(self.features_list):
            raise AnomalyCLIPError(f"feature_map_layer {self.feature_map_layer} must index features_list "
                                   f"{list(self.features_list)} (0..{len(self.features_list) - 1})")
        if self.precision not in PRECISIONS:
            raise AnomalyCLIPError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.smoothing not in SMOOTHING_MODES:
            raise AnomalyCLIPError(f"unknown smoothing {self.smoothing!r}; choose one of {SMOOTHING_MODES}")

    @property
    def uses_scipy_filter(self) -> bool:
        """Whether the maps go through scipy's filter (the parity mode) rather than the torch one."""
        return self.smoothing == "scipy" or (self.smoothing == "auto" and self.reference_arithmetic)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (``features_list`` as a list)."""
        values = dataclasses.asdict(self)
        values["features_list"] = list(self.features_list)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScoringConfig:
        """The config of :meth:`to_dict`'s output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise AnomalyCLIPError(f"unknown scoring settings {unknown}; expected some of {sorted(names)}")
        return cls(**values)


def is_exporting() -> bool:
    """Whether the forward is being traced or exported (TorchScript/ONNX tracing, torch.export)."""
    compiler = getattr(torch, "compiler", None)
    exporting = bool(compiler is not None and getattr(compiler, "is_exporting", lambda: False)())
    return exporting or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class AnomalyCLIPInference(nn.Module):
    """Vision tower + text features + scoring settings: ``forward(images) -> (scores, maps)``.

    Args:
        visual: The vision tower (``model.visual``), used as it is (shared, never changed).
        text_features: ``(1, 2, D)`` normalised text features (:func:`scoring.text_features`).
        config: The scoring settings.
        memory: A few-shot memory of normal patches (:mod:`AnomalyCLIP_lib.memory`), fused into the
            scores and maps; ``None``: zero-shot, exactly as without this argument.
        one_pass_batches: Run the vision tower on a whole batch in one pass on a CPU too (as an export
            does), instead of one image at a time (:meth:`VisionTransformer.encode`). Several times the
            throughput of a small backbone's batches; an image's score then depends on its batch's
            other images in the last float32 bits (~1e-7). Off by default (every image gets exactly its
            single-image result); the service turns it on (``serve.py --batch_forward``).
    """

    text_features: torch.Tensor

    def __init__(self, visual: VisionTransformer, text_features: torch.Tensor, config: ScoringConfig,
                 memory: PatchMemory | None = None, one_pass_batches: bool = False) -> None:
        super().__init__()
        if text_features.ndim != 3 or text_features.shape[:2] != (1, 2):
            raise AnomalyCLIPError(f"text features must be (1, 2, D); got {tuple(text_features.shape)}")
        normalize_layers(config.features_list, visual.num_layers)  # raises for layers the tower lacks
        visual._first_dpam_layer(config.dpam_layer)  # raises for an impossible DPAM layer
        if config.image_size % visual.patch_size:
            raise AnomalyCLIPError(f"image_size {config.image_size} must be a multiple of the patch size "
                                   f"{visual.patch_size} (e.g. 518 for ViT-L/14)")
        if memory is not None:
            memory.settings.check_layers(visual.num_layers)
            if memory.width != text_features.shape[-1]:
                raise AnomalyCLIPError(f"the memory holds {memory.width}-dim tokens and this backbone gives "
                                       f"{text_features.shape[-1]}: it was built with another backbone")
        self.visual = visual
        self.register_buffer("text_features", text_features.detach().float().clone())
        self._config = config
        self.memory = memory.to(text_features.device) if memory is not None else None
        self.one_pass_batches = bool(one_pass_batches)

    @property
    def config(self) -> ScoringConfig:
        """The frozen scoring settings."""
        return self._config

    @property
    def device(self) -> torch.device:
        return self.text_features.device

    @classmethod
    def from_model(cls, model: CLIP, prompt_learner: nn.Module, config: ScoringConfig) -> AnomalyCLIPInference:
        """Compute the text features once (eval mode, no gradients) and keep only the vision tower."""
        prompt_learner.eval()
        with torch.inference_mode():
            text_features = scoring.text_features(model, prompt_learner)
        return cls(model.visual, text_features.clone(), config)

    def _check(self, images: torch.Tensor) -> None:
        size = self._config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise AnomalyCLIPError(f"images must be (B, 3, {size}, {size}) for this module; got {tuple(images.shape)}")

    def _precision_context(self, device: torch.device, exporting: bool) -> contextlib.AbstractContextManager:
        if exporting or self._config.precision == "fp32":
            return contextlib.nullcontext()
        return autocast(device, self._config.precision)

    def _smooth(self, maps: torch.Tensor, exporting: bool) -> torch.Tensor:
        sigma = self._config.sigma
        if self._config.uses_scipy_filter and not exporting:
            return scoring.gaussian_smooth(maps, sigma).to(maps.device)
        # In a graph, float32 arithmetic (what every runtime offers); eager, float64 (scipy's).
        return scoring.gaussian_smooth_torch(maps, sigma, compute_dtype=None if exporting else torch.float64)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` and filtered anomaly maps ``(B, S, S)``, float32, on the images' device.

        Args:
            images: ``(B, 3, S, S)`` preprocessed images (:func:`transform.image_transform`).
        """
        self._check(images)
        cfg = self._config
        exporting = is_exporting()
        if self.memory is not None:
            return self._few_shot(images, exporting)
        with self._precision_context(images.device, exporting):
            scores, maps = scoring.raw_predict(self.visual, self.text_features, images, cfg.features_list,
                                               cfg.dpam_layer, cfg.feature_map_layer,
                                               batched=exporting or self.one_pass_batches,
                                               reference_arithmetic=cfg.reference_arithmetic)
        return scores, self._smooth(maps.float(), exporting)

    def _few_shot(self, images: torch.Tensor, exporting: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot scores and maps fused with the memory's (:mod:`AnomalyCLIP_lib.memory`)."""
        cfg, memory = self._config, self.memory
        assert memory is not None
        settings = memory.settings
        with self._precision_context(images.device, exporting):
            embedding, tokens, memory_tokens = scoring.encode_tokens(
                self.visual, images, cfg.features_list, cfg.dpam_layer, batched=exporting or self.one_pass_batches,
                reference_arithmetic=cfg.reference_arithmetic, memory_layers=settings.layers,
                memory_stream=settings.stream)
            scores, maps = scoring.zero_shot(embedding, tokens, self.text_features, cfg.image_size,
                                             cfg.feature_map_layer)
        memory_maps = memory.distance_maps(memory_tokens, cfg.image_size)  # float32, outside any autocast
        zero_shot_maps, memory_maps = self._smooth(torch.cat([maps.float(), memory_maps]), exporting).chunk(2)
        weight, summed_layers = settings.weight, len(cfg.features_list) - cfg.feature_map_layer
        fused_scores = (1 - weight) * scores + weight * memory_maps.amax(dim=(-2, -1))
        return fused_scores, (1 - weight) * zero_shot_maps + (weight * summed_layers) * memory_maps

    def reference_tokens(self, images: torch.Tensor, settings: MemorySettings) -> list[torch.Tensor]:
        """The tokens a memory holds of ``images``: ``(B, 1 + P, D)`` per layer of ``settings.layers``, float32."""
        self._check(images)
        settings.check_layers(self.visual.num_layers)
        cfg = self._config
        with torch.inference_mode(), self._precision_context(images.device, False):
            _, _, tokens = scoring.encode_tokens(self.visual, images.to(self.device), cfg.features_list,
                                                 cfg.dpam_layer, reference_arithmetic=cfg.reference_arithmetic,
                                                 memory_layers=settings.layers, memory_stream=settings.stream)
        return [layer.float().cpu() for layer in tokens]

    def with_memory(self, memory: PatchMemory | None) -> AnomalyCLIPInference:
        """This module (sharing the tower and text features) scoring with ``memory`` (``None``: zero-shot)."""
        return AnomalyCLIPInference(self.visual, self.text_features, self._config, memory,
                                    self.one_pass_batches).eval()

    def with_one_pass_batches(self, enabled: bool = True) -> AnomalyCLIPInference:
        """This module (sharing the tower, text features and memory) with ``one_pass_batches`` set (class doc)."""
        return AnomalyCLIPInference(self.visual, self.text_features, self._config, self.memory, enabled).eval()

    def predict(self, images: torch.Tensor) -> scoring.AnomalyPrediction:
        """``forward`` without gradients on the module's device; results on the CPU (as ``scoring.predict``)."""
        with torch.inference_mode():
            scores, maps = self(images.to(self.device))
        return scoring.AnomalyPrediction(scores=scores.cpu(), maps=maps.cpu())

    def export_copy(self) -> AnomalyCLIPInference:
        """This module with the settings an exported graph runs: fp32, default attention, torch filter.

        Shares the tower and the text features with this module; changes neither (the attention
        mode is an argument of the forward, not a state of the tower).
        """
        config = dataclasses.replace(self._config, reference_arithmetic=False, precision="fp32", smoothing="torch")
        return AnomalyCLIPInference(self.visual, self.text_features, config, self.memory).eval()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._config.to_dict().items())
