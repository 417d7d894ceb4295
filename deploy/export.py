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
settings, the prompt design, SHA-256s of the checkpoint, of the backbone and of every graph
file (the runtime refuses a graph file that differs), and the content of ``--thresholds FILE``
when given. ``--memory FILE`` (a few-shot memory, ``test_one_example.py --save_memory``) puts
the memory's banks into the graph as constants; the manifest then records the memory (file,
class, references, settings) and thresholds are checked against it. :mod:`deploy.runtime` runs the export without torch.

The graph always computes with the default settings (fp32, the torch Gaussian filter in
float32, the default attention arithmetic): ``--reference_arithmetic`` is a property of the
torch CPU kernels and has no meaning in a graph, so it is not exported. The exported results
equal the torch path's to ~1e-6 (tested to 1e-4).

``--quantize int8`` (with ``--format onnx``) writes the graph quantised by ONNX Runtime's
dynamic quantisation (``quantize_dynamic``: int8 weights of the MatMul/Gemm operations, their
activations quantised to uint8 per tensor at run time); the manifest records it
(``quantization``) and a run of it computes in ``int8`` (ONNX Runtime or OpenVINO). Its scores
move away from fp32 (``benchmarks/bench_precision.py``; ``tools/check_precision.py`` on your data).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from AnomalyCLIP_lib.errors import AnomalyCLIPError, read_error_line
from AnomalyCLIP_lib.inference import AnomalyCLIPInference
from AnomalyCLIP_lib.memory import PatchMemory
from AnomalyCLIP_lib.memory_config import MemorySettings
from AnomalyCLIP_lib.pretrained import PRETRAINED, download, sha256_of
from AnomalyCLIP_lib.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from deploy.manifest import (GRAPH_STEM, INPUT_NAME, MANIFEST_NAME, OUTPUT_NAMES, QUANTIZATIONS, files_sha256,
                             manifest_document)
from pipeline import thresholds
from pipeline.atomic import atomic_write, atomic_write_text, locked_folder, naming_errors
from pipeline.cli import (add_checkpoint_arg, add_model_args, add_sigma_arg, check_model_spec, check_output_folder,
                          check_sigma, checked, cli_parser, model_spec, parse_flags)
from pipeline.config import ModelSpec, RunRecord, ScoringSpec, replaced as replace
from pipeline.loading import configure_threads, load_model_and_prompts, scoring_config
from pipeline.memory import MemorySpec, check_memory_spec, load_checked_memory, memory_provenance

logger = logging.getLogger("anomalyclip.export")

FORMATS = ("onnx", "openvino")
MIN_OPSET = 17
QUANTIZE_METHOD = "onnxruntime.quantization.quantize_dynamic, weight_type QInt8 (activations uint8, per tensor)"


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``export.py`` was asked to do (frozen; see :func:`parse_args`)."""

    checkpoint_path: str
    out: str
    model: ModelSpec
    sigma: float = 4.0
    format: str = "onnx"
    thresholds: str | None = None
    accept_thresholds: bool = False
    opset: int = MIN_OPSET
    quantize: str | None = None
    record: RunRecord = field(default_factory=lambda: RunRecord({}))
    memory: MemorySpec | None = None

    @property
    def scoring(self) -> ScoringSpec:
        """The scoring settings the graph is traced with (fp32, torch)."""
        return ScoringSpec(checkpoint_path=self.checkpoint_path, sigma=self.sigma)

    @property
    def precision(self) -> str:
        """The precision the exported graph runs in: ``int8`` when quantised, else ``fp32``."""
        return self.quantize or "fp32"


def build_parser():
    parser = cli_parser("Export AnomalyCLIP scoring to ONNX or OpenVINO IR.")
    add_checkpoint_arg(parser, required=True)
    add_model_args(parser)
    add_sigma_arg(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="graph format")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--thresholds", default=None, metavar="FILE.json", help="thresholds to store in the manifest")
    parser.add_argument(thresholds.ACCEPT_FLAG, action="store_true",
                        help="store --thresholds made with other settings than this export's (recorded in the "
                             "manifest)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="int8: quantise the ONNX graph (ONNX Runtime dynamic quantisation; with --format onnx); "
                             "runs are then --precision int8 (default: an fp32 graph)")
    parser.add_argument("--memory", default=None, metavar="FILE",
                        help="a few-shot memory (test_one_example.py --save_memory) to put into the graph")
    parser.add_argument("--memory_weight", type=float, default=None,
                        help="with --memory: the fusion weight (default: the memory's own)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> ExportConfig:
    """``export.py``'s command line, parsed once into a checked :class:`ExportConfig`."""
    parser = build_parser()
    flags = parse_flags(parser, argv)
    if flags.values["opset"] < MIN_OPSET:
        parser.error(f"--opset {flags.values['opset']} must be >= {MIN_OPSET}")
    return checked(lambda: _config(flags))


