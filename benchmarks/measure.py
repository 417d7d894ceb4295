"""Memory measurements shared by the benchmarks (torch-free: the runtime benchmark's workers use them)."""

from __future__ import annotations

import resource
import sys


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None where unavailable."""
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def current_rss_mb() -> float | None:
    return status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def process_peak_rss_mb() -> float:
    """Peak resident set size over the process's whole life in MiB (``ru_maxrss``: not reset)."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since the last reset on Linux)."""
    peak = status_mb("VmHWM")
    return process_peak_rss_mb() if peak is None else peak
