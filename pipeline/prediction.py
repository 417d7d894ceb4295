"""Score single images (or every image under a folder): verdicts, defect masks, overlays, calibration.

Verdicts and masks for a folder, with thresholds from ``test.py`` or from a calibration::

    python test_one_example.py --image_path parts/ --checkpoint_path CKPT \
        --thresholds thresholds.json --class_name bottle          # or: --threshold 0.5 --pixel_threshold 1.2

Calibration from known-good images only (no ``meta.json``): every image is taken as normal, the
image threshold is the score that at most ``--target_fpr`` of them reach, the pixel threshold the
map value that at most that fraction of their pixels reach (``thresholds.normal_fpr``)::

    python test_one_example.py --image_path good_parts/ --checkpoint_path CKPT \
        --calibrate --target_fpr 0.01 --save_thresholds thresholds.json

Prints one tab-separated line per image: path, score (4 decimals), then the verdict
(``anomalous``/``normal``, when an image threshold is known), the defect area in pixels (when a
pixel threshold is known) and the overlay. A value is flagged when ``value >= threshold``.

Outputs mirror the input tree: the image ``FOLDER/sub/a.png`` gives ``save_path/sub/a.png.overlay.png``
and ``save_path/sub/a.png.mask.png`` (0/255 at the image's own size), so ``a.png``, ``a.jpg`` and
two ``000.png`` in different folders never overwrite each other. ``save_path/predictions.csv`` and
``predictions.json`` hold every image's row (``path, score, verdict, defect_pixels, overlay, mask``;
overlay and mask relative to ``save_path``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Torch-free imports only: with --runtime the whole run needs numpy, Pillow and the runtime
# (torch is imported in _torch_batches).
from AnomalyCLIP_lib.constants import DPAM_LAYER
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.images import IMAGE_EXTENSIONS, unreadable_error, unreadable_headers
from AnomalyCLIP_lib.precision import PRECISIONS
from deploy.runtime import RUNTIMES, ExportedModel, load_image
from pipeline.atomic import atomic_write_text, locked_folder
from pipeline.cli import add_model_args, add_sigma_arg, check_args, cli_parser, parse_noting_given, run_cli
from pipeline.thresholds import (NormalTail, check_target_fpr, class_entry, load_thresholds, normal_fpr_threshold,
                        save_thresholds, select_thresholds)
from pipeline.visualize import VIS_SCALES, defect_mask, save_mask, save_overlay

logger = logging.getLogger(__name__)

OVERLAY_SUFFIX = ".overlay.png"
MASK_SUFFIX = ".mask.png"
PREDICTION_COLUMNS = ("path", "score", "verdict", "defect_pixels", "overlay", "mask")
DEFAULT_TARGET_FPR = 0.01


@dataclass(frozen=True)
class Decision:
    """The thresholds in force and where they came from (all None: scores only)."""

    image_threshold: float | None = None
    pixel_threshold: float | None = None
    source: str | None = None
    class_name: str | None = None


@dataclass
class Prediction:
    """One image's result; ``verdict``, ``defect_pixels`` and ``mask`` are None where unknown."""

    path: Path
    score: float
    overlay: Path | None = None
    verdict: str | None = None
    defect_pixels: int | None = None
    mask: Path | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring); checked further by :func:`validate_args`."""
    parser = cli_parser("Anomaly scores, verdicts, defect masks and heat maps for images.")
    parser.add_argument("--image_path", required=True, help="an image file, or a folder of images (read recursively)")
    parser.add_argument("--checkpoint_path", default=None,
                        help="prompt checkpoint (ours or the original's); not needed with --runtime")
    parser.add_argument("--save_path", default="./results/single", help="folder for overlays, masks, predictions")
    add_model_args(parser)
    add_sigma_arg(parser)
    parser.add_argument("--threshold", type=float, default=None, help="image threshold: 'anomalous' when score >= it")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="pixel threshold (with --threshold): the defect mask is map >= it")
    parser.add_argument("--thresholds", default=None,
                        help="thresholds.json (from test.py or --calibrate) giving both thresholds")
    parser.add_argument("--class_name", default=None,
                        help="class of --thresholds to use (needed when it holds several); with --calibrate the "
                             "name to save under (default: the folder's name)")
    parser.add_argument("--vis_scale", choices=VIS_SCALES, default=None,
                        help="overlay colours: 'fixed' = map / (2 x pixel threshold), clipped (default when a pixel "
                             "threshold is known); 'per_image' = the original's per-image min-max (default otherwise)")
    parser.add_argument("--calibrate", action="store_true",
                        help="take every image as normal and choose thresholds at --target_fpr "
                             "(needs --save_thresholds)")
    parser.add_argument("--target_fpr", type=float, default=None,
                        help=f"with --calibrate: fraction of good images / pixels allowed to be flagged "
                             f"(default {DEFAULT_TARGET_FPR})")
    parser.add_argument("--save_thresholds", default=None, help="with --calibrate: the thresholds.json to write")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16/bf16 autocast on CUDA only")
    parser.add_argument("--report", action="store_true",
                        help="write save_path/report.html: every image's overlay, highest score first, with verdicts")
    parser.add_argument("--runtime", choices=("torch", *RUNTIMES), default="torch",
                        help="run an exported graph (export.py) with ONNX Runtime or OpenVINO, without torch")
    parser.add_argument("--model", default=None,
                        help="with --runtime: the folder export.py wrote (its design replaces the model flags)")
    return parse_noting_given(parser, argv)


# --- validation ---------------------------------------------------------------------------------


def _check_finite(value: float | None, flag: str) -> None:
    if value is not None and not math.isfinite(value):
        raise AnomalyCLIPError(f"{flag} {value} is not a finite number")


def _check_calibration_flags(args: argparse.Namespace) -> None:
    if args.save_thresholds is None:
        raise AnomalyCLIPError("--calibrate needs --save_thresholds FILE: where to write the thresholds")
    for flag in ("threshold", "pixel_threshold", "thresholds", "vis_scale"):
        if getattr(args, flag) is not None:
            raise AnomalyCLIPError(f"--calibrate chooses the thresholds; drop --{flag}")
    if Path(args.save_thresholds).is_dir():
        raise AnomalyCLIPError(f"--save_thresholds {args.save_thresholds} is a folder; give a file name")
    existing_thresholds(args.save_thresholds)  # a file there must be a thresholds.json: its classes are kept
    check_target_fpr(DEFAULT_TARGET_FPR if args.target_fpr is None else args.target_fpr)


def _decision_from_file(args: argparse.Namespace) -> Decision:
    if args.threshold is not None or args.pixel_threshold is not None:
        raise AnomalyCLIPError("--thresholds gives both thresholds; drop --threshold/--pixel_threshold or --thresholds")
    classes = load_thresholds(args.thresholds)
    image_threshold, pixel_threshold = select_thresholds(classes, args.class_name, args.thresholds)
    class_name = args.class_name if args.class_name is not None else next(iter(classes))
    if image_threshold is None:
        raise AnomalyCLIPError(f"{args.thresholds}: class {class_name!r} has no image threshold; calibrate it again")
    for value, what in ((image_threshold, "image_threshold"), (pixel_threshold, "pixel_threshold")):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise AnomalyCLIPError(f"{args.thresholds}: class {class_name!r} has an invalid {what} {value!r}")
    size = classes[class_name].get("image_size")
    if size is not None and size != args.image_size:
        logger.warning("%s: class %r was calibrated at --image_size %s, this run uses %s", args.thresholds,
                       class_name, size, args.image_size)
    pixel = None if pixel_threshold is None else float(pixel_threshold)
    return Decision(float(image_threshold), pixel, str(args.thresholds), class_name)


def _decision_from_flags(args: argparse.Namespace) -> Decision:
    if args.class_name is not None:
        raise AnomalyCLIPError("--class_name picks a class of --thresholds FILE (or names a --calibrate result)")
    if args.pixel_threshold is not None and args.threshold is None:
        raise AnomalyCLIPError("--pixel_threshold needs an image threshold too: add --threshold X")
    if args.threshold is None:
        return Decision()
    return Decision(args.threshold, args.pixel_threshold, "--threshold")


def _load_export(args: argparse.Namespace) -> None:
    """With ``--runtime``, the exported graph (``args.exported``; :func:`cli.check_args` took its design)."""
    if args.runtime != "torch":
        args.exported = ExportedModel(args.model, args.runtime)


def _decision_from_export(args: argparse.Namespace) -> Decision | None:
    """The thresholds export.py stored (a thresholds.json's content), when no threshold flag is given."""
    stored = getattr(args, "exported", None) and args.exported.thresholds
    if not isinstance(stored, dict) or not isinstance(stored.get("classes"), dict) or not stored["classes"]:
        return None
    source = f"{args.model}/anomalyclip.json"
    image_threshold, pixel_threshold = select_thresholds(stored["classes"], args.class_name, source)
    class_name = args.class_name if args.class_name is not None else next(iter(stored["classes"]))
    if image_threshold is None:
        return None
    pixel = None if pixel_threshold is None else float(pixel_threshold)
    return Decision(float(image_threshold), pixel, source, class_name)


def _check_inputs_outside_outputs(args: argparse.Namespace) -> None:
    """Outputs are never read back as inputs, so inputs inside the output folder would all be skipped."""
    images, outputs = Path(args.image_path).resolve(), Path(args.save_path).resolve()
    if images == outputs or outputs in images.parents:
        raise AnomalyCLIPError(f"--image_path {args.image_path} lies inside --save_path {args.save_path}, whose "
                               "files are outputs and never read as images; choose a --save_path outside it")


def validate_args(args: argparse.Namespace) -> Decision:
    """Check every flag before any work; returns the thresholds in force. Raises one-line errors."""
    check_args(args)
    _check_inputs_outside_outputs(args)
    _load_export(args)
    _check_finite(args.threshold, "--threshold")
    _check_finite(args.pixel_threshold, "--pixel_threshold")
    if args.calibrate:
        _check_calibration_flags(args)
        return Decision()
    for flag in ("target_fpr", "save_thresholds"):
        if getattr(args, flag) is not None:
            raise AnomalyCLIPError(f"--{flag} is used only with --calibrate")
    if args.thresholds is not None:
        decision = _decision_from_file(args)
    elif args.threshold is None and args.pixel_threshold is None and (stored := _decision_from_export(args)):
        decision = stored
    else:
        decision = _decision_from_flags(args)
    if args.vis_scale == "fixed" and decision.pixel_threshold is None:
        raise AnomalyCLIPError("--vis_scale fixed needs a pixel threshold (--pixel_threshold or --thresholds)")
    if decision.pixel_threshold is not None and decision.pixel_threshold <= 0 and args.vis_scale != "per_image":
        raise AnomalyCLIPError(f"pixel threshold {decision.pixel_threshold} is not positive: the fixed colour scale "
                               "cannot use it; add --vis_scale per_image")
    return decision


# --- inputs and output names --------------------------------------------------------------------


def _is_excluded(file: Path, root: Path, exclude: Path | None) -> bool:
    """Hidden files or folders under ``root``, and anything under ``exclude`` (our own outputs)."""
    if any(part.startswith(".") for part in file.relative_to(root).parts):
        return True
    return exclude is not None and file.resolve().is_relative_to(exclude)


def image_files(path: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """The image itself, or the images under a folder, recursively, sorted by relative path.

    Non-images, hidden files and folders, and files under ``exclude`` (the save path, when it
    lies inside the folder) are skipped.

    Raises:
        AnomalyCLIPError: No image is found, or files with an image's name are not images (all are named).
    """
    path = Path(path)
    if path.is_file():
        _check_headers([path])
        return [path]
    if not path.is_dir():
        raise AnomalyCLIPError(f"--image_path {path} does not exist")
    skip = Path(exclude).resolve() if exclude is not None else None
    files = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not _is_excluded(p, path, skip)), key=lambda p: p.relative_to(path).parts)
    if not files:
        raise AnomalyCLIPError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass an image or a "
                               "folder of them")
    _check_headers(files)
    return files


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


