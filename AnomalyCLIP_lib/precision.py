"""Numeric precision of the forward pass.

The reference behaviour is fp32 everywhere (method §9). Lower precisions are opt-in speed options
that change results beyond the parity tolerance:

* torch: ``fp16`` or ``bf16`` autocast on a CUDA GPU; ``bf16`` autocast on a CPU with bfloat16
  instructions (AMX or AVX512-BF16), where it runs the matmuls about 2.5x faster (on a CPU
  without them bf16 is emulated, slower than fp32, and refused).
* an exported graph (``deploy.runtime``): ``fp16``/``bf16`` as OpenVINO's inference precision,
  ``int8`` as a graph quantised at export (``export.py --quantize int8``).

:data:`RUN_PRECISIONS` are the values of the CLIs' ``--precision``; :data:`PRECISIONS` those the
torch inference module computes in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AnomalyCLIPError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
RUN_PRECISIONS = (*PRECISIONS, "int8")  # --precision: int8 only through an exported, quantised graph
_AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # torch dtype names; torch loads lazily, so the
# deployment path (PRECISIONS only) runs without it
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


@functools.cache
def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this CPU as Linux lists them (empty where unknown)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def check_cpu_bf16(flags: frozenset[str] | None = None) -> None:
    """Refuse bf16 on a CPU without bfloat16 instructions (it would be emulated, slower than fp32).

    Args:
        flags: The CPU's flags (default: :func:`cpu_flags`).

    Raises:
        AnomalyCLIPError: One line naming what this CPU offers.
    """
    flags = cpu_flags() if flags is None else flags
    if not any(flag in flags for flag in CPU_BF16_FLAGS):
        raise AnomalyCLIPError(f"--precision bf16 on the CPU: this CPU has no bfloat16 instructions "
                               f"({' or '.join(CPU_BF16_FLAGS)}), so bf16 would be emulated and slower than fp32; it "
                               "offers fp32 only: use --precision fp32 (the default)")


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: str = "fp32") -> Iterator[None]:
    """Context that runs the enclosed forward in ``precision`` on ``device``.

    Raises:
        AnomalyCLIPError: Unknown precision, or a precision this device does not run (see module docstring).
    """
    if precision not in PRECISIONS:
        raise AnomalyCLIPError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        yield
        return
    import torch

    device_type = torch.device(device).type
    if device_type == "cpu" and precision == "bf16":
        check_cpu_bf16()
    elif device_type != "cuda":
        raise AnomalyCLIPError(f"--precision {precision} needs a CUDA device; use fp32 on {device}")
    with torch.autocast(device_type=device_type, dtype=getattr(torch, _AUTOCAST_DTYPES[precision])):
        yield
