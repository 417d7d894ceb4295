"""Loading ``.pth`` files that may come from anywhere: tensors only, and errors in our own words."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import AnomalyCLIPError


def check_is_file(path: Path, what: str, fix: str) -> None:
    """One-line errors for a ``what`` path that is absent or a folder; ``fix`` says what to pass instead."""
    if path.is_dir():
        raise AnomalyCLIPError(f"{what} {path} is a folder, not a file; {fix}")
    if not path.is_file():
        raise AnomalyCLIPError(f"{what} {path} does not exist; {fix}")


def load_tensors(path: str | os.PathLike, what: str) -> object:
    """``torch.load(path, weights_only=True)`` onto the CPU, with one-line errors naming ``what``.

    Files that hold Python objects other than tensors and plain containers are refused without
    running them (a pickle can carry code); the message says so, and never advises turning the
    protection off.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            raise AnomalyCLIPError(f"{what} {path} holds Python objects besides tensors; they are not loaded because "
                                   "a pickle can run code: use a file of tensors (a state dict saved with torch.save)"
                                   ) from None
        raise AnomalyCLIPError(f"{what} {path} is not a PyTorch checkpoint (it cannot be unpickled): check the "
                               "path, or save the file again") from None
    except (RuntimeError, KeyError, EOFError, ValueError, OSError, AttributeError, IndexError) as exc:
        # torch's readers fail in many ways on foreign or truncated files (KeyError, "PytorchStreamReader ...").
        kind = "truncated or damaged" if path.stat().st_size > 0 and _looks_like_zip(path) else "not a PyTorch checkpoint"
        raise AnomalyCLIPError(f"{what} {path} is {kind} ({type(exc).__name__}); check the path, or save or "
                               "download the file again") from None


def _looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"
