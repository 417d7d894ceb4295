"""Score single images (or every image under a folder): verdicts, defect masks, overlays, calibration.

Verdicts and masks for a folder, with thresholds from ``test.py`` or from a calibration::

    python test_one_example.py --image_path parts/ --checkpoint_path CKPT \
        --thresholds thresholds.json --class_name bottle          # or: --threshold 0.5 --pixel_threshold 1.2

Thresholds hold only for the maps they were chosen on: each class of a thresholds.json records the
checkpoint and backbone SHA-256, image size, sigma, features list, feature-map layer and precision it was
made with, and a run with other settings is refused (``--accept_thresholds`` uses them anyway and
records that it did in predictions.json).

Calibration from known-good images only (no ``meta.json``): every image is taken as normal, the
image threshold is the score that at most ``--target_fpr`` of them reach, the pixel threshold the
map value that at most that fraction of their pixels reach (``thresholds.normal_fpr``)::

    python test_one_example.py --image_path good_parts/ --checkpoint_path CKPT \
        --calibrate --target_fpr 0.01 --save_thresholds thresholds.json

Prints one tab-separated line per image: path, score (4 decimals), then the verdict
(``anomalous``/``normal``, when an image threshold is known), the defect area in pixels (when a
pixel threshold is known) and the overlay. A path holding a tab, newline or other control character
(or starting with ``"``) is printed as a JSON string, so every line stays one line of fields.
A value is flagged when ``value >= threshold``.

Outputs mirror the input tree (:mod:`pipeline.naming`): the image ``FOLDER/sub/a.png`` gives
``save_path/sub/a.png.overlay.png`` and ``save_path/sub/a.png.mask.png`` (0/255 at the image's own size), so
``a.png``, ``a.jpg`` and two ``000.png`` in different folders never overwrite each other.
``save_path/predictions.csv`` and ``predictions.json`` hold every image's row (``path, score, verdict,
defect_pixels, overlay, mask``; overlay and mask relative to ``save_path``). """

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

# Torch-free imports only: with --runtime the whole run needs numpy, Pillow and the runtime
# (torch is imported by pipeline.loading, for the torch path alone).
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.images import IMAGE_EXTENSIONS, unreadable_error, unreadable_headers
from AnomalyCLIP_lib.pretrained import sha256_of
from pipeline.atomic import atomic_write_text, locked_folder, staged_outputs
from pipeline import tiling
from pipeline.cli import (add_checkpoint_arg, add_loader_args, add_memory_args, add_model_args, add_save_path_arg,
                          add_scoring_args, add_sigma_arg, add_tiling_args, check_positive, cli_parser, memory_spec,
                          parse_config, scored_run_specs, tiling_spec)
from pipeline.config import LoaderSpec, ModelSpec, RunRecord, ScoringSpec, TilingSpec
from pipeline.engine import ExportedScorer, Scorer, TorchScorer
from pipeline.memory import MemorySpec, Reference, folder_references, load_checked_memory, \
    memory_info, memory_provenance, memory_record, save_memory_file
from pipeline.naming import MASK_SUFFIX, OVERLAY_SUFFIX, output_path
from pipeline.thresholds import (ACCEPT_FLAG, NormalTail, check_provenance, check_target_fpr, class_entry,
                                 load_thresholds, normal_fpr_threshold, provenance_record, save_thresholds,
                                 select_thresholds)
from pipeline.visualize import VIS_SCALES, defect_mask, save_mask, save_overlay

if TYPE_CHECKING:
    from AnomalyCLIP_lib.memory import PatchMemory

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("path", "score", "verdict", "defect_pixels", "overlay", "mask")
DEFAULT_TARGET_FPR = 0.01


@dataclass(frozen=True)
class PredictionConfig:
    """Everything ``test_one_example.py`` was asked to do (frozen; see :func:`parse_args`)."""

    image_path: str
    save_path: str
    model: ModelSpec
    loader: LoaderSpec
    scoring: ScoringSpec
    threshold: float | None = None
    pixel_threshold: float | None = None
    thresholds: str | None = None
    class_name: str | None = None
    vis_scale: str | None = None
    calibrate: bool = False
    target_fpr: float | None = None
    save_thresholds: str | None = None
    report: bool = False
    accept_thresholds: bool = False
    record: RunRecord = field(default_factory=lambda: RunRecord({}))
    memory: MemorySpec | None = None
    tiling: TilingSpec = TilingSpec()


@dataclass
class FewShot:
    """The run's few-shot memory, as far as it is known before torch loads.

    Attributes:
        references: The ``--reference_path`` images (the memory is built from them when torch loads).
        memory: The ``--memory`` file's memory (checked against the run), else ``None``.
        record: The memory's provenance (:func:`pipeline.memory.memory_record`).
    """

    references: list[Reference] | None
    memory: PatchMemory | None
    record: dict[str, object] | None


@dataclass(frozen=True)
class Decision:
    """The thresholds in force and where they came from (all None: scores only).

    Attributes:
        accepted: Provenance differences the user accepted with ``--accept_thresholds`` (recorded).
    """

    image_threshold: float | None = None
    pixel_threshold: float | None = None
    source: str | None = None
    class_name: str | None = None
    accepted: tuple[str, ...] = ()