def output_path(save_path: Path, relative: Path, suffix: str) -> Path:
    """``save_path/<relative path with its extension><suffix>``, e.g. ``sub/a.png.overlay.png``."""
    return save_path / relative.parent / f"{relative.name}{suffix}"


# --- scoring ------------------------------------------------------------------------------------


def scored_batches(args: argparse.Namespace, files: Sequence[Path]
                   ) -> Iterator[tuple[Path, tuple[int, int], float, np.ndarray]]:
    """Yield ``(file, (width, height), score, map)`` per image, in order, batch by batch."""
    if getattr(args, "exported", None) is not None:
        yield from _exported_batches(args.exported, files, args.batch_size)
    else:
        yield from _torch_batches(args, files)


def _exported_batches(exported: ExportedModel, files: Sequence[Path], batch_size: int
                      ) -> Iterator[tuple[Path, tuple[int, int], float, np.ndarray]]:
    """The exported graph's results (no torch)."""
    for start in tqdm(range(0, len(files), batch_size), desc="scoring", unit="batch", disable=None):
        chunk = files[start : start + batch_size]
        loaded = [load_image(file) for file in chunk]
        for file, image, result in zip(chunk, loaded, exported.predict_images(loaded)):
            yield file, image.size, result.score, result.anomaly_map


