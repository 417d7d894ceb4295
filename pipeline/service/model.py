"""The service's model: the engine's scorer, the thresholds in force, and how one upload is judged.

Everything here is ``test_one_example.py``'s code: the scorer is opened by
:func:`pipeline.prediction.open_export` / :func:`~pipeline.prediction.open_torch_scorer`, the
thresholds come from :func:`~pipeline.prediction.thresholds_in_force`, a verdict and a mask from
:func:`~pipeline.prediction.judge`, the overlay from :func:`pipeline.visualize.overlay_image` and its
colour scale from :func:`~pipeline.prediction.vis_scale`. An upload is decoded by
:func:`AnomalyCLIP_lib.images.load_image`, as a file is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.images import UnreadableImageError, load_image, read_image
from AnomalyCLIP_lib.pretrained import sha256_of
from pipeline.engine import ExportedScorer, Scorer, TorchScorer
from pipeline.prediction import (Decision, FewShot, check_colour_scale, decision_from_classes, few_shot, judge,
                                 open_export, open_torch_scorer, run_provenance, thresholds_in_force, vis_scale)
from pipeline.service.config import ServeConfig
from pipeline.thresholds import (check_classes, load_thresholds, save_thresholds, summed_layers,
                                 thresholds_classes)
from pipeline.visualize import encode_png, mask_png, overlay_image

logger = logging.getLogger(__name__)

PUT_SOURCE = "PUT /thresholds"
_BODY = "the PUT /thresholds body"


class RequestError(AnomalyCLIPError):
    """A request the service refuses: an HTTP status, a kind (for the metrics) and one line.

    Attributes:
        status: The HTTP status code.
        kind: ``not_an_image``, ``corrupt_image``, ``image_too_large``, ``bad_thresholds``, ...
    """

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force (swapped as one object) and the settings they were recorded for.

    Attributes:
        decision: ``test_one_example.py``'s :class:`~pipeline.prediction.Decision`.
        provenance: The class's recorded provenance (checkpoint and backbone SHA-256, image size, sigma,
            layers); this model's own for values set by ``PUT``; ``None`` for ``--threshold`` values.
    """

    decision: Decision
    provenance: dict | None = None


@dataclass
class Prepared:
    """An upload decoded and preprocessed (the engine's row)."""

    name: str
    image: Image.Image
    row: Any
    decode_s: float