@dataclass
class Prediction:
    """One image's result; ``verdict``, ``defect_pixels`` and ``mask`` are None where unknown."""

    path: Path
    score: float
    overlay: Path | None = None
    verdict: str | None = None
    defect_pixels: int | None = None
    mask: Path | None = None
    tiles: dict | None = None  # the tile grid (tiled runs; None: scored whole)


def build_parser():
    parser = cli_parser("Anomaly scores, verdicts, defect masks and heat maps for images.")
    parser.add_argument("--image_path", required=True, help="an image file, or a folder of images (read recursively)")
    add_checkpoint_arg(parser)
    add_save_path_arg(parser, "./results/single", "overlays, masks, predictions")
    add_model_args(parser)
    add_sigma_arg(parser)
    add_threshold_args(parser, "; with --calibrate the name to save under (default: the folder's name)")
    parser.add_argument("--calibrate", action="store_true",
                        help="take every image as normal and choose thresholds at --target_fpr "
                             "(needs --save_thresholds)")
    parser.add_argument("--target_fpr", type=float, default=None,
                        help=f"with --calibrate: fraction of good images / pixels allowed to be flagged "
                             f"(default {DEFAULT_TARGET_FPR})")
    parser.add_argument("--save_thresholds", default=None, help="with --calibrate: the thresholds.json to write")
    add_loader_args(parser, "images (with --tile_size: views) per forward pass", workers=False)
    add_tiling_args(parser)
    parser.add_argument("--report", action="store_true",
                        help="write save_path/report.html: every image's overlay, highest score first, with verdicts")
    add_scoring_args(parser, "run an exported graph (export.py) with ONNX Runtime or OpenVINO, without torch",
                     "with --runtime: the folder export.py wrote (its design replaces the model flags)")
    add_memory_args(parser, dataset=False)
    return parser


def add_threshold_args(parser, class_name_help: str = "") -> None:
    """The thresholds flags (test_one_example.py, serve.py): ``--threshold``, ``--pixel_threshold``,
    ``--thresholds``, ``--accept_thresholds``, ``--class_name``, ``--vis_scale``."""
    parser.add_argument("--threshold", type=float, default=None, help="image threshold: 'anomalous' when score >= it")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="pixel threshold (with --threshold): the defect mask is map >= it")
    parser.add_argument("--thresholds", default=None,
                        help="thresholds.json (from test.py or --calibrate) giving both thresholds")
    parser.add_argument(ACCEPT_FLAG, action="store_true",
                        help="use --thresholds (or an export's) made with other settings than this run's "
                             "(checkpoint, backbone, image size, sigma, layers, precision, memory); recorded in "
                             "predictions.json")
    parser.add_argument("--class_name", default=None,
                        help="class of --thresholds to use (needed when it holds several)" + class_name_help)
    parser.add_argument("--vis_scale", choices=VIS_SCALES, default=None,
                        help="overlay colours: 'fixed' = map / (2 x pixel threshold), clipped (default when a pixel "
                             "threshold is known); 'per_image' = the original's per-image min-max (default otherwise)")


def parse_args(argv: Sequence[str] | None = None) -> PredictionConfig:
    """The command line, parsed once into a :class:`PredictionConfig` (shared flag checks included).

    With ``--runtime``, the export's design replaces the model flags (read from its manifest only).
    The checks that need the thresholds or the export are :func:`validate`'s.
    """
    return parse_config(build_parser(), argv, _config)


def _config(flags: RunRecord) -> PredictionConfig:
    values = flags.values
    check_positive(batch_size=values["batch_size"])
    model, scoring, flags = scored_run_specs(flags)
    return PredictionConfig(
        image_path=values["image_path"], save_path=values["save_path"], model=model,
        loader=LoaderSpec(batch_size=values["batch_size"]), scoring=scoring, threshold=values["threshold"],
        pixel_threshold=values["pixel_threshold"], thresholds=values["thresholds"], class_name=values["class_name"],
        vis_scale=values["vis_scale"], calibrate=values["calibrate"], target_fpr=values["target_fpr"],
        save_thresholds=values["save_thresholds"], report=values["report"],
        accept_thresholds=values["accept_thresholds"], record=flags, memory=checked_memory_spec(flags, scoring),
        tiling=tiling_spec(flags))


def checked_memory_spec(flags: RunRecord, scoring: ScoringSpec) -> MemorySpec | None:
    """The few-shot memory flags (test_one_example.py, serve.py), checked; ``None`` for a zero-shot run."""
    spec = memory_spec(flags)
    if not spec.active:
        return None
    if scoring.exported:
        raise AnomalyCLIPError("with --runtime the memory is part of the export: run export.py --memory FILE (a "
                               "memory written by --save_memory) and drop --reference_path/--memory here")
    return spec


# --- validation ---------------------------------------------------------------------------------