def _torch_batches(args: argparse.Namespace, files: Sequence[Path]
                   ) -> Iterator[tuple[Path, tuple[int, int], float, np.ndarray]]:
    """The inference module's results (the reference path)."""
    import torch

    from AnomalyCLIP_lib.inference import AnomalyCLIPInference, config_from_args
    from AnomalyCLIP_lib.transform import image_transform
    from utils import setup_seed
    from pipeline.loading import load_model_and_prompts, resolve_device

    setup_seed(args.seed)
    device = resolve_device(args.device)
    model, prompt_learner, _ = load_model_and_prompts(args, device, args.checkpoint_path)
    inference = AnomalyCLIPInference.from_model(model, prompt_learner, config_from_args(args, DPAM_LAYER))
    preprocess = image_transform(args.image_size)
    for start in tqdm(range(0, len(files), args.batch_size), desc="scoring", unit="batch", disable=None):
        chunk = files[start : start + args.batch_size]
        loaded = [load_image(file) for file in chunk]
        images = torch.stack([preprocess(image) for image in loaded]).to(device)
        prediction = inference.predict(images)
        for file, image, score, anomaly_map in zip(chunk, loaded, prediction.scores.tolist(), prediction.maps.numpy()):
            yield file, image.size, score, anomaly_map


def vis_scale(args: argparse.Namespace, decision: Decision) -> str:
    """``--vis_scale``, else ``fixed`` where a pixel threshold is known and ``per_image`` otherwise."""
    return args.vis_scale or ("per_image" if decision.pixel_threshold is None else "fixed")


