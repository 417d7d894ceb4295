"""The export's manifest, ``anomalyclip.json``: its one schema, written by ``export.py`` and read by the runtime.

The manifest names the graph file(s) and records what scoring with them needs (image size,
preprocessing, scoring settings) and where the graph came from (prompt design, backbone and
checkpoint with their SHA-256s, versions, and thresholds when given). :data:`RUNTIME_FIELDS` are
what the runtime reads; :data:`RECORD_FIELDS` what the CLIs read to check and record a run.
``files_sha256`` holds the SHA-256 of every file of the graph: :func:`verify_files` refuses a
graph file replaced or damaged after the export (it would be scored under the manifest's name).

Torch-free: the deployment runtime reads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.pretrained import sha256_of
from pipeline import strict_json
from pipeline.threshold_values import check_classes

logger = logging.getLogger(__name__)

MANIFEST_NAME = "anomalyclip.json"
MANIFEST_VERSION = 1
RUNTIMES = ("onnxruntime", "openvino")
GRAPH_STEM = "anomalyclip"
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps")
HASHES_FIELD = "files_sha256"
QUANTIZATIONS = ("int8",)  # export.py --quantize; the manifest's "quantization" (absent: an fp32 graph)


def manifest_document(*, fmt: str, files: list[str], opset: int, image_size: int, mean: list[float],
                      std: list[float], scoring: dict[str, Any], design: dict[str, int], backbone: dict[str, str],
                      checkpoint: dict[str, str], versions: dict[str, str], thresholds: Any = None,
                      files_sha256: dict[str, str] | None = None,
                      quantization: dict[str, str] | None = None) -> dict[str, Any]:
    """The content of ``anomalyclip.json`` (every field the readers check, in this order).

    ``files_sha256`` maps each of ``files`` to its SHA-256 (:func:`files_sha256`); export.py always gives it.
    ``quantization`` (``{"precision": "int8", "method": ...}``) marks a graph quantised at export.
    """
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
    if files_sha256 is not None:
        manifest[HASHES_FIELD] = dict(files_sha256)
    if quantization is not None:
        manifest["quantization"] = dict(quantization)
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
    manifest = strict_json.read_file(
        path, twice=lambda key: f"{path} lists {key!r} twice in one object, and only the last would be read: "
                                "re-run export.py",
        unreadable=lambda error: f"cannot read {path} ({error}); re-run export.py".splitlines()[0])
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise AnomalyCLIPError(f"{path} has manifest version {version!r}, this code reads "
                               f"{MANIFEST_VERSION}; re-run export.py")
    check_fields(manifest, RUNTIME_FIELDS, path)
    check_manifest_thresholds(manifest, path)
    return manifest


def files_sha256(folder: str | os.PathLike, files: list[str]) -> dict[str, str]:
    """``{name: SHA-256}`` of ``files`` in ``folder`` (the manifest's ``files_sha256``)."""
    return {name: sha256_of(Path(folder) / name) for name in files}


def verify_files(model_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Refuse an export whose graph files are not the ones ``export.py`` wrote (checked once, at load).

    A manifest written before the hashes were recorded (no ``files_sha256``) is accepted with a
    logged warning: its files cannot be checked, and refusing would break every earlier export.

    Raises:
        AnomalyCLIPError: A file differs from its recorded SHA-256, is missing, or the field is malformed;
            one line naming the file and the fix.
    """
    path = Path(model_dir) / MANIFEST_NAME
    hashes = manifest.get(HASHES_FIELD)
    files = manifest.get("files") if isinstance(manifest.get("files"), list) else [manifest["graph"]]
    if hashes is None:
        logger.warning("%s records no SHA-256 of its graph files (written by an earlier export.py): they are not "
                       "checked; re-run export.py to record them", path)
        return
    if not isinstance(hashes, dict) or any(not isinstance(hashes.get(name), str) for name in files):
        raise AnomalyCLIPError(f"{path}: '{HASHES_FIELD}' does not give a SHA-256 for each of {', '.join(files)}; "
                               "it is damaged: re-run export.py")
    for name in files:
        graph_file = Path(model_dir) / name
        if not graph_file.is_file():
            raise AnomalyCLIPError(f"graph file {graph_file} named by {path} is missing; re-run export.py")
        if sha256_of(graph_file) != hashes[name]:
            raise AnomalyCLIPError(f"{graph_file} is not the file export.py wrote (its SHA-256 differs from the one "
                                   f"recorded in {path}): it was replaced or damaged; re-run export.py")


def quantization(manifest: dict[str, Any], model_dir: str | os.PathLike) -> str | None:
    """The precision an export's graph was quantised to (``int8``), or ``None`` for an fp32 graph.

    Raises:
        AnomalyCLIPError: A ``quantization`` field this code does not know (hand-edited or newer).
    """
    field = manifest.get("quantization")
    if field is None:
        return None
    value = field.get("precision") if isinstance(field, dict) else None
    if value not in QUANTIZATIONS:
        raise AnomalyCLIPError(f"{Path(model_dir) / MANIFEST_NAME}: 'quantization' is {field!r}, this code knows "
                               f"{{'precision': one of {', '.join(QUANTIZATIONS)}}}; re-run export.py")
    return value


def run_precision(manifest: dict[str, Any], model_dir: str | os.PathLike, runtime: str, requested: str,
                  given: bool) -> str:
    """The precision a run of this export computes in, from ``--precision`` and the export's quantisation.

    An int8-quantised graph runs in int8 (``--precision`` may be left out); an fp32 graph runs in
    fp32 in both runtimes, or in fp16/bf16 as OpenVINO's inference precision.

    Args:
        requested: ``--precision`` (``fp32`` when not given).
        given: Whether the command line gave ``--precision``.

    Raises:
        AnomalyCLIPError: A precision this export and runtime cannot run; one line with the fix.
    """
    quantised = quantization(manifest, model_dir)
    if quantised is not None:
        if given and requested != quantised:
            raise AnomalyCLIPError(f"--precision {requested}: {model_dir} holds a graph quantised to {quantised} "
                                   f"(export.py --quantize {quantised}), which runs in {quantised} only; drop "
                                   "--precision, or export again without --quantize")
        return quantised
    if requested in QUANTIZATIONS:
        raise AnomalyCLIPError(f"--precision {requested}: {model_dir} holds an fp32 graph; make a quantised one "
                               f"with export.py --format onnx --quantize {requested} --out DIR and pass --model DIR")
    if runtime == "onnxruntime" and requested != "fp32":
        raise AnomalyCLIPError(f"--precision {requested} with --runtime onnxruntime: ONNX Runtime's CPU provider "
                               f"runs fp32 graphs in fp32 (and int8 exports); use --runtime openvino --precision "
                               f"{requested}")
    return requested


def check_manifest_thresholds(manifest: dict[str, Any], path: Path) -> None:
    """Refuse thresholds stored in the manifest that the exported graph cannot produce (see ``check_classes``)."""
    stored = manifest.get("thresholds")
    classes = stored.get("classes") if isinstance(stored, dict) else None
    if not isinstance(classes, dict):
        return  # no thresholds.json content: the runtime uses none
    scoring = manifest["scoring"]
    layers = len(scoring["features_list"]) - scoring["feature_map_layer"]
    check_classes(classes, f"the thresholds in {path}", layers if layers > 0 else None)


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


