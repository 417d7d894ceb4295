"""The export's manifest, ``anomalyclip.json``: its one schema, written by ``export.py`` and read by the runtime.

The manifest names the graph file(s) and records what scoring with them needs (image size,
preprocessing, scoring settings) and where the graph came from (prompt design, backbone and
checkpoint with their SHA-256s, versions, and thresholds when given). :data:`RUNTIME_FIELDS` are
what the runtime reads; :data:`RECORD_FIELDS` what the CLIs read to check and record a run.

Torch-free: the deployment runtime reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from AnomalyCLIP_lib.errors import AnomalyCLIPError, read_error_line

MANIFEST_NAME = "anomalyclip.json"
MANIFEST_VERSION = 1
RUNTIMES = ("onnxruntime", "openvino")
GRAPH_STEM = "anomalyclip"
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps")


def manifest_document(*, fmt: str, files: list[str], opset: int, image_size: int, mean: list[float],
                      std: list[float], scoring: dict[str, Any], design: dict[str, int], backbone: dict[str, str],
                      checkpoint: dict[str, str], versions: dict[str, str], thresholds: Any = None) -> dict[str, Any]:
    """The content of ``anomalyclip.json`` (every field the readers check, in this order)."""
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "graph": files[0],
        "files": files,
        "opset": opset,
        "inputs": {INPUT_NAME: ["batch", 3, image_size, image_size]},
        "outputs": {OUTPUT_NAMES[0]: ["batch"], OUTPUT_NAMES[1]: ["batch", image_size, image_size]},
        "image_size": image_size,
        "preprocessing": {"resize": "bicubic", "resize_in_stored_mode": True, "then": "convert RGB, /255, normalise",
                          "mean": list(mean), "std": list(std)},
        "scoring": scoring,
        "design": design,
        "backbone": backbone,
        "checkpoint": checkpoint,
        "versions": versions,
    }
    if thresholds is not None:
        manifest["thresholds"] = thresholds
    return manifest


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``anomalyclip.json`` of an export folder, checked.

    Raises:
        AnomalyCLIPError: Missing, unreadable or of an unknown version.
    """
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise AnomalyCLIPError(f"{model_dir} holds no {MANIFEST_NAME}; pass a folder written by export.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        not_content = read_error_line(exc, path) if isinstance(exc, OSError) else None
        raise AnomalyCLIPError(not_content or f"cannot read {path} ({exc}); re-run export.py".splitlines()[0]) from None
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise AnomalyCLIPError(f"{path} has manifest version {version!r}, this code reads "
                               f"{MANIFEST_VERSION}; re-run export.py")
    check_fields(manifest, RUNTIME_FIELDS, path)
    return manifest


_NUMBER = (int, float)
# The fields the runtime reads, with their types (bool is an int to Python: refused where a number is wanted).
RUNTIME_FIELDS: dict[str, Any] = {
    "graph": str, "image_size": int,
    "preprocessing": {"mean": list, "std": list},
    "scoring": {"features_list": list, "sigma": _NUMBER, "feature_map_layer": int, "dpam_layer": int,
                "reference_arithmetic": bool, "precision": str, "image_size": int},
}
# What export.py records besides, read by the CLIs (test.py, test_one_example.py) to check and record a run.
RECORD_FIELDS: dict[str, Any] = {
    "design": {"n_ctx": int, "depth": int, "t_n_ctx": int},
    "backbone": {"name": str, "sha256": str},
    "checkpoint": {"path": str, "sha256": str},
}


def check_fields(values: dict[str, Any], fields: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Refuse a manifest (hand-edited, or of another build) that lacks one of ``fields`` or holds a wrong type.

    Raises:
        AnomalyCLIPError: Naming the file and the field.
    """
    for name, kind in fields.items():
        where = f"{prefix}{name}"
        if name not in values:
            raise AnomalyCLIPError(f"{path} lacks the field '{where}'; it is damaged or not written by this "
                                   "export.py: re-run export.py")
        value = values[name]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise AnomalyCLIPError(f"{path}: '{where}' must be an object, not {value!r}; re-run export.py")
            check_fields(value, kind, path, f"{where}.")
        elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise AnomalyCLIPError(f"{path}: '{where}' has the wrong type ({value!r}); re-run export.py")