def decide(file: Path, size: tuple[int, int], score: float, anomaly_map: np.ndarray, decision: Decision,
           args: argparse.Namespace) -> Prediction:
    """Verdict, mask and overlay of one image; writes the mask and overlay files."""
    save_path = Path(args.save_path)
    relative = relative_name(file, args.image_path)
    prediction = Prediction(file, score)
    mask = None
    if decision.image_threshold is not None:
        prediction.verdict = "anomalous" if score >= decision.image_threshold else "normal"
    if decision.pixel_threshold is not None:
        mask = defect_mask(anomaly_map, decision.pixel_threshold, size)
        prediction.defect_pixels = int(mask.sum())
        prediction.mask = save_mask(mask, output_path(save_path, relative, MASK_SUFFIX))
    prediction.overlay = save_overlay(file, anomaly_map, output_path(save_path, relative, OVERLAY_SUFFIX),
                                      scale=vis_scale(args, decision), pixel_threshold=decision.pixel_threshold,
                                      mask=mask)
    return prediction


def print_line(prediction: Prediction) -> None:
    """``path  score  [verdict]  [defect pixels]  overlay``, tab-separated."""
    fields = [str(prediction.path), f"{prediction.score:.4f}"]
    fields += [str(v) for v in (prediction.verdict, prediction.defect_pixels) if v is not None]
    tqdm.write("\t".join([*fields, str(prediction.overlay)]))


def score_images(args: argparse.Namespace, decision: Decision | None = None) -> list[Prediction]:
    """Score every image, write its overlay (and mask), print its line; returns the predictions in order."""
    decision = validate_args(args) if decision is None else decision
    files = image_files(args.image_path, exclude=args.save_path)
    predictions = []
    for file, size, score, anomaly_map in scored_batches(args, files):
        predictions.append(decide(file, size, score, anomaly_map, decision, args))
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