def _check_finite(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise AnomalyCLIPError(f"{flag} {value} is not a finite number")


def _check_calibration_flags(config: PredictionConfig) -> None:
    if config.save_thresholds is None:
        raise AnomalyCLIPError("--calibrate needs --save_thresholds FILE: where to write the thresholds")
    for flag in ("threshold", "pixel_threshold", "thresholds", "vis_scale"):
        if getattr(config, flag) is not None:
            raise AnomalyCLIPError(f"--calibrate chooses the thresholds; drop --{flag}")
    if config.accept_thresholds:
        raise AnomalyCLIPError(f"--calibrate chooses the thresholds; drop {ACCEPT_FLAG}")
    if Path(config.save_thresholds).is_dir():
        raise AnomalyCLIPError(f"--save_thresholds {config.save_thresholds} is a folder; give a file name")
    existing_thresholds(config.save_thresholds)  # a file there must be a thresholds.json: its classes are kept
    check_target_fpr(DEFAULT_TARGET_FPR if config.target_fpr is None else config.target_fpr)


def _chosen_class(classes: dict[str, dict], requested: str | None, source: str) -> str:
    """``--class_name``, or the only class of ``classes`` (:func:`select_thresholds` refuses anything else)."""
    select_thresholds(classes, requested, source)
    return requested if requested is not None else next(iter(classes))


def _checked_values(classes: dict[str, dict], class_name: str, source: str) -> tuple[float, float | None]:
    """The class's thresholds as floats. Their values were checked where they were read
    (``load_thresholds``, the manifest's ``check_manifest_thresholds``); a class without an image
    threshold cannot give verdicts."""
    image_threshold, pixel_threshold = (classes[class_name].get(key) for key in ("image_threshold", "pixel_threshold"))
    if image_threshold is None:
        raise AnomalyCLIPError(f"{source}: class {class_name!r} has no image threshold; calibrate it again")
    return float(image_threshold), None if pixel_threshold is None else float(pixel_threshold)


def _decision_from_file(config: PredictionConfig, provenance: dict[str, object]) -> Decision:
    if config.threshold is not None or config.pixel_threshold is not None:
        raise AnomalyCLIPError("--thresholds gives both thresholds; drop --threshold/--pixel_threshold or --thresholds")
    classes = load_thresholds(config.thresholds)
    return decision_from_classes(classes, config.class_name, str(config.thresholds),
                                 f"--thresholds {config.thresholds}", provenance, config.accept_thresholds)


def decision_from_classes(classes: dict[str, dict], class_name: str | None, source: str, named: str,
                          provenance: dict[str, object], accept: bool) -> Decision:
    """The thresholds of ``class_name`` (or the only class) of checked ``classes``, their provenance checked.

    Args:
        classes: A thresholds.json's classes, checked (:func:`thresholds.thresholds_classes`).
        class_name: ``--class_name`` (``None``: the only class).
        source: Where they come from (the decision's ``source``; messages about the values name it).
        named: How the provenance message names them (``--thresholds FILE``).
        provenance: This run's :func:`run_provenance`.
        accept: ``--accept_thresholds``: provenance differences are recorded, not refused.
    """
    class_name = _chosen_class(classes, class_name, source)
    image_threshold, pixel_threshold = _checked_values(classes, class_name, source)
    accepted = check_provenance(classes, [class_name], provenance, named, accept)
    return Decision(image_threshold, pixel_threshold, source, class_name, tuple(accepted))


def _decision_from_flags(config: PredictionConfig) -> Decision:
    if config.class_name is not None:
        raise AnomalyCLIPError("--class_name picks a class of --thresholds FILE (or names a --calibrate result)")
    if config.pixel_threshold is not None and config.threshold is None:
        raise AnomalyCLIPError("--pixel_threshold needs an image threshold too: add --threshold X")
    if config.threshold is None:
        return Decision()
    return Decision(config.threshold, config.pixel_threshold, "--threshold")


def _decision_from_export(config: PredictionConfig, scorer: ExportedScorer | None,
                          provenance: dict[str, object]) -> Decision | None:
    """The thresholds export.py stored (a thresholds.json's content), when no threshold flag is given."""
    stored = scorer.exported.thresholds if scorer is not None else None
    if not isinstance(stored, dict) or not isinstance(stored.get("classes"), dict) or not stored["classes"]:
        return None
    source = f"{config.scoring.model_dir}/anomalyclip.json"
    classes = stored["classes"]
    class_name = _chosen_class(classes, config.class_name, source)
    if classes[class_name].get("image_threshold") is None:
        return None
    image_threshold, pixel_threshold = _checked_values(classes, class_name, source)
    # What was accepted at export time is recorded there and not asked again; a difference the export did not
    # have (another --precision than the export's) is.
    at_export = scorer.exported.manifest.get("thresholds_accepted") or []
    accepted = check_provenance(classes, [class_name], provenance, f"the thresholds in {source}", True)
    if not set(accepted) <= set(at_export):
        check_provenance(classes, [class_name], provenance, f"the thresholds in {source}", config.accept_thresholds)
    return Decision(image_threshold, pixel_threshold, source, class_name, tuple(accepted))


def _check_inputs_outside_outputs(config: PredictionConfig) -> None:
    """Outputs are never read back as inputs, so inputs inside the output folder would all be skipped."""
    images, outputs = Path(config.image_path).resolve(), Path(config.save_path).resolve()
    if images == outputs or outputs in images.parents:
        raise AnomalyCLIPError(f"--image_path {config.image_path} lies inside --save_path {config.save_path}, whose "
                               "files are outputs and never read as images; choose a --save_path outside it")


def open_export(config: PredictionConfig) -> ExportedScorer | None:
    """With ``--runtime``, the exported graph of ``--model`` loaded (``None`` on the torch path)."""
    if not config.scoring.exported:
        return None
    exported = ExportedScorer.load(config.scoring.model_dir, config.scoring.runtime, config.model.threads,
                                   config.scoring.precision)
    check_export_memory_tiling(exported, config.tiling, config.scoring.model_dir)
    return exported


def check_export_memory_tiling(exported: ExportedScorer, spec: TilingSpec, model_dir: str | None) -> None:
    """An export's few-shot memory holds patches at the scale of its references' tiling: the run must tile alike."""
    memory = exported.exported.manifest.get("memory")
    if isinstance(memory, dict):
        tiling.check_memory_tiling(memory.get("tiling"), spec, f"the memory exported in {model_dir}")


def run_provenance(config: PredictionConfig, exported: ExportedScorer | None,
                   few_shot: FewShot | None = None) -> dict[str, object]:
    """This run's :func:`thresholds.provenance_record` (an export's recorded hashes, else the files'),
    with its few-shot memory where it has one (an export's, or ``few_shot``'s)."""
    manifest = exported.exported.manifest if exported is not None else None
    provenance = provenance_record(config.model, config.scoring, manifest, config.tiling)
    record = memory_in_force(exported, few_shot)
    return provenance if record is None else {**provenance, "memory": record}


def memory_in_force(exported: ExportedScorer | None, few_shot: FewShot | None) -> dict[str, object] | None:
    """The provenance record of the memory the run scores with: an export's, or ``few_shot``'s (``None``: zero-shot)."""
    memory = exported.exported.manifest.get("memory") if exported is not None else None
    if isinstance(memory, dict):
        return memory.get("provenance")
    return few_shot.record if few_shot is not None else None


def few_shot(config: PredictionConfig) -> FewShot | None:
    """The references (``--reference_path``) or the checked memory (``--memory``) of a torch run, else ``None``."""
    spec = config.memory
    if spec is None:
        return None
    if spec.reference_path:
        references = folder_references(spec.reference_path)
        if not references:
            raise AnomalyCLIPError(f"--reference_path {spec.reference_path} holds no image "
                                   f"({', '.join(IMAGE_EXTENSIONS)})")
        return FewShot(references, None, memory_record([ref.to_dict() for ref in references], spec.settings))
    memory = load_checked_memory(spec, config.model.backbone, config.model.image_size)
    tiling.check_memory_tiling(memory.info.get("tiling"), config.tiling, f"--memory {spec.memory_file}")
    return FewShot(None, memory, memory_provenance(memory))


def validate(config: PredictionConfig, exported: ExportedScorer | None = None,
             memory: FewShot | None = None) -> Decision:
    """Check what the flags alone cannot show, before any image is scored; returns the thresholds in force.

    Args:
        memory: The run's few-shot memory (:func:`few_shot`), which the thresholds must have been made with.

    Raises one-line errors.
    """
    _check_inputs_outside_outputs(config)
    _check_finite(config.threshold, "--threshold")
    _check_finite(config.pixel_threshold, "--pixel_threshold")
    if config.calibrate:
        _check_calibration_flags(config)
        return Decision()
    for flag in ("target_fpr", "save_thresholds"):
        if getattr(config, flag) is not None:
            raise AnomalyCLIPError(f"--{flag} is used only with --calibrate")
    return thresholds_in_force(config, exported, memory)


def thresholds_in_force(config: PredictionConfig, exported: ExportedScorer | None = None,
                        memory: FewShot | None = None) -> Decision:
    """The thresholds the flags (``--thresholds``, ``--threshold``, an export's) give, checked against the run's
    settings and few-shot ``memory`` (:func:`few_shot`); one-line errors."""
    if config.thresholds is not None:
        decision = _decision_from_file(config, run_provenance(config, exported, memory))
    elif config.threshold is None and config.pixel_threshold is None and exported is not None and \
            (stored := _decision_from_export(config, exported, run_provenance(config, exported, memory))):
        decision = stored
    else:
        decision = _decision_from_flags(config)
    if config.accept_thresholds and not decision.accepted and decision.source in (None, "--threshold"):
        raise AnomalyCLIPError(f"{ACCEPT_FLAG} goes with --thresholds FILE (or an export's thresholds); drop it")
    check_colour_scale(config, decision)
    for difference in decision.accepted:
        logger.warning("%s: using thresholds made for other settings (%s)", ACCEPT_FLAG, difference)
    return decision


def check_colour_scale(config: PredictionConfig, decision: Decision) -> None:
    """``--vis_scale`` can draw with the thresholds of ``decision`` (the fixed scale needs a positive pixel one)."""
    if config.vis_scale == "fixed" and decision.pixel_threshold is None:
        raise AnomalyCLIPError("--vis_scale fixed needs a pixel threshold (--pixel_threshold or --thresholds)")
    if decision.pixel_threshold is not None and decision.pixel_threshold <= 0 and config.vis_scale != "per_image":
        raise AnomalyCLIPError(f"pixel threshold {decision.pixel_threshold} is not positive: the fixed colour scale "
                               "cannot use it; add --vis_scale per_image")


# --- inputs and output names --------------------------------------------------------------------


def _is_excluded(file: Path, root: Path, exclude: Path | None) -> bool:
    """Hidden files or folders under ``root``, and anything under ``exclude`` (our own outputs)."""
    if any(part.startswith(".") for part in file.relative_to(root).parts):
        return True
    return exclude is not None and file.resolve().is_relative_to(exclude)


def image_files(path: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """The image itself, or the images under a folder, recursively, sorted by relative path.

    Symbolic links to folders are followed, each real folder read once: a link to a folder already
    read (an ancestor: a loop; or a sibling) adds nothing, and the files keep the path of the
    first folder read, real folders before links. Non-images, hidden files and folders, and files
    under ``exclude`` (the save path, when it lies inside the folder) are skipped.

    Raises:
        AnomalyCLIPError: No image is found; a sub-folder cannot be read, or a link with an image's name
            points to nothing (the run would judge a part of the folder silently); overlays or masks of an
            earlier run lie in the folder (they would be judged as parts); files with an image's name are not
            images (all are named).
    """
    path = Path(path)
    if path.is_file():
        _check_headers([path])
        return [path]
    if not path.is_dir():
        raise AnomalyCLIPError(f"--image_path {path} does not exist")
    skip = Path(exclude).resolve() if exclude is not None else None
    files, dangling = _walk_images(path, skip)
    files.sort(key=lambda p: p.relative_to(path).parts)
    if dangling:
        raise AnomalyCLIPError(f"{len(dangling)} link(s) under {path} with an image's name point to nothing: "
                               f"{_few(dangling)}; fix or remove them, so that no image is left out")
    outputs = [file for file in files if _is_our_output(file.name)]
    if outputs:
        raise AnomalyCLIPError(f"{len(outputs)} file(s) under {path} are overlays or masks an earlier run wrote "
                               f"({_few(outputs)}), which would be judged as parts; move them out of the folder, or "
                               "pass the folder of the parts alone")
    if not files:
        raise AnomalyCLIPError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass an image or a "
                               "folder of them")
    _check_headers(files)
    return files


def _walk_images(root: Path, exclude: Path | None) -> tuple[list[Path], list[Path]]:
    """``(image files, dangling links with an image's name)`` under ``root``; see :func:`image_files`.

    Real sub-folders are read before linked ones, so a folder reachable both ways keeps its real
    path; ``seen`` holds the resolved folders read, which ends any loop of links.
    """
    files: list[Path] = []
    dangling: list[Path] = []
    seen: set[Path] = set()
    links: list[Path] = []
    pending = [root]
    while pending or links:
        folder = pending.pop() if pending else links.pop(0)
        real = folder.resolve()
        if real in seen or (exclude is not None and real.is_relative_to(exclude)):
            continue
        seen.add(real)
        try:
            entries = sorted(folder.iterdir())
        except OSError as error:
            raise AnomalyCLIPError(f"cannot read the folder {folder} under --image_path ({error.strerror}): its "
                                   "images would be left out; make it readable, or pass a folder without it"
                                   ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                (links if entry.is_symlink() else pending).append(entry)
            elif entry.suffix.lower() in IMAGE_EXTENSIONS:
                if entry.is_file():
                    if not _is_excluded(entry, root, exclude):
                        files.append(entry)
                elif entry.is_symlink():
                    dangling.append(entry)
    return files, dangling


def _is_our_output(name: str) -> bool:
    """Whether a file name is one test_one_example.py writes (``a.png.overlay.png``, ``a.png.mask.png``)."""
    lower = name.lower()
    return any(lower.endswith(f"{extension}{suffix}") for extension in IMAGE_EXTENSIONS
               for suffix in (OVERLAY_SUFFIX, MASK_SUFFIX))


def _few(paths: Sequence[Path], shown: int = 5) -> str:
    listed = ", ".join(str(p) for p in paths[:shown])
    return listed + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _check_headers(files: Sequence[Path], shown: int = 5) -> None:
    """Refuse, before the model loads, every file that is not an image at all, listing them at once."""
    bad = unreadable_headers(tqdm(files, desc="checking images", unit="image", disable=None, leave=False))
    if bad and len(files) == 1:
        raise unreadable_error("image file", *bad[0])
    if bad:
        listed = "; ".join(f"{file} ({reason})" for file, reason in bad[:shown])
        more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
        raise AnomalyCLIPError(f"{len(bad)} of {len(files)} image file(s) cannot be read: {listed}{more}; "
                               "they are corrupt or not images: replace or remove them")


def relative_name(file: Path, image_path: str | Path) -> Path:
    """The image's path relative to ``--image_path`` (its own name for a single file)."""
    image_path = Path(image_path)
    return Path(file.name) if image_path.is_file() else file.relative_to(image_path)


# --- scoring ------------------------------------------------------------------------------------


def open_torch_scorer(config: PredictionConfig, memory: FewShot | None = None) -> Scorer:
    """The torch inference module of the run (the reference path; imports torch), with its few-shot memory.

    A memory from ``--reference_path`` is built here (and written to ``--save_memory``).
    """
    from pipeline.loading import configure_threads, open_scorer, resolve_device
    from utils import setup_seed

    setup_seed(config.model.seed)
    configure_threads(config.model.threads)
    scorer = open_scorer(config.model, config.scoring, resolve_device(config.model.device))
    if memory is None:
        return scorer
    assert isinstance(scorer, TorchScorer) and config.memory is not None
    patch_memory = memory.memory if memory.memory is not None else _built_memory(config, scorer, memory)
    return TorchScorer(scorer.inference.with_memory(patch_memory), scorer.device)


def _built_memory(config: PredictionConfig, scorer: TorchScorer, memory: FewShot) -> PatchMemory:
    from AnomalyCLIP_lib.pretrained import backbone_sha256

    spec = config.memory
    assert spec is not None and memory.references is not None
    name = Path(spec.reference_path).resolve().name or "default"
    checkpoint = sha256_of(config.scoring.checkpoint_path) if config.scoring.checkpoint_path else None
    info = memory_info(name, config.model.backbone, backbone_sha256(config.model.backbone), config.model.image_size,
                       scorer.inference.config.dpam_layer, checkpoint)
    built = tiling.class_memory(scorer.inference, memory.references, spec.settings, config.loader.batch_size, info,
                                config.tiling)
    if spec.save_memory:
        written = save_memory_file(built, spec.save_memory)
        logger.info("memory of %d reference(s) -> %s", len(memory.references), written)
    return built


def scored_files(config: PredictionConfig, files: Sequence[Path], scorer: Scorer | None,
                 memory: FewShot | None = None) -> Iterator[tuple[Path, tuple[int, int], float, np.ndarray]]:
    """``(file, (width, height), score, map)`` per image, in order, through the engine's one loop.

    Args:
        scorer: The exported graph, or ``None`` for the torch path (loaded here, after the files are listed).
        memory: The torch path's few-shot memory (:func:`few_shot`).
    """
    scorer = scorer if scorer is not None else open_torch_scorer(config, memory)
    for scored in tiling.scored_files(scorer, files, config.loader.batch_size, config.tiling):
        for one in scored:
            yield files[one.index], one.size, one.score, one.anomaly_map


def vis_scale(config: PredictionConfig, decision: Decision) -> str:
    """``--vis_scale``, else ``fixed`` where a pixel threshold is known and ``per_image`` otherwise."""
    return config.vis_scale or ("per_image" if decision.pixel_threshold is None else "fixed")


def judge(score: float, anomaly_map: np.ndarray, size: tuple[int, int], decision: Decision
          ) -> tuple[str | None, np.ndarray | None]:
    """``(verdict, defect mask)`` of one image under ``decision``; each ``None`` without its threshold.

    The verdict is ``anomalous`` when ``score >= image threshold``; the mask (boolean, the image's own
    ``size = (width, height)``) is the map resized bilinearly, ``>= pixel threshold``.
    """
    verdict = None
    if decision.image_threshold is not None:
        verdict = "anomalous" if score >= decision.image_threshold else "normal"
    mask = None if decision.pixel_threshold is None else defect_mask(anomaly_map, decision.pixel_threshold, size)
    return verdict, mask


def decide(file: Path, size: tuple[int, int], score: float, anomaly_map: np.ndarray, decision: Decision,
           config: PredictionConfig, staging: Path | None = None) -> Prediction:
    """Verdict, mask and overlay of one image; writes the mask and overlay files.

    Args:
        staging: Where the files are written, to be moved into ``--save_path`` at the end (the
            prediction names them at their final place); ``None``: into ``--save_path`` itself.
    """
    save_path = Path(config.save_path)
    out = save_path if staging is None else staging
    relative = relative_name(file, config.image_path)
    prediction = Prediction(file, score)
    grid = tiling.tile_grid(size, config.tiling)
    prediction.tiles = None if grid is None else grid.record()
    prediction.verdict, mask = judge(score, anomaly_map, size, decision)
    if mask is not None:
        prediction.defect_pixels = int(mask.sum())
        written = save_mask(mask, output_path(out, relative, MASK_SUFFIX))
        prediction.mask = save_path / written.relative_to(out)
    written = save_overlay(file, anomaly_map, output_path(out, relative, OVERLAY_SUFFIX),
                           scale=vis_scale(config, decision), pixel_threshold=decision.pixel_threshold, mask=mask)
    prediction.overlay = save_path / Path(written).relative_to(out)
    return prediction


def print_line(prediction: Prediction) -> None:
    """``path  score  [verdict]  [defect pixels]  overlay``, tab-separated (paths as :func:`tsv_field`)."""
    fields = [tsv_field(str(prediction.path)), f"{prediction.score:.4f}"]
    fields += [str(v) for v in (prediction.verdict, prediction.defect_pixels) if v is not None]
    tqdm.write("\t".join([*fields, tsv_field(str(prediction.overlay))]))


def tsv_field(text: str) -> str:
    """``text`` as is, or as a JSON string (double-quoted, ``\\t``/``\\n`` escaped) when it holds a control
    character (a tab or newline in a file name would break the line) or starts with a double quote."""
    if text.startswith('"') or any(ord(char) < 32 or char == "\x7f" for char in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def score_images(config: PredictionConfig, decision: Decision | None = None,
                 exported: ExportedScorer | None = None, staging: Path | None = None,
                 memory: FewShot | None = None) -> list[Prediction]:
    """Score every image, write its overlay (and mask), print its line; returns the predictions in order.

    ``staging``: see :func:`decide`; ``memory``: see :func:`scored_files`.
    """
    if decision is None:
        exported = exported if exported is not None else open_export(config)
        memory = memory if memory is not None else few_shot(config)
        decision = validate(config, exported, memory)
    files = image_files(config.image_path, exclude=config.save_path)
    predictions = []
    for file, size, score, anomaly_map in scored_files(config, files, exported, memory):
        predictions.append(decide(file, size, score, anomaly_map, decision, config, staging))
        print_line(predictions[-1])
    return predictions


# --- predictions files --------------------------------------------------------------------------


def prediction_row(prediction: Prediction, save_path: Path) -> dict[str, object]:
    """One row: output files relative to ``save_path``; None where unknown."""
    def relative(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(save_path).as_posix()

    score = prediction.score if math.isfinite(prediction.score) else None
    return {"path": str(prediction.path), "score": score, "verdict": prediction.verdict,
            "defect_pixels": prediction.defect_pixels, "overlay": relative(prediction.overlay),
            "mask": relative(prediction.mask)}


def _csv_cell(value: object) -> object:
    """Empty for None; floats in full (round-trip) precision."""
    return "" if value is None else repr(value) if isinstance(value, float) else value


def write_predictions(predictions: Sequence[Prediction], decision: Decision, config: PredictionConfig,
                      staging: Path | None = None, memory: dict[str, object] | None = None) -> tuple[Path, Path]:
    """Write ``predictions.csv`` and ``predictions.json`` into ``--save_path`` (or ``staging``) atomically.

    ``memory``: the few-shot memory the scores were made with (its provenance record), recorded as ``memory``.

    Returns:
        Their paths.
    """
    save_path = Path(config.save_path)
    out = save_path if staging is None else staging
    rows = [prediction_row(p, save_path) for p in predictions]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{key: _csv_cell(value) for key, value in row.items()} for row in rows])
    if config.tiling.enabled:  # each image's tile grid (null: scored whole), in the JSON rows only
        rows = [{**row, "tiles": p.tiles} for row, p in zip(rows, predictions)]
    in_force = {"image_threshold": decision.image_threshold, "pixel_threshold": decision.pixel_threshold,
                "source": decision.source, "class_name": decision.class_name, "rule": "value >= threshold"}
    if decision.accepted:
        in_force["accepted_other_settings"] = list(decision.accepted)
    document = {"thresholds": in_force, "image_path": str(config.image_path),
                "checkpoint_path": str(config.scoring.checkpoint_path), "image_size": config.model.image_size,
                "runtime": config.scoring.runtime, "precision": config.scoring.precision,
                "vis_scale": vis_scale(config, decision), "memory": memory, "predictions": rows}
    if config.tiling.enabled:
        document["tiling"] = tiling.tiling_record(config.tiling)
    csv_path = atomic_write_text(buffer.getvalue(), out / "predictions.csv")
    json_text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    json_path = atomic_write_text(json_text, out / "predictions.json")
    return csv_path, json_path


# --- calibration --------------------------------------------------------------------------------


def calibration_class_name(config: PredictionConfig) -> str:
    """``--class_name``, else the folder's name (the file's folder for a single image)."""
    if config.class_name:
        return config.class_name
    path = Path(config.image_path).resolve()
    return (path if path.is_dir() else path.parent).name or "default"


def existing_thresholds(path: str | Path) -> dict[str, dict]:
    """The classes of the thresholds.json at ``path`` (none when there is no file); refuses any other file."""
    if not Path(path).exists():
        return {}
    try:
        return load_thresholds(path)
    except AnomalyCLIPError as error:
        raise AnomalyCLIPError(f"--save_thresholds {path} exists and is not a thresholds.json ({error}); give a new "
                               "file name, so that the file is not replaced") from None


def calibrate(config: PredictionConfig, exported: ExportedScorer | None = None,
              memory: FewShot | None = None) -> dict[str, object]:
    """Take every image as normal; write and return the ``normal_fpr`` class entry (with its provenance).

    With a few-shot memory, an image that is one of the memory's references is scored leave-one-out
    (against the memory of the others): a reference scored against itself would look better than
    any new good part.
    """
    target_fpr = DEFAULT_TARGET_FPR if config.target_fpr is None else config.target_fpr
    files = image_files(config.image_path, exclude=config.save_path)
    pixel_tail = NormalTail(tiling.total_map_pixels(files, config.tiling, config.model.image_size), target_fpr)
    pending: list[np.ndarray] = []
    scores = []
    for file, _, score, anomaly_map in _calibration_scores(config, files, exported, memory):
        scores.append(score)
        pending.append(anomaly_map)
        if sum(m.size for m in pending) >= pixel_tail.allowed + 1:  # amortised: each value partitioned O(1) times
            pixel_tail.update(np.concatenate([m.ravel() for m in pending]))  # maps of any size (tiled: native)
            pending.clear()
        tqdm.write(f"{file}\t{score:.4f}")
    if pending:
        pixel_tail.update(np.concatenate([m.ravel() for m in pending]))
    image_threshold = normal_fpr_threshold(np.asarray(scores, dtype=np.float32), target_fpr)
    name = calibration_class_name(config)
    entry = class_entry(image_threshold, pixel_tail.threshold(), "normal_fpr", target_fpr=target_fpr,
                        n_images=len(files), n_pixels=pixel_tail.total, image_size=config.model.image_size,
                        sigma=config.scoring.sigma, checkpoint_path=str(config.scoring.checkpoint_path),
                        provenance=run_provenance(config, exported, memory))
    classes = existing_thresholds(config.save_thresholds)
    if classes:
        logger.info("%s class %s in %s; its other classes (%s) are kept", "replacing" if name in classes else "adding",
                    name, config.save_thresholds, ", ".join(sorted(set(classes) - {name})) or "none")
    path = save_thresholds(config.save_thresholds, {**classes, name: entry}, source="test_one_example.py --calibrate",
                           image_path=str(config.image_path))
    print(f"class {name}: image_threshold {entry['image_threshold']!r}, pixel_threshold "
          f"{entry['pixel_threshold']!r} (normal_fpr, target_fpr {target_fpr}, {len(files)} good images) -> {path}")
    return entry


def _calibration_scores(config: PredictionConfig, files: Sequence[Path], exported: ExportedScorer | None,
                        memory: FewShot | None) -> Iterator[tuple[Path, tuple[int, int], float, np.ndarray]]:
    """:func:`scored_files`, with the memory's own references scored leave-one-out."""
    if memory is None:
        yield from scored_files(config, files, exported)
        return
    scorer = open_torch_scorer(config, memory)
    assert isinstance(scorer, TorchScorer) and scorer.inference.memory is not None
    full_memory = scorer.inference.memory
    positions = {ref["sha256"]: position for position, ref in enumerate(full_memory.info.get("references") or [])}
    file_positions = [positions.get(sha256_of(file)) for file in files]
    others = [file for file, position in zip(files, file_positions) if position is None]
    yield from scored_files(config, others, scorer)
    left_out = [(file, position) for file, position in zip(files, file_positions) if position is not None]
    if left_out and full_memory.reference_count < 2:
        raise AnomalyCLIPError(f"--calibrate: {left_out[0][0]} is the memory's only reference, and a reference "
                               "is scored against the others (leave-one-out); give at least 2 references, or "
                               "calibrate on good images that are not references")
    if left_out:
        logger.info("%d of the images are references of the memory: scored leave-one-out", len(left_out))
    for file, position in left_out:
        single = TorchScorer(scorer.inference.with_memory(full_memory.without_reference(position)), scorer.device)
        yield from scored_files(config, [file], single)


def main(argv: Sequence[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv)
    exported = open_export(config)
    memory = few_shot(config)
    decision = validate(config, exported, memory)
    if config.calibrate:
        with locked_folder(Path(config.save_thresholds).parent, "--save_thresholds's folder"):
            calibrate(config, exported, memory)
        return 0
    # Written under a staging folder and swapped in as one: the folder holds this run's files or the last one's.
    with locked_folder(config.save_path, "--save_path"), staged_outputs(config.save_path, EARLIER_OUTPUTS) as stage:
        predictions = score_images(config, decision, exported, stage.staging, memory)
        write_predictions(predictions, decision, config, stage.staging, memory_in_force(exported, memory))
        if config.report:
            write_report(config, predictions, decision, stage.staging)
        stage.commit()
        logger.info("wrote %s and predictions.json", Path(config.save_path) / "predictions.csv")
        if config.report:
            logger.info("report: %s", Path(config.save_path) / "report.html")
    return 0


# What test_one_example.py wrote into --save_path before it listed its files there (StagedOutputs.commit removes them).
EARLIER_OUTPUTS = ("predictions.csv", "predictions.json", "report.html", f"**/*{OVERLAY_SUFFIX}", f"**/*{MASK_SUFFIX}")


def write_report(config: PredictionConfig, predictions: Sequence[Prediction], decision: Decision,
                 staging: Path | None = None) -> Path:
    """``save_path/report.html`` (or ``staging/report.html``): the gallery of :func:`report.write_folder_report`."""
    from pipeline import report  # matplotlib and scikit-learn: only when a report is asked for

    save_path = Path(config.save_path)
    tiles = [report.FolderTile(path=str(relative_name(p.path, config.image_path)), score=p.score,
                               overlay=p.overlay.relative_to(save_path).as_posix(), verdict=p.verdict,
                               defect_pixels=p.defect_pixels) for p in predictions]
    if decision.image_threshold is None:
        note = "no thresholds (scores only)"
    else:
        note = f"image threshold {decision.image_threshold:.6g}"
        note += "" if decision.pixel_threshold is None else f", pixel threshold {decision.pixel_threshold:.6g}"
        note += f" from {decision.source}"
    out = save_path if staging is None else staging
    return report.write_folder_report(out / "report.html", f"AnomalyCLIP on {config.image_path}", tiles, note)
