"""Numeric precision of the forward pass.

The reference behaviour is fp32 everywhere (SPEC §9). On a CUDA GPU, ``fp16`` or ``bf16``
autocast is an opt-in speed option; it changes results beyond the parity tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import AnomalyCLIPError

PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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
    if torch.device(device).type != "cuda":
        raise AnomalyCLIPError(f"--precision {precision} needs a CUDA device; use fp32 on {device}")
    with torch.autocast(device_type="cuda", dtype=_AUTOCAST_DTYPES[precision]):
        yield