def write_predictions(save_path: str | Path, predictions: Sequence[Prediction], decision: Decision,
                      args: argparse.Namespace) -> tuple[Path, Path]:
    """Write ``predictions.csv`` and ``predictions.json`` atomically; returns their paths."""
    save_path = Path(save_path)
    rows = [prediction_row(p, save_path) for p in predictions]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{key: _csv_cell(value) for key, value in row.items()} for row in rows])
    document = {"thresholds": {"image_threshold": decision.image_threshold,
                               "pixel_threshold": decision.pixel_threshold, "source": decision.source,
                               "class_name": decision.class_name, "rule": "value >= threshold"},
                "image_path": str(args.image_path), "checkpoint_path": str(args.checkpoint_path),
                "image_size": args.image_size, "vis_scale": vis_scale(args, decision), "predictions": rows}
    csv_path = atomic_write_text(buffer.getvalue(), save_path / "predictions.csv")
    json_text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    json_path = atomic_write_text(json_text, save_path / "predictions.json")
    return csv_path, json_path


# --- calibration --------------------------------------------------------------------------------


def calibration_class_name(args: argparse.Namespace) -> str:
    """``--class_name``, else the folder's name (the file's folder for a single image)."""
    if args.class_name:
        return args.class_name
    path = Path(args.image_path).resolve()
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


def calibrate(args: argparse.Namespace) -> dict[str, object]:
    """Take every image as normal; write and return the ``normal_fpr`` class entry."""
    target_fpr = DEFAULT_TARGET_FPR if args.target_fpr is None else args.target_fpr
    files = image_files(args.image_path, exclude=args.save_path)
    pixel_tail = NormalTail(len(files) * args.image_size**2, target_fpr)
    pending: list[np.ndarray] = []
    scores = []
    for file, _, score, anomaly_map in scored_batches(args, files):
        scores.append(score)
        pending.append(anomaly_map)
        if len(pending) * anomaly_map.size >= pixel_tail.allowed + 1:  # amortised: each value partitioned O(1) times
            pixel_tail.update(np.stack(pending))
            pending.clear()
        tqdm.write(f"{file}\t{score:.4f}")
    if pending:
        pixel_tail.update(np.stack(pending))
    image_threshold = normal_fpr_threshold(np.asarray(scores, dtype=np.float32), target_fpr)
    name = calibration_class_name(args)
    entry = class_entry(image_threshold, pixel_tail.threshold(), "normal_fpr", target_fpr=target_fpr,
                        n_images=len(files), n_pixels=pixel_tail.total, image_size=args.image_size,
                        sigma=args.sigma, checkpoint_path=str(args.checkpoint_path))
    classes = existing_thresholds(args.save_thresholds)
    if classes:
        logger.info("%s class %s in %s; its other classes (%s) are kept", "replacing" if name in classes else "adding",
                    name, args.save_thresholds, ", ".join(sorted(set(classes) - {name})) or "none")
    path = save_thresholds(args.save_thresholds, {**classes, name: entry}, source="test_one_example.py --calibrate",
                           image_path=str(args.image_path))
    print(f"class {name}: image_threshold {entry['image_threshold']!r}, pixel_threshold "
          f"{entry['pixel_threshold']!r} (normal_fpr, target_fpr {target_fpr}, {len(files)} good images) -> {path}")
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    decision = validate_args(args)
    if args.calibrate:
        with locked_folder(Path(args.save_thresholds).parent, "--save_thresholds's folder"):
            calibrate(args)
        return 0
    with locked_folder(args.save_path, "--save_path"):
        predictions = score_images(args, decision)
        csv_path, _ = write_predictions(args.save_path, predictions, decision, args)
        logger.info("wrote %s and predictions.json", csv_path)
        if args.report:
            logger.info("report: %s", write_report(args, predictions, decision))
    return 0


def write_report(args: argparse.Namespace, predictions: Sequence[Prediction], decision: Decision) -> Path:
    """``save_path/report.html``: the gallery of :func:`report.write_folder_report`."""
    from pipeline import report  # matplotlib and scikit-learn: only when a report is asked for

    save_path = Path(args.save_path)
    tiles = [report.FolderTile(path=str(relative_name(p.path, args.image_path)), score=p.score,
                               overlay=p.overlay.relative_to(save_path).as_posix(), verdict=p.verdict,
                               defect_pixels=p.defect_pixels) for p in predictions]
    if decision.image_threshold is None:
        note = "no thresholds (scores only)"
    else:
        note = f"image threshold {decision.image_threshold:.6g}"
        note += "" if decision.pixel_threshold is None else f", pixel threshold {decision.pixel_threshold:.6g}"
        note += f" from {decision.source}"
    return report.write_folder_report(save_path / "report.html", f"AnomalyCLIP on {args.image_path}", tiles, note)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
