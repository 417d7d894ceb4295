"""The few-shot memory's settings, torch-free (the memory itself: :mod:`AnomalyCLIP_lib.memory`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import AnomalyCLIPError

MEMORY_STREAMS = ("dpam", "plain")
DEFAULT_MEMORY_LAYERS = (6, 12, 18, 24)
DEFAULT_MEMORY_WEIGHT = 0.5
MEMORY_FORMAT = "anomalyclip-memory/1"


@dataclass(frozen=True)
class MemorySettings:
    """How a memory is built and fused (frozen).

    Attributes:
        layers: Vision layers whose patch tokens the memory holds (sorted, distinct).
        stream: ``dpam``: the tokens of the stream the zero-shot maps use (DPAM from the
            first DPAM block on); ``plain``: the original CLIP stream's.
        weight: ``w`` of the fusion (module docstring); 0 keeps the zero-shot result, 1 is memory only.
    """

    layers: tuple[int, ...] = DEFAULT_MEMORY_LAYERS
    stream: str = "dpam"
    weight: float = DEFAULT_MEMORY_WEIGHT

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted({int(layer) for layer in self.layers})))
        object.__setattr__(self, "weight", float(self.weight))
        if not self.layers:
            raise AnomalyCLIPError("--memory_layers is empty; pass at least one layer, e.g. --memory_layers 6 12 18 24")
        if self.stream not in MEMORY_STREAMS:
            raise AnomalyCLIPError(f"unknown memory stream {self.stream!r}; choose one of {MEMORY_STREAMS}")
        if not 0.0 <= self.weight <= 1.0:
            raise AnomalyCLIPError(f"--memory_weight {self.weight} must be in [0, 1] "
                                   "(0: zero-shot only, 1: memory only)")

    def check_layers(self, num_layers: int) -> None:
        """Raise for layers the vision tower does not have."""
        bad = [layer for layer in self.layers if not 1 <= layer <= num_layers]
        if bad:
            raise AnomalyCLIPError(f"--memory_layers has layers {bad} outside 1..{num_layers} (the backbone has "
                                   f"{num_layers} vision layers)")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "stream": self.stream, "weight": self.weight}
