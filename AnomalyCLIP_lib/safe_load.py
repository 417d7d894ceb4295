"""Loading ``.pth`` files that may come from anywhere: tensors only, and errors in our own words."""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
from pathlib import Path

import torch

from .errors import AnomalyCLIPError, read_error_line

# Graph files of an export.py folder: ONNX, OpenVINO IR (its weights, .bin, lie beside the .xml).
GRAPH_SUFFIXES = (".onnx", ".xml")


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
    if _is_graph_file(path):
        raise AnomalyCLIPError(f"{what} {path} is an exported graph (export.py), not a PyTorch checkpoint: give a "
                               ".pth file here; an export is scored by test.py and test_one_example.py with "
                               f"--runtime onnxruntime|openvino --model {path.parent}")
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol, before it refuses the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch says "Weights only load failed" both for a pickle of objects and for bytes that are no pickle.
        if _looks_like_zip(path) or _is_pickle(path):
            raise AnomalyCLIPError(f"{what} {path} holds Python objects besides tensors; they are not loaded because "
                                   "a pickle can run code: use a file of tensors (a state dict saved with torch.save)"
                                   ) from None
        raise AnomalyCLIPError(f"{what} {path} is not a PyTorch checkpoint (it cannot be unpickled): check the "
                               "path, or save the file again") from None
    except (RuntimeError, KeyError, EOFError, ValueError, OSError, AttributeError, IndexError) as exc:
        not_content = read_error_line(exc, path, what) if isinstance(exc, OSError) else None
        if not_content:  # permissions, a failing disk: the file is not damaged
            raise AnomalyCLIPError(not_content) from None
        # torch's readers fail in many ways on foreign or truncated files (KeyError, "PytorchStreamReader ...").
        kind = ("truncated or damaged" if path.stat().st_size > 0 and _looks_like_zip(path)
                else "not a PyTorch checkpoint")
        raise AnomalyCLIPError(f"{what} {path} is {kind} ({type(exc).__name__}); check the path, or save or "
                               "download the file again") from None


def _is_graph_file(path: Path) -> bool:
    """An ONNX or OpenVINO graph; a ``.bin`` only beside its ``.xml`` (``pytorch_model.bin`` is torch's format)."""
    suffix = path.suffix.lower()
    return suffix in GRAPH_SUFFIXES or (suffix == ".bin" and path.with_suffix(".xml").is_file())


def _looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _is_pickle(path: Path) -> bool:
    """Whether the file starts with a whole pickle stream, read opcode by opcode (nothing is run)."""
    try:
        with open(path, "rb") as handle:
            for _ in pickletools.genops(handle):
                pass
    except Exception:  # genops raises ValueError and others on bytes that are no pickle
        return False
    return True