def _config(flags: RunRecord) -> ExportConfig:
    values = flags.values
    model = model_spec(flags)
    check_model_spec(model)
    check_sigma(float(values["sigma"]), model.image_size)
    check_output_folder(values["out"], "--out")
    if model.device not in (None, "cpu"):
        raise AnomalyCLIPError(f"--device {model.device}: export.py traces the graph on the CPU (the graph then runs "
                               "wherever its runtime does); drop --device")
    if values["accept_thresholds"] and not values["thresholds"]:
        raise AnomalyCLIPError(f"{thresholds.ACCEPT_FLAG} goes with --thresholds FILE; drop it")
    if values["quantize"] and values["format"] != "onnx":
        raise AnomalyCLIPError(f"--quantize {values['quantize']} writes an ONNX graph (ONNX Runtime's quantisation; "
                               "OpenVINO runs it too): use --format onnx")
    memory = _memory_spec(values["memory"], values["memory_weight"])
    return ExportConfig(checkpoint_path=values["checkpoint_path"], out=values["out"], model=model,
                        sigma=float(values["sigma"]), format=values["format"], thresholds=values["thresholds"],
                        accept_thresholds=values["accept_thresholds"], opset=values["opset"],
                        quantize=values["quantize"], record=flags, memory=memory)


def _memory_spec(memory_file: str | None, weight: float | None) -> MemorySpec | None:
    if memory_file is None:
        if weight is not None:
            raise AnomalyCLIPError("--memory_weight goes with --memory FILE; drop it")
        return None
    settings = MemorySettings() if weight is None else MemorySettings(weight=weight)
    spec = MemorySpec(memory_file=memory_file, settings=settings,
                      given=frozenset() if weight is None else frozenset({"weight"}))
    check_memory_spec(spec)
    return spec


def load_memory(config: ExportConfig) -> PatchMemory | None:
    """``--memory``'s memory, checked against the export's backbone and image size (``None`` without one)."""
    if config.memory is None:
        return None
    return load_checked_memory(config.memory, config.model.backbone, config.model.image_size)


def memory_manifest(config: ExportConfig, memory: PatchMemory | None) -> dict[str, Any] | None:
    """The manifest's ``memory``: the file, its class and references, settings and the provenance thresholds need."""
    if memory is None or config.memory is None:
        return None
    return {"file": str(config.memory.memory_file), "file_sha256": sha256_of(config.memory.memory_file),
            "class_name": memory.info.get("class_name"), "k": memory.reference_count,
            "rows_per_layer": memory.rows, **memory.settings.to_dict(),
            "references": memory.info.get("references"), "tiling": memory.info.get("tiling"),
            "provenance": memory_provenance(memory)}


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
        not_content = read_error_line(exc, path, "--thresholds") if isinstance(exc, OSError) else None
        raise AnomalyCLIPError(not_content or f"--thresholds {path} is not a readable JSON file ({exc})".splitlines()[0]
                               ) from None
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