class ServiceModel:
    """The loaded scorer and the service's state around it (thread-safe where it changes: the thresholds).

    Args:
        config: The service's settings.
        scorer: The engine's scorer.
        exported: The export, with ``--runtime`` (its manifest holds the hashes), else ``None``.
        thresholds: The thresholds in force at start.
        memory: The torch path's few-shot memory (``--memory FILE`` / ``--reference_path DIR``), else ``None``.
    """

    def __init__(self, config: ServeConfig, scorer: Scorer, exported: ExportedScorer | None,
                 thresholds: Thresholds, memory: FewShot | None = None) -> None:
        self.config = config
        self.scorer = scorer
        self.exported = exported
        self.provenance = run_provenance(config.prediction, exported, memory)  # with the memory's record
        self.memory = memory_view(config, exported, self.provenance)
        self.model_id = model_id(self.provenance)
        self._thresholds = thresholds
        self._put_lock = threading.Lock()

    @classmethod
    def load(cls, config: ServeConfig) -> ServiceModel:
        """Open the scorer (no torch import with ``--runtime``) and check the thresholds, as test_one_example.py."""
        prediction = config.prediction
        exported = open_export(prediction)
        memory = few_shot(prediction)  # --memory FILE checked against the run (torch path; an export holds its own)
        decision = thresholds_in_force(prediction, exported, memory)  # logs what --accept_thresholds let through
        scorer = exported if exported is not None else open_torch_scorer(prediction, memory)
        if isinstance(scorer, TorchScorer) and config.batch_forward == "one_pass":
            scorer = TorchScorer(scorer.inference.with_one_pass_batches(), scorer.device)
        return cls(config, scorer, exported, Thresholds(decision, _recorded_provenance(config, exported, decision)),
                   memory)

    @property
    def thresholds(self) -> Thresholds:
        """The thresholds in force: read once per request, so a request is judged by one set."""
        return self._thresholds

    @property
    def pixel_layers(self) -> int:
        """How many layers a map sums (its values lie in [0, this])."""
        return summed_layers(self.provenance) or 1

    # --- one upload ---------------------------------------------------------------------------

    def prepare(self, name: str, data: bytes) -> Prepared:
        """Decode and preprocess one upload; refuses what is not an image, is cut short or is too large.

        Raises:
            RequestError: 400 ``not_an_image`` / ``corrupt_image``; 413 ``image_too_large``.
        """
        start = time.perf_counter()
        shown = _shown_name(name)
        try:
            header = read_image(shown, decode=False, data=data)
        except UnreadableImageError as error:
            if error.too_large:  # Pillow's own limit, twice --max_pixels' default: refused from the header
                raise RequestError(413, "image_too_large", f"{shown}: its header claims more pixels than this "
                                   f"service decodes ({error.reason}): send a smaller image") from None
            raise RequestError(400, "not_an_image", f"{shown} is not an image Pillow can read: send a PNG, JPEG, "
                               "BMP, TIFF or WebP file") from None
        width, height = header.size
        if width * height > self.config.max_pixels:
            raise RequestError(413, "image_too_large", f"{shown} has {width}x{height} = {width * height} pixels, "
                               f"more than this service decodes (--max_pixels {self.config.max_pixels}): send a "
                               "smaller image")
        try:
            image = load_image(shown, data=data)
        except UnreadableImageError as error:
            raise RequestError(400, "corrupt_image", f"{shown} cannot be decoded ({error.reason}): the file is cut "
                               "short or corrupt; send it again") from None
        return Prepared(shown, image, self.scorer.preprocess(image), time.perf_counter() - start)

    def judged(self, prepared: Prepared, score: float, anomaly_map: Any, thresholds: Thresholds,
               mask: bool, overlay: bool) -> dict[str, Any]:
        """One image's prediction (JSON-ready): score, verdict, defect pixels, thresholds, model id, PNGs asked for."""
        decision = thresholds.decision
        size = prepared.image.size
        verdict, defect = judge(score, anomaly_map, size, decision)
        result: dict[str, Any] = {
            "file": prepared.name, "width": size[0], "height": size[1],
            "score": score if math.isfinite(score) else None, "verdict": verdict,
            "defect_pixels": None if defect is None else int(defect.sum()),
            "thresholds": thresholds_view(thresholds), "model_id": self.model_id}
        if mask and defect is not None:
            result["mask_png"] = base64.b64encode(mask_png(defect)).decode("ascii")
        if overlay:
            drawn = overlay_image(prepared.image, anomaly_map, scale=vis_scale(self.config.prediction, decision),
                                  pixel_threshold=decision.pixel_threshold, mask=defect)
            result["overlay_png"] = base64.b64encode(encode_png(drawn)).decode("ascii")
        return result

    # --- thresholds ---------------------------------------------------------------------------

    def put_thresholds(self, body: object) -> Thresholds:
        """Check new thresholds as the CLI checks them, persist them (``--thresholds_file_writable``), swap them in.

        ``body``: a thresholds.json document (``classes``; optional ``class_name``, ``accept_thresholds``), or
        ``{"image_threshold": x, "pixel_threshold": y}`` (``pixel_threshold`` optional, ``null``: none).

        Raises:
            RequestError: 400 ``bad_thresholds`` with the CLI's line; 507 ``thresholds_not_saved`` when the file
                cannot be written (the thresholds in force are then unchanged).
        """
        with self._put_lock:
            try:
                new, classes = self._checked_put(body)
            except AnomalyCLIPError as error:
                raise RequestError(400, "bad_thresholds", str(error)) from None
            if self.config.thresholds_file_writable:
                self._persist(new, classes)
            self._thresholds = new  # one reference swapped: a request sees the old set or the new one
            logger.info("thresholds now image %s, pixel %s (%s)", new.decision.image_threshold,
                        new.decision.pixel_threshold, new.decision.source)
            return new

    def _checked_put(self, body: object) -> tuple[Thresholds, dict[str, dict] | None]:
        prediction = self.config.prediction
        if not isinstance(body, dict):
            raise AnomalyCLIPError(f"{_BODY} must be a JSON object: a thresholds.json, or "
                                   '{"image_threshold": X, "pixel_threshold": Y}')
        if "classes" in body:
            classes = thresholds_classes(body, _BODY)
            accept = body.get("accept_thresholds", False) is True or prediction.accept_thresholds
            decision = decision_from_classes(classes, body.get("class_name"), PUT_SOURCE, _BODY, self.provenance,
                                             accept)
            new = Thresholds(decision, classes[decision.class_name].get("provenance"))
        else:
            unknown = sorted(set(body) - {"image_threshold", "pixel_threshold"})
            if unknown:
                raise AnomalyCLIPError(f"{_BODY} has unknown key(s) {', '.join(unknown)}: give image_threshold and "
                                       "pixel_threshold, or a thresholds.json with its classes")
            if body.get("image_threshold") is None:
                raise AnomalyCLIPError(f"{_BODY} needs image_threshold (a pixel threshold alone gives no verdicts)")
            entry = {"image_threshold": body["image_threshold"], "pixel_threshold": body.get("pixel_threshold"),
                     "provenance": self.provenance}
            check_classes({"values": entry}, _BODY)
            pixel = entry["pixel_threshold"]
            decision = Decision(float(entry["image_threshold"]), None if pixel is None else float(pixel), PUT_SOURCE,
                                self.thresholds.decision.class_name)
            new, classes = Thresholds(decision, self.provenance), None
        check_colour_scale(prediction, new.decision)
        return new, classes

    def _persist(self, new: Thresholds, classes: dict[str, dict] | None) -> None:
        """Rewrite ``--thresholds`` FILE atomically: the body's classes, or the class in force with the new values."""
        path = Path(self.config.prediction.thresholds)
        try:
            if classes is None:
                classes = load_thresholds(path)
                name = new.decision.class_name
                classes[name] = {**classes[name], "image_threshold": new.decision.image_threshold,
                                 "pixel_threshold": new.decision.pixel_threshold, "set_by": PUT_SOURCE}
            save_thresholds(path, classes, source=f"serve.py {PUT_SOURCE}")
        except (OSError, AnomalyCLIPError) as error:
            raise RequestError(507, "thresholds_not_saved", f"cannot write --thresholds {path} ({error}); the "
                               "thresholds in force are unchanged") from None

    # --- descriptions -------------------------------------------------------------------------

    def thresholds_document(self) -> dict[str, Any]:
        """``GET /thresholds``: the thresholds in force, their source and provenance, and the value ranges."""
        return {**thresholds_view(self.thresholds), "file": self.config.prediction.thresholds,
                "persisted": self.config.thresholds_file_writable,
                "ranges": {"image_threshold": [0.0, 1.0], "pixel_threshold": [0.0, float(self.pixel_layers)]}}

    def manifest(self) -> dict[str, Any]:
        """``GET /model``: what scores the images (hashes, design, runtime, batching, thresholds)."""
        prediction = self.config.prediction
        model, scoring = prediction.model, prediction.scoring
        return {
            "model_id": self.model_id, "runtime": scoring.runtime, "model_dir": scoring.model_dir,
            "checkpoint": {"path": scoring.checkpoint_path, "sha256": self.provenance["checkpoint_sha256"]},
            "backbone": {"name": model.backbone, "sha256": self.provenance["backbone_sha256"]},
            "image_size": model.image_size,
            "design": {"n_ctx": model.n_ctx, "depth": model.depth, "t_n_ctx": model.t_n_ctx,
                       "features_list": list(model.features_list), "feature_map_layer": model.feature_map_layer,
                       "sigma": scoring.sigma, "precision": scoring.precision,
                       "reference_arithmetic": model.reference_arithmetic},
            "device": getattr(getattr(self.scorer, "device", None), "type", "cpu"),
            "batching": {"max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms,
                         "max_queue": self.config.max_queue, "forward": self.config.batch_forward},
            "thresholds": self.thresholds_document(),
            "memory": self.memory}


