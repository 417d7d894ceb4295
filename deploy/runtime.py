"""Run an exported AnomalyCLIP graph without PyTorch: numpy, Pillow and ONNX Runtime or OpenVINO.

``export.py`` writes a folder with ``anomalyclip.json`` and the graph; :class:`ExportedModel`
loads it and scores images. The preprocessing is ``AnomalyCLIP_lib.transform``'s, redone in
numpy and Pillow: the file is read as :func:`transform.load_image` reads it (8-bit files
untouched, high-bit-depth single-channel files stretched to 8 bits), resized with PIL's bicubic
filter in its stored mode to S x S, converted to RGB, divided by 255 and normalised with the
manifest's mean and std, all in float32, so the input tensor is bit-identical to the torch
transform's.

Typical use::

    from deploy.runtime import ExportedModel
    model = ExportedModel("exported/visa", runtime="onnxruntime")   # or "openvino"
    for result in model.predict_files(["bottle.png"]):
        print(result.path, result.score, result.anomaly_map.shape)

This module imports only the standard library, numpy, Pillow, the chosen runtime and
:mod:`AnomalyCLIP_lib.errors` (the package's ``__init__`` imports nothing heavy).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.images import load_image
from AnomalyCLIP_lib.precision import RUN_PRECISIONS
from deploy.manifest import MANIFEST_NAME, RUNTIMES, read_manifest, run_precision, verify_files

logger = logging.getLogger(__name__)

OPENVINO_PRECISIONS = ("f32", "f16", "bf16")
# --precision -> OpenVINO's INFERENCE_PRECISION_HINT (an int8 graph's int8 operations run in int8 under f32)
OPENVINO_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
_HINT_PRECISIONS = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}
_HINT_CAPABILITIES = {"f16": "FP16", "bf16": "BF16"}  # OPTIMIZATION_CAPABILITIES a hint needs


# --- preprocessing (numpy / Pillow) ------------------------------------------------------------


def preprocess(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``transform.image_transform(size)`` in numpy: ``(3, S, S)`` float32.

    PIL bicubic resize to S x S in the stored mode (PIL itself uses nearest for 'P' and '1'),
    ``convert('RGB')``, ``/ 255`` and ``(x - mean) / std`` in float32 (torchvision's order of
    operations, so the values are bit-identical).
    """
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255)
    normalised = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


# --- the runtimes ---------------------------------------------------------------------------------


