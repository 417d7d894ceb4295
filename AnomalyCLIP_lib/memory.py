"""A memory of normal patches: few-shot scoring from K reference images, without training.

The patch tokens of K normal reference images of one class, at a few vision layers, form the
memory. A test patch's distance at a layer is ``min over the memory of (1 - cos) / 2`` (in
[0, 1]), computed exactly as a chunked matmul of L2-normalised tokens, so the extra memory per
image is bounded by the chunk, however large K is. Distances are upsampled to the image (as the
zero-shot maps are) and averaged over the layers into the memory map ``M``; the inference module
(:class:`AnomalyCLIP_lib.inference.AnomalyCLIPInference` with a memory) fuses it with the
zero-shot map ``Z`` and score ``s``, after the same Gaussian filter::

    map   = (1 - w) * Z + w * n * M        (n: the zero-shot layers summed into Z)
    score = (1 - w) * s + w * max(M)

**Normalisation from the references alone.** Layers differ in how far apart normal patches are,
so with K >= 2 each layer's distances are scaled so that the references' typical worst patch
sits at 0.5: its leave-one-out distance (each reference against the memory of the others, its
largest patch distance, averaged over the references) is measured once when the memory is built.
0.5 is also where the zero-shot probability turns from normal to abnormal. Nothing of the
evaluated images enters a score but the image itself. With K = 1 there is no other reference to
measure against, and the raw halved distances are used.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import AnomalyCLIPError
from .memory_config import MEMORY_FORMAT, MemorySettings

__all__ = ["MemorySettings", "PatchMemory", "build_memory", "leave_one_out_scales", "memory_from_unit_tokens",
           "nearest_distances"]

NORMAL_LEVEL = 0.5  # where the references' typical worst patch lands after normalisation
CHUNK_ROWS = 2048  # memory rows per matmul: (B, P, CHUNK_ROWS) similarities at a time


def normalized(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (class token dropped) as float32 unit vectors: ``(B, 1 + P, D) -> (B, P, D)``."""
    patches = tokens[:, 1:].float()
    return patches / patches.norm(dim=-1, keepdim=True)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``min over bank of (1 - cos) / 2`` for every query: ``(B, P, D), (N, D) -> (B, P)``, exact.

    Both inputs must be unit vectors. The bank is walked in chunks of ``chunk_rows`` rows, so at
    most ``B * P * chunk_rows`` similarities exist at once.
    """
    best: torch.Tensor | None = None
    for start in range(0, int(bank.shape[0]), chunk_rows):
        similarity = (queries @ bank[start:start + chunk_rows].transpose(0, 1)).amax(dim=-1)
        best = similarity if best is None else torch.maximum(best, similarity)
    if best is None:
        raise AnomalyCLIPError("the memory is empty: it needs at least one reference image")
    return (1.0 - best) / 2.0


def leave_one_out_scales(per_layer: Sequence[torch.Tensor], chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-layer factors putting the references' typical worst leave-one-out distance at 0.5.

    Args:
        per_layer: ``(K, P, D)`` unit patch tokens of the K references, per layer.

    Returns:
        ``(L,)`` float32 factors; ones when K < 2 (nothing to leave out) or a layer's distances are all 0.
    """
    scales = []
    for tokens in per_layer:
        count = int(tokens.shape[0])
        if count < 2:
            scales.append(1.0)
            continue
        worst = []
        for left_out in range(count):
            others = torch.cat([tokens[:left_out], tokens[left_out + 1:]]).reshape(-1, tokens.shape[-1])
            worst.append(float(nearest_distances(tokens[left_out:left_out + 1], others, chunk_rows).max()))
        level = float(np.mean(worst))
        scales.append(NORMAL_LEVEL / level if level > 0 else 1.0)
    return torch.tensor(scales, dtype=torch.float32)


