"""Export the scoring path to one graph (ONNX or OpenVINO IR) plus a manifest, for deployment.

Example::

    python export.py --checkpoint_path ./checkpoints/9_12_4_multiscale_visa/epoch_15.pth \
        --image_size 518 --features_list 24 --format onnx --out ./exported/visa

writes ``OUT/anomalyclip.onnx`` (or ``anomalyclip.xml`` + ``.bin``) and ``OUT/anomalyclip.json``.
The graph is :class:`AnomalyCLIP_lib.inference.AnomalyCLIPInference`: input ``images``
``(batch, 3, S, S)`` float32 (preprocessed as ``AnomalyCLIP_lib.transform.image_transform``
does), outputs ``scores`` ``(batch,)`` and ``maps`` ``(batch, S, S)`` (Gaussian filter
included); the batch axis is dynamic. The text features are constants inside the graph: the
text tower is not exported. The manifest holds the image size, the normalisation, the scoring
settings, the prompt design, SHA-256s of the checkpoint and of the backbone, and the content of
``--thresholds FILE`` when given. :mod:`deploy.runtime` runs the export without torch.

The graph always computes with the default settings (fp32, the torch Gaussian filter in
float32, the default attention arithmetic): ``--reference_arithmetic`` is a property of the
torch CPU kernels and has no meaning in a graph, so it is not exported. The exported results
equal the torch path's to ~1e-6 (tested to 1e-4).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, config_from_args
from AnomalyCLIP_lib.pretrained import PRETRAINED, download, sha256_of
from AnomalyCLIP_lib.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from pipeline import thresholds
from pipeline.atomic import atomic_write, atomic_write_text, locked_folder
from pipeline.cli import add_sigma_arg
from pipeline.cli import add_model_args, check_args, cli_parser, run_cli
from pipeline.loading import load_model_and_prompts

logger = logging.getLogger("anomalyclip.export")

FORMATS = ("onnx", "openvino")
MANIFEST_NAME = "anomalyclip.json"
GRAPH_STEM = "anomalyclip"
MANIFEST_VERSION = 1
MIN_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "maps")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("Export AnomalyCLIP scoring to ONNX or OpenVINO IR.")
    parser.add_argument("--checkpoint_path", required=True, help="prompt checkpoint (ours or the original's)")
    add_model_args(parser)
    add_sigma_arg(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="graph format")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--thresholds", default=None, metavar="FILE.json", help="thresholds to store in the manifest")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset} must be >= {MIN_OPSET}")
    check_args(args)
    return args


def read_thresholds(path: str | os.PathLike | None) -> Any:
    """The parsed content of a thresholds JSON file (``None`` without a path)."""
    if path is None:
        return None
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnomalyCLIPError(f"--thresholds {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnomalyCLIPError(f"--thresholds {path} is not a readable JSON file ({exc})".splitlines()[0]) from None
    thresholds.load_thresholds(path)  # the layout test_one_example.py reads (a results.json is not one)
    return document


def backbone_file(backbone: str) -> Path:
    """The file behind ``--backbone`` (a registry name resolves to its cached download)."""
    return download(backbone) if backbone in PRETRAINED else Path(backbone).expanduser()


def export_onnx(module: AnomalyCLIPInference, path: str | os.PathLike, opset: int = MIN_OPSET) -> None:
    """Trace ``module`` (export settings, see :meth:`AnomalyCLIPInference.export_copy`) to an ONNX file."""
    size = module.config.image_size
    example = torch.zeros(1, 3, size, size, device=module.device)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the static image size, exporter deprecations
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                              do_constant_folding=True)
        except (RuntimeError, ValueError) as error:
            if "opset" not in str(error).lower():
                raise
            raise AnomalyCLIPError(f"--opset {opset}: this torch cannot export it ({str(error).strip()[:120]}); "
                                   f"use a lower one (>= {MIN_OPSET})") from None


def _openvino():
    try:
        import openvino
    except ImportError:
        raise AnomalyCLIPError("--format openvino needs the openvino package: "
                               "pip install -r requirements-deploy.txt") from None
    return openvino


def onnx_to_openvino(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> None:
    """Convert an ONNX file to OpenVINO IR (``.xml`` + ``.bin`` beside it), weights kept in fp32."""
    ov = _openvino()
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def write_graph(module: AnomalyCLIPInference, out: Path, fmt: str, opset: int = MIN_OPSET) -> list[str]:
    """Write the graph of ``module`` into ``out``; returns its file names (the first is the one to load).

    Each file is written beside its target and renamed over it, so a crash leaves no half file.
    """
    if fmt == "onnx":
        name = f"{GRAPH_STEM}.onnx"
        atomic_write(out / name, lambda tmp: export_onnx(module, tmp, opset))
        return [name]
    _openvino()
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as scratch:
        scratch = Path(scratch)
        export_onnx(module, scratch / "graph.onnx", opset)
        onnx_to_openvino(scratch / "graph.onnx", scratch / f"{GRAPH_STEM}.xml")
        for suffix in (".bin", ".xml"):  # the .xml names the .bin: move it last
            os.replace(scratch / f"{GRAPH_STEM}{suffix}", out / f"{GRAPH_STEM}{suffix}")
    return [f"{GRAPH_STEM}.xml", f"{GRAPH_STEM}.bin"]


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def build_manifest(args: argparse.Namespace, module: AnomalyCLIPInference, files: list[str], thresholds: Any) -> dict:
    """What ``anomalyclip.json`` holds (see the module docstring)."""
    size = module.config.image_size
    backbone = backbone_file(args.backbone)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": args.format,
        "graph": files[0],
        "files": files,
        "opset": args.opset,
        "inputs": {INPUT_NAME: ["batch", 3, size, size]},
        "outputs": {OUTPUT_NAMES[0]: ["batch"], OUTPUT_NAMES[1]: ["batch", size, size]},
        "image_size": size,
        "preprocessing": {"resize": "bicubic", "resize_in_stored_mode": True, "then": "convert RGB, /255, normalise",
                          "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
        "scoring": module.config.to_dict(),
        "design": {"n_ctx": args.n_ctx, "depth": args.depth, "t_n_ctx": args.t_n_ctx},
        "backbone": {"name": str(args.backbone), "sha256": sha256_of(backbone)},
        "checkpoint": {"path": str(args.checkpoint_path), "sha256": sha256_of(args.checkpoint_path)},
        "versions": _versions(),
    }
    if thresholds is not None:
        manifest["thresholds"] = thresholds
    return manifest


def export(args: argparse.Namespace) -> Path:
    """Export as ``args`` asks; returns the manifest's path."""
    thresholds = read_thresholds(args.thresholds)
    with locked_folder(args.out, "--out") as out:  # check_args refused an --out that is a file or under one
        return _export(args, out, thresholds)


def _export(args: argparse.Namespace, out: Path, thresholds: dict[str, object] | None) -> Path:
    torch.manual_seed(args.seed)
    # The CLIs' one loading path: flag and backbone checks, --trust_backbone, safe checkpoint reads.
    model, prompt_learner, _ = load_model_and_prompts(args, torch.device("cpu"), args.checkpoint_path)
    module = AnomalyCLIPInference.from_model(model, prompt_learner, config_from_args(args)).export_copy()
    files = write_graph(module, out, args.format, args.opset)
    manifest = build_manifest(args, module, files, thresholds)
    return atomic_write_text(json.dumps(manifest, indent=2) + "\n", out / MANIFEST_NAME)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = export(args)
    print(f"wrote {manifest.parent / json.loads(manifest.read_text())['graph']} and {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