class _OnnxRuntimeBackend:
    """An ONNX Runtime CPU session on the exported ``.onnx`` file."""

    def __init__(self, graph: Path, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise AnomalyCLIPError("the onnxruntime runtime needs the onnxruntime package: "
                                   "pip install -r requirements-deploy.txt") from None
        if graph.suffix != ".onnx":
            raise AnomalyCLIPError(f"onnxruntime runs .onnx graphs, and {graph} is not one; "
                                   "export with --format onnx or use --runtime openvino")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.input_shape = tuple(self._session.get_inputs()[0].shape)  # ("batch", 3, S, S)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self._session.run(None, {self._input: images})
        return scores, maps


@functools.cache
def openvino_core() -> Any:
    """The one ``openvino.Core`` of this process, shared by every OpenVINO :class:`ExportedModel`.

    One Core, kept until the interpreter exits, rather than one per model: each Core makes its own
    CPU plugin, and the plugin replaces the calling thread's alternate signal stack when it is
    made and, when it is destroyed, puts its predecessor back only if its own is still the
    current one, then unmaps its own. Two Cores released first-in-first-out (two models dropped
    in the order they were loaded) therefore leave the thread's alternate stack on unmapped
    memory, and the next signal whose handler runs there (any Python ``signal`` handler, such as
    the SIGCHLD handler of torch's DataLoader or Ctrl-C's, and faulthandler's) kills the process
    with SIGSEGV -- or, once the addresses are mapped again, writes its frame over whatever lives
    there. With one Core the plugin is made once and released last.

    Raises:
        AnomalyCLIPError: The openvino package is not installed.
    """
    try:
        import openvino as ov
    except ImportError:
        raise AnomalyCLIPError("the openvino runtime needs the openvino package: "
                               "pip install -r requirements-deploy.txt") from None
    return ov.Core()


def openvino_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin offers here (``OPTIMIZATION_CAPABILITIES``: FP32, BF16, FP16, INT8, ...)."""
    return [str(name) for name in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def check_openvino_precision(precision: str) -> None:
    """Refuse an inference precision hint this CPU does not offer, naming what it offers.

    Without the check OpenVINO would fall back to f32 silently, and the run would record a
    precision it did not compute in.

    Raises:
        AnomalyCLIPError: One line naming the CPU's capabilities.
    """
    needed = _HINT_CAPABILITIES.get(precision)
    if needed is None:
        return
    offered = openvino_capabilities()
    if needed not in offered:
        usable = ["fp32", *(_HINT_PRECISIONS[hint] for hint, cap in _HINT_CAPABILITIES.items() if cap in offered)]
        raise AnomalyCLIPError(f"--precision {_HINT_PRECISIONS[precision]}: OpenVINO offers {', '.join(offered)} on "
                               f"this CPU, not {needed}; use --precision {' or '.join(usable)}")


class _OpenVINOBackend:
    """An OpenVINO CPU compiled model on the exported IR (``.xml``) or ``.onnx`` file."""

    def __init__(self, graph: Path, threads: int | None, precision: str = "f32") -> None:
        core = openvino_core()
        if precision not in OPENVINO_PRECISIONS:
            raise AnomalyCLIPError(f"unknown OpenVINO precision {precision!r}; choose one of {OPENVINO_PRECISIONS}")
        check_openvino_precision(precision)
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise pick bf16 on its own.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        self._request = self._compiled.create_infer_request()
        shape = self._compiled.inputs[0].get_partial_shape()
        self.input_shape = tuple(d.get_length() if d.is_static else "batch" for d in shape)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = self._request.infer([images])
        scores, maps = (results[output] for output in self._compiled.outputs)
        return np.array(scores, copy=True), np.array(maps, copy=True)


def _load_backend(runtime: str, graph: Path, threads: int | None,
                  openvino_precision: str) -> _OnnxRuntimeBackend | _OpenVINOBackend:
    """The runtime's session on ``graph``; a file it cannot load is one line naming it."""
    try:
        if runtime == "onnxruntime":
            return _OnnxRuntimeBackend(graph, threads)
        return _OpenVINOBackend(graph, threads, openvino_precision)
    except AnomalyCLIPError:
        raise
    except Exception as error:  # noqa: BLE001 - each runtime has its own exception types for a bad file
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(error).__name__  # OpenVINO's last line is the reason
        raise AnomalyCLIPError(f"{runtime} cannot load {graph} ({detail[:200]}): the file is damaged or was not "
                               "written by export.py; re-run export.py") from None


# --- the exported model ---------------------------------------------------------------------------


@dataclass
class ImagePrediction:
    """One image's results.

    Attributes:
        path: The image file (``None`` for an image passed in memory).
        score: Image anomaly score in [0, 1].
        anomaly_map: ``(S, S)`` float32 anomaly map (Gaussian filter applied).
    """

    path: Path | None
    score: float
    anomaly_map: np.ndarray


class ExportedModel:
    """An export folder loaded into ONNX Runtime or OpenVINO.

    Args:
        model_dir: Folder written by ``export.py``.
        runtime: ``"onnxruntime"`` or ``"openvino"`` (the latter also runs ``.onnx`` exports).
        threads: Intra-op threads (default: the runtime's).
        graph: Graph file to load instead of the manifest's (e.g. a quantised copy); the manifest's files
            are otherwise checked against their recorded SHA-256s once, here (:func:`manifest.verify_files`).
        openvino_precision: OpenVINO's inference precision hint (``f32``; ``f16``/``bf16``
            where the CPU has them); ``precision`` replaces it when given.
        precision: The run's ``--precision`` (``fp32``, ``fp16``/``bf16`` with OpenVINO, ``int8`` for an
            export quantised to int8); ``None``: the export's own (int8 for a quantised graph, else
            from ``openvino_precision``). Checked against the export and the CPU
            (:func:`manifest.run_precision`, :func:`check_openvino_precision`).

    Attributes:
        manifest: The parsed ``anomalyclip.json``.
        precision: The precision the graph runs in (``fp32``, ``fp16``, ``bf16``, ``int8``).
        image_size: S.
        thresholds: The manifest's ``thresholds`` (``None`` when the export had none).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        runtime: str = "onnxruntime",
        threads: int | None = None,
        graph: str | os.PathLike | None = None,
        openvino_precision: str = "f32",
        precision: str | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise AnomalyCLIPError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        self.runtime = runtime
        self.image_size = int(self.manifest["image_size"])
        self.mean = tuple(self.manifest["preprocessing"]["mean"])
        self.std = tuple(self.manifest["preprocessing"]["std"])
        self.thresholds = self.manifest.get("thresholds")
        if precision is not None and precision not in RUN_PRECISIONS:
            raise AnomalyCLIPError(f"unknown precision {precision!r}; choose one of {RUN_PRECISIONS}")
        if openvino_precision not in OPENVINO_PRECISIONS:
            raise AnomalyCLIPError(f"unknown OpenVINO precision {openvino_precision!r}; choose one of "
                                   f"{OPENVINO_PRECISIONS}")
        requested = precision if precision is not None else _HINT_PRECISIONS[openvino_precision]
        self.precision = run_precision(self.manifest, self.model_dir, runtime, requested, precision is not None)
        if precision is not None or self.precision == "int8":
            openvino_precision = OPENVINO_HINTS[self.precision]
        graph_path = Path(graph) if graph is not None else self.model_dir / self.manifest["graph"]
        if not graph_path.is_file():
            raise AnomalyCLIPError(f"graph file {graph_path} named by {self.model_dir / MANIFEST_NAME} is missing; "
                                   "re-run export.py")
        if graph is None:  # a graph given by hand (e.g. a quantised copy) is the caller's to vouch for
            verify_files(self.model_dir, self.manifest)
        self._backend = _load_backend(runtime, graph_path, threads, openvino_precision)
        if tuple(self._backend.input_shape[1:]) != (3, self.image_size, self.image_size):
            raise AnomalyCLIPError(f"{self.model_dir / MANIFEST_NAME} says image_size {self.image_size} but "
                                   f"{graph_path} takes {self._backend.input_shape[1:]}: they come from different "
                                   "exports; re-run export.py")
        logger.info("loaded %s with %s (%s)", graph_path, runtime, self.precision)

    @property
    def scoring(self) -> dict[str, Any]:
        """The scoring settings the graph was exported with."""
        return dict(self.manifest["scoring"])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One PIL image as the graph's input row ``(3, S, S)``."""
        return preprocess(image, self.image_size, self.mean, self.std)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``(B,)`` and maps ``(B, S, S)`` (float32) of preprocessed images ``(B, 3, S, S)``.

        Raises:
            AnomalyCLIPError: Wrong input shape.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise AnomalyCLIPError(f"images must be (B, 3, {size}, {size}) for this export; got {images.shape}")
        scores, maps = self._backend.run(images)
        return scores.astype(np.float32, copy=False), maps.astype(np.float32, copy=False)

    def predict_images(self, images: Sequence[Image.Image]) -> list[ImagePrediction]:
        """Score PIL images in one batch."""
        if not images:
            return []
        scores, maps = self.predict(np.stack([self.preprocess(image) for image in images]))
        return [ImagePrediction(None, float(score), anomaly_map) for score, anomaly_map in zip(scores, maps)]

    def predict_files(self, paths: Iterable[str | os.PathLike], batch_size: int = 8) -> Iterator[ImagePrediction]:
        """Score image files, ``batch_size`` per run, in order.

        Raises:
            AnomalyCLIPError: An unreadable file (named), or a non-positive batch size.
        """
        if batch_size < 1:
            raise AnomalyCLIPError(f"batch size must be positive; got {batch_size}")
        paths = [Path(p) for p in paths]
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            for path, result in zip(chunk, self.predict_images([load_image(p) for p in chunk])):
                result.path = path
                yield result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deploy.runtime --model DIR IMAGE...``: one ``path<TAB>score`` line per image.

    Raises:
        AnomalyCLIPError: A bad export folder or an unreadable image (the ``__main__`` block prints it
            as one line through :func:`pipeline.cli.run_cli`).
    """
    from pipeline.cli import cli_parser  # torch-free, like this module

    parser = cli_parser("Score images with an exported AnomalyCLIP graph (no torch).")
    parser.add_argument("--model", required=True, help="folder written by export.py")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--precision", choices=RUN_PRECISIONS, default=None,
                        help="fp16/bf16 with openvino; int8 for an export quantised to int8 (default: the export's)")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    model = ExportedModel(args.model, args.runtime, precision=args.precision)
    for result in model.predict_files(args.images, args.batch_size):
        print(f"{result.path}\t{result.score:.6f}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_cli

    raise SystemExit(run_cli(main))
