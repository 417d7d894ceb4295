"""The typed, frozen settings of a run: what each CLI parses its flags into, once.

Every command-line tool builds these from its flags in :mod:`pipeline.cli` and hands them to the
engine; no library or engine function sees an ``argparse.Namespace``, and nothing changes a
config after it is made (:func:`dataclasses.replace` gives a new one, e.g. when an export's
manifest fixes the design).

* :class:`ModelSpec`: the backbone, the prompt design and the vision layers (every CLI).
* :class:`LoaderSpec`: batch size and DataLoader workers.
* :class:`ScoringSpec`: what scores images: a prompt checkpoint through torch, or an exported graph.
* :class:`RunRecord`: the flags as the command line gave them, for ``results.json`` and checkpoints.

The per-command configs (evaluation, training, prediction, export) live beside their engines and
are made of these parts. This module is torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

DEFAULT_BACKBONE = "ViT-L/14@336px"


@dataclass(frozen=True)
class ModelSpec:
    """Backbone, prompt design and the vision layers the maps come from (the original's flags).

    Attributes:
        backbone: Registry name or CLIP checkpoint file.
        trust_backbone: Load a TorchScript backbone whose SHA-256 is not a registered one.
        n_ctx: Learnable prompt length.
        depth: Deep text-token depth.
        t_n_ctx: Deep text-token length.
        features_list: Vision layers whose patch tokens make the maps.
        feature_map_layer: Index into ``features_list`` of the first layer summed into the map.
        image_size: Input side in pixels.
        reference_arithmetic: The released code's attention arithmetic (bit-identical, slower).
        seed: Random seed.
        device: ``cpu``, ``cuda`` or ``cuda:N``; ``None``: CUDA when available.
        threads: Torch's intra-op CPU threads (and an exported runtime's); ``None``: PyTorch's default
            within the CPUs this process may use (:func:`pipeline.loading.configure_threads`).
    """

    backbone: str = DEFAULT_BACKBONE
    trust_backbone: bool = False
    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    features_list: tuple[int, ...] = (24,)
    feature_map_layer: int = 0
    image_size: int = 518
    reference_arithmetic: bool = False
    seed: int = 111
    device: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class LoaderSpec:
    """How images are batched and decoded.

    Attributes:
        batch_size: Images per forward pass (or per training step).
        num_workers: DataLoader worker processes; ``None``: a per-device default
            (:func:`pipeline.loading.resolve_num_workers`).
    """

    batch_size: int = 8
    num_workers: int | None = None


@dataclass(frozen=True)
class ScoringSpec:
    """What scores images, and how the maps are finished.

    Attributes:
        checkpoint_path: Prompt checkpoint (the torch path; with an export, the file it was made from).
        sigma: Gaussian filter sigma of the maps (0: none).
        precision: ``fp32``; ``fp16``/``bf16`` autocast (CUDA; bf16 also on a CPU with bfloat16 instructions),
            or with an exported runtime ``fp16``/``bf16`` (OpenVINO) and ``int8`` (a quantised export).
        runtime: ``torch``, ``onnxruntime`` or ``openvino``.
        model_dir: The export folder (with an exported runtime).
    """

    checkpoint_path: str | None = None
    sigma: float = 4.0
    precision: str = "fp32"
    runtime: str = "torch"
    model_dir: str | None = None

    @property
    def exported(self) -> bool:
        """Whether an exported graph scores (``--runtime onnxruntime|openvino``)."""
        return self.runtime != "torch"


@dataclass(frozen=True)
class RunRecord:
    """The flags of a run as recorded in ``results.json`` and checkpoints (read-only).

    Attributes:
        values: ``{flag destination: value}`` in the parser's order, as the command line and the
            defaults gave them.
        given: The destinations the command line set explicitly (not defaults).
    """

    values: Mapping[str, Any]
    given: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def with_values(self, **changes: Any) -> RunRecord:
        """A new record with ``changes`` applied (resolved defaults, an export's settings)."""
        return RunRecord({**self.values, **changes}, self.given)

    def as_dict(self) -> dict[str, Any]:
        """A plain copy of the values (JSON-ready where the values are)."""
        return dict(self.values)


def replaced(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for the frozen configs: a new config, the old one untouched."""
    return dataclasses.replace(config, **changes)
