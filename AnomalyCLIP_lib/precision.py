"""Numeric precision of the forward pass.

The reference behaviour is fp32 everywhere (method §9). On a CUDA GPU, ``fp16`` or ``bf16``
autocast is an opt-in speed option; it changes results beyond the parity tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import AnomalyCLIPError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # torch dtype names; torch loads lazily, so the
# deployment path (PRECISIONS only) runs without it


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: str = "fp32") -> Iterator[None]:
    """Context that runs the enclosed forward in ``precision`` on ``device``.

    Raises:
        AnomalyCLIPError: Unknown precision, or half precision asked for off a CUDA device.
    """
    if precision not in PRECISIONS:
        raise AnomalyCLIPError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        yield
        return
    import torch

    if torch.device(device).type != "cuda":
        raise AnomalyCLIPError(f"--precision {precision} needs a CUDA device; use fp32 on {device}")
    with torch.autocast(device_type="cuda", dtype=getattr(torch, _AUTOCAST_DTYPES[precision])):
        yield