class PatchMemory(nn.Module):
    """The normal patch tokens of one class's references, per layer, with their normalisation.

    Args:
        banks: ``(N, D)`` float32 unit tokens per layer of ``settings.layers`` (N = K * P).
        scales: ``(L,)`` per-layer factors (:func:`leave_one_out_scales`).
        settings: Layers, stream and fusion weight.
        info: JSON-ready facts recorded with the memory (class, references and their SHA-256,
            backbone, image size, ...); not used in scoring.
    """

    scales: torch.Tensor

    def __init__(self, banks: Sequence[torch.Tensor], scales: torch.Tensor, settings: MemorySettings,
                 info: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if len(banks) != len(settings.layers) or scales.shape != (len(settings.layers),):
            raise AnomalyCLIPError(f"a memory needs one bank and one scale per layer {list(settings.layers)}; got "
                                   f"{len(banks)} banks and scales of shape {tuple(scales.shape)}")
        widths = {int(bank.shape[-1]) for bank in banks}
        if len(widths) != 1 or any(bank.ndim != 2 or bank.shape[0] == 0 for bank in banks):
            raise AnomalyCLIPError(f"memory banks must be non-empty (N, D) arrays of one width; got "
                                   f"{[tuple(bank.shape) for bank in banks]}")
        for position, bank in enumerate(banks):
            self.register_buffer(f"bank_{position}", bank.detach().float().contiguous())
        self.register_buffer("scales", scales.detach().float().clone())
        self.settings = settings
        self.info = dict(info or {})

    @property
    def banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"bank_{position}") for position in range(len(self.settings.layers))]

    @property
    def width(self) -> int:
        return int(self.bank_0.shape[-1])

    @property
    def rows(self) -> int:
        """Memory rows per layer (K references times P patches)."""
        return int(self.bank_0.shape[0])

    def distance_maps(self, memory_tokens: Sequence[torch.Tensor], image_size: int) -> torch.Tensor:
        """The memory map ``M``: ``(B, S, S)`` scaled distances averaged over layers, unfiltered, float32.

        Args:
            memory_tokens: ``(B, 1 + P, D)`` tokens per memory layer (class token first).
            image_size: Output side S (bilinear, align_corners=False, as the zero-shot maps).
        """
        maps = []
        for tokens, bank, scale in zip(memory_tokens, self.banks, self.scales):
            if int(tokens.shape[-1]) != self.width:
                raise AnomalyCLIPError(f"the memory holds {self.width}-dim tokens but the backbone gives "
                                       f"{int(tokens.shape[-1])}: it was built with another backbone")
            distances = nearest_distances(normalized(tokens), bank) * scale
            side = math.isqrt(int(distances.shape[-1]))
            grid = distances.reshape(-1, 1, side, side)
            maps.append(F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(maps).mean(dim=0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The memory as numpy arrays (``bank_<layer>``, ``scales``) plus its settings and info as JSON bytes."""
        arrays = {f"bank_{layer}": bank.cpu().numpy() for layer, bank in zip(self.settings.layers, self.banks)}
        arrays["scales"] = self.scales.cpu().numpy()
        header = {"format": MEMORY_FORMAT, "settings": self.settings.to_dict(), "info": self.info}
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str = "memory") -> PatchMemory:
        """The memory of :meth:`to_arrays`' output; ``source`` names it in errors."""
        header = read_header(arrays, source)
        settings_values = header.get("settings")
        try:
            settings = MemorySettings(layers=tuple(settings_values["layers"]), stream=settings_values["stream"],
                                      weight=settings_values["weight"])
            banks = [torch.from_numpy(np.asarray(arrays[f"bank_{layer}"], dtype=np.float32))
                     for layer in settings.layers]
            scales = torch.from_numpy(np.asarray(arrays["scales"], dtype=np.float32))
        except (KeyError, TypeError, ValueError) as error:
            raise AnomalyCLIPError(f"{source} is not a memory file written by --save_memory ({type(error).__name__}: "
                                   f"{error}); build it again with --reference_path ... --save_memory FILE") from None
        return cls(banks, scales, settings, header.get("info") or {})

    def with_weight(self, weight: float) -> PatchMemory:
        """This memory (sharing its banks) with another fusion weight."""
        settings = dataclasses.replace(self.settings, weight=weight)
        return PatchMemory(self.banks, self.scales, settings, self.info)

    @property
    def reference_count(self) -> int:
        """K, the references the banks hold (``info["k"]``), P rows each, in the order of ``info["references"]``."""
        return int(self.info.get("k") or 0)

    def without_reference(self, position: int) -> PatchMemory:
        """This memory without reference ``position``'s rows, same normalisation (leave-one-out calibration)."""
        count = self.reference_count
        if count < 2 or not 0 <= position < count or self.rows % count:
            raise AnomalyCLIPError(f"cannot leave reference {position} out of a memory of {count} reference(s): "
                                   "leave-one-out needs at least 2")
        per_reference = self.rows // count
        start, stop = position * per_reference, (position + 1) * per_reference
        banks = [torch.cat([bank[:start], bank[stop:]]) for bank in self.banks]
        return PatchMemory(banks, self.scales, self.settings, {**self.info, "left_out": position})

    def extra_repr(self) -> str:
        return f"layers={list(self.settings.layers)}, stream={self.settings.stream}, rows={self.rows}, " \
               f"weight={self.settings.weight}"


def read_header(arrays: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """The JSON header of a memory's arrays (format, settings, info)."""
    try:
        header = json.loads(bytes(np.asarray(arrays["header"], dtype=np.uint8)).decode("utf-8"))
    except (KeyError, ValueError, TypeError) as error:
        raise AnomalyCLIPError(f"{source} is not a memory file written by --save_memory ({type(error).__name__}); "
                               "build it again with --reference_path ... --save_memory FILE") from None
    if not isinstance(header, dict) or header.get("format") != MEMORY_FORMAT:
        raise AnomalyCLIPError(f"{source} is not a memory file of this version (format {header.get('format')!r} "
                               f"where {MEMORY_FORMAT!r} is expected); build it again with --save_memory")
    return header


def build_memory(per_layer: Sequence[torch.Tensor], settings: MemorySettings,
                 info: Mapping[str, Any] | None = None) -> PatchMemory:
    """A memory from the references' tokens.

    Args:
        per_layer: ``(K, 1 + P, D)`` tokens of the K references per layer of ``settings.layers``
            (as the vision tower returns them, class token first).
        settings: Layers, stream, weight.
        info: Facts to record (see :class:`PatchMemory`).
    """
    return memory_from_unit_tokens([normalized(tokens) for tokens in per_layer], settings, info)


def memory_from_unit_tokens(unit: Sequence[torch.Tensor], settings: MemorySettings,
                            info: Mapping[str, Any] | None = None) -> PatchMemory:
    """A memory from the references' unit patch tokens, ``(K, N, D)`` per layer: N patches per reference
    (however many views a reference has), each reference left out whole by the normalisation."""
    return PatchMemory([tokens.reshape(-1, tokens.shape[-1]) for tokens in unit], leave_one_out_scales(unit),
                       settings, info)