def quantize_int8(onnx_path: str | os.PathLike, quantised_path: str | os.PathLike) -> None:
    """ONNX Runtime's dynamic int8 quantisation of an ONNX file (:data:`QUANTIZE_METHOD`)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise AnomalyCLIPError("--quantize int8 needs the onnxruntime package: "
                               "pip install -r requirements-deploy.txt") from None
    quantize_dynamic(str(onnx_path), str(quantised_path), weight_type=QuantType.QInt8)


def write_graph(module: AnomalyCLIPInference, out: Path, fmt: str, opset: int = MIN_OPSET,
                quantize: str | None = None) -> list[str]:
    """Write the graph of ``module`` into ``out``; returns its file names (the first is the one to load).

    Each file is written beside its target and renamed over it, so a crash leaves no half file.
    ``quantize="int8"`` (ONNX only) writes the graph quantised by :func:`quantize_int8`.
    """
    if fmt == "onnx" and quantize:
        name = f"{GRAPH_STEM}.onnx"
        with naming_errors(out / name), tempfile.TemporaryDirectory(prefix=".export-", dir=out) as scratch:
            export_onnx(module, Path(scratch) / "graph.onnx", opset)
            atomic_write(out / name, lambda tmp: quantize_int8(Path(scratch) / "graph.onnx", tmp))
        return [name]
    if fmt == "onnx":
        name = f"{GRAPH_STEM}.onnx"
        atomic_write(out / name, lambda tmp: export_onnx(module, tmp, opset))
        return [name]
    _openvino()
    # A full disk names the graph, not the scratch file it was met on.
    with naming_errors(out / f"{GRAPH_STEM}.xml"), tempfile.TemporaryDirectory(prefix=".export-", dir=out) as scratch:
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


def build_manifest(config: ExportConfig, module: AnomalyCLIPInference, files: list[str], thresholds: Any) -> dict:
    """What ``anomalyclip.json`` holds (see the module docstring); ``files`` are already written in ``config.out``."""
    model = config.model
    backbone = backbone_file(model.backbone)
    return manifest_document(
        fmt=config.format, files=files, opset=config.opset, image_size=module.config.image_size,
        mean=list(OPENAI_DATASET_MEAN), std=list(OPENAI_DATASET_STD), scoring=module.config.to_dict(),
        design={"n_ctx": model.n_ctx, "depth": model.depth, "t_n_ctx": model.t_n_ctx},
        backbone={"name": str(model.backbone), "sha256": sha256_of(backbone)},
        checkpoint={"path": str(config.checkpoint_path), "sha256": sha256_of(config.checkpoint_path)},
        versions=_versions(), thresholds=thresholds, files_sha256=files_sha256(config.out, files),
        quantization={"precision": config.quantize, "method": QUANTIZE_METHOD} if config.quantize else None)


def export(config: ExportConfig) -> Path:
    """Export as ``config`` asks; returns the manifest's path."""
    stored = read_thresholds(config.thresholds)
    memory = load_memory(config)
    accepted: list[str] = []
    if stored is not None:
        classes = stored["classes"]  # checked by read_thresholds (load_thresholds)
        current = thresholds.provenance_record(config.model, replace(config.scoring, precision=config.precision))
        if memory is not None:
            current = {**current, "memory": memory_provenance(memory)}
        # Tiling is the runtime's, not the graph's: the run that uses these thresholds checks it.
        untiled = {name: {**entry, "provenance": thresholds.without_tiling(entry.get("provenance"))}
                   for name, entry in classes.items()}
        accepted = thresholds.check_provenance(untiled, list(classes), current, f"--thresholds {config.thresholds}",
                                               config.accept_thresholds)
    with locked_folder(config.out, "--out") as out:  # parse_args refused an --out that is a file or under one
        return _export(config, out, stored, accepted, memory)


def _export(config: ExportConfig, out: Path, stored: dict[str, object] | None, accepted: list[str],
            memory: PatchMemory | None = None) -> Path:
    torch.manual_seed(config.model.seed)
    configure_threads(config.model.threads)
    # The CLIs' one loading path: flag and backbone checks, --trust_backbone, safe checkpoint reads.
    model, prompt_learner, _ = load_model_and_prompts(config.model, torch.device("cpu"), config.checkpoint_path)
    module = AnomalyCLIPInference.from_model(model, prompt_learner, scoring_config(config.model, config.scoring))
    module = module.with_memory(memory).export_copy()
    files = write_graph(module, out, config.format, config.opset, config.quantize)
    manifest = build_manifest(config, module, files, stored)
    if memory is not None:
        manifest["memory"] = memory_manifest(config, memory)
    if accepted:
        manifest["thresholds_accepted"] = accepted
    return atomic_write_text(json.dumps(manifest, indent=2) + "\n", out / MANIFEST_NAME)


def main(argv: Sequence[str] | None = None) -> int:
    manifest = export(parse_args(argv))
    print(f"wrote {manifest.parent / json.loads(manifest.read_text())['graph']} and {manifest}")
    return 0