def thresholds_view(thresholds: Thresholds) -> dict[str, Any]:
    """The thresholds in force as a prediction reports them (the predictions.json ``thresholds`` fields)."""
    decision = thresholds.decision
    view: dict[str, Any] = {"image_threshold": decision.image_threshold, "pixel_threshold": decision.pixel_threshold,
                            "source": decision.source, "class_name": decision.class_name,
                            "rule": "value >= threshold", "provenance": thresholds.provenance}
    if decision.accepted:
        view["accepted_other_settings"] = list(decision.accepted)
    return view


def memory_view(config: ServeConfig, exported: ExportedScorer | None,
                provenance: dict[str, Any]) -> dict[str, Any] | None:
    """``GET /model``'s ``memory``: the few-shot memory that scores (``None``: zero-shot).

    Its provenance record (``k``, ``layers``, ``stream``, ``weight``, ``references_sha256``: the digest the
    thresholds are checked against) with the file it came from and that file's SHA-256: ``--memory FILE``'s,
    or, with ``--runtime``, the one export.py was given (recorded in its manifest).
    """
    record = provenance.get("memory")
    if not isinstance(record, dict):
        return None
    spec = config.prediction.memory
    if exported is not None:
        stored = exported.exported.manifest.get("memory") or {}
        source = {"file": stored.get("file"), "file_sha256": stored.get("file_sha256"), "class_name":
                  stored.get("class_name")}
    elif spec is not None and spec.memory_file:
        source = {"file": spec.memory_file, "file_sha256": sha256_of(spec.memory_file)}
    else:  # built at start from --reference_path
        source = {"reference_path": spec.reference_path if spec else None,
                  "file": spec.save_memory if spec else None,
                  "file_sha256": sha256_of(spec.save_memory) if spec and spec.save_memory else None}
    return {**record, **source}


def model_id(provenance: dict[str, object]) -> str:
    """16 hex digits naming what shapes the scores: SHA-256 of the provenance record (hashes and settings)."""
    text = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recorded_provenance(config: ServeConfig, exported: ExportedScorer | None, decision: Decision) -> dict | None:
    """The provenance the chosen class records (``--thresholds`` FILE's, or the export's stored thresholds)."""
    if decision.class_name is None:
        return None
    if config.prediction.thresholds is not None:
        classes = load_thresholds(config.prediction.thresholds)
    else:
        stored = exported.exported.thresholds if exported is not None else None
        classes = stored.get("classes", {}) if isinstance(stored, dict) else {}
    entry = classes.get(decision.class_name)
    return entry.get("provenance") if isinstance(entry, dict) else None


def _shown_name(name: str | None) -> str:
    """An upload's file name as messages show it: its last part, printable, at most 100 characters."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(char if char.isprintable() else "?" for char in base)[:100]
    return cleaned or "upload"
