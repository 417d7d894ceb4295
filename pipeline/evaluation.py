"""Zero-shot evaluation of learned prompts on a dataset (method §7).

Example::

    python test.py --dataset visa --data_path ./data/visa \
        --checkpoint_path ./checkpoints/9_12_4_multiscale_visa/epoch_15.pth \
        --save_path ./results/visa --features_list 24 --image_size 518

Writes the original's table (printed and appended to ``save_path/log.txt``),
``save_path/results.json`` (per-class and mean metrics, config, versions, wall time) and
``save_path/scores.csv`` (one row per image) and ``save_path/thresholds.json`` (per class image
and pixel decision thresholds, see :mod:`thresholds`). ``results.json`` also holds image F1-max,
pixel AP and pixel F1-max (``--extra_metrics`` prints them too) and the AUROCs per defect type.
``--vis`` adds heat-map overlays under ``save_path/imgs/<class>/<type>/``; ``--dump FILE.npz``
saves every score, map and mask; ``--report`` writes ``save_path/report.html`` (see :mod:`report`).

Evaluation is a loop over per-image results gathered per class: a class's metrics are
computed as soon as its last image is scored and its maps are then dropped, so memory holds
one class at a time. Under ``torchrun --nproc_per_node K test.py ...`` each rank scores every
K-th image, and each result goes to the rank that owns its class (classes are dealt out to the
ranks in turn), which computes that class's metrics; rank 0 alone writes the log, the table,
results.json, scores.csv and the dump, and overlays are written by the rank that scored the
image. The numbers are a one-process run's (see :mod:`distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import metrics
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from dataset import AnomalyDataset
from pipeline import distributed, report, thresholds
from pipeline.atomic import StagedOutputs, atomic_write_texts, naming_errors, remove_leftovers
from pipeline.cli import (add_checkpoint_arg, add_loader_args, add_memory_args, add_model_args, add_save_path_arg,
                          add_scoring_args, add_sigma_arg, check_loader_spec, cli_parser, loader_spec, memory_spec,
                          parse_config, scored_run_specs)
from pipeline.config import LoaderSpec, ModelSpec, RunRecord, ScoringSpec, replaced
from pipeline.dump import DumpWriter
from pipeline.engine import (Batch, ExportedScorer, PerClassScorer, ScoredImage, Scorer, TorchScorer, dataset_batches,
                             score_batches)
from pipeline.loading import configure_threads, open_scorer, resolve_device, resolve_num_workers
from pipeline.memory import MemorySpec, Reference, build_class_memory, dataset_references, memory_info, \
    memory_provenance
from pipeline.naming import OVERLAY_SUFFIX, VIS_FOLDER, output_path, relative_to_root
from pipeline.visualize import save_overlay
from utils import get_logger, project_version, setup_seed

METRIC_SETS = ("image-level", "pixel-level", "image-pixel-level")
# Decision metrics: always in results.json, in the table with --extra_metrics.
EXTRA_COLUMNS = (metrics.IMAGE_F1_MAX, metrics.PIXEL_AP, metrics.PIXEL_F1_MAX)
UNNAMED_DEFECT_TYPE = "unspecified"  # the defect type of an anomalous item whose specie_name is empty

logger = logging.getLogger("anomalyclip.test")


@dataclass(frozen=True)
class EvaluationOutputs:
    """What an evaluation writes besides results.json, scores.csv and thresholds.json.

    Attributes:
        save_path: The output folder.
        vis: Heat-map overlays under ``save_path/imgs/`` (:mod:`pipeline.naming`).
        dump: ``FILE.npz`` for every score, map and mask, or ``None``.
        extra_metrics: Image F1-max, pixel AP and pixel F1-max in the printed table too.
        report: ``save_path/report.html``.
        report_k: Images per class in the report's galleries.
    """

    save_path: str
    vis: bool = False
    dump: str | None = None
    extra_metrics: bool = False
    report: bool = False
    report_k: int = 5


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything ``test.py`` was asked to do (frozen; see :func:`parse_args`)."""

    data_path: str
    dataset: str
    model: ModelSpec
    loader: LoaderSpec
    scoring: ScoringSpec
    outputs: EvaluationOutputs
    classes: tuple[str, ...] | None = None
    metrics: str | None = None
    aupro: str = "cflow"
    threshold_method: str = "f1"
    target_fpr: float = 0.01
    record: RunRecord = field(default_factory=lambda: RunRecord({}))
    memory: MemorySpec | None = None


def build_parser():
    parser = cli_parser("Evaluate AnomalyCLIP prompts zero-shot on a dataset.")
    parser.add_argument("--data_path", default="./data/visa", help="dataset root holding meta.json")
    add_save_path_arg(parser, "./results", "log.txt, results.json, scores.csv")
    add_checkpoint_arg(parser)
    parser.add_argument("--dataset", default="mvtec", help="dataset name (for the log and results.json)")
    add_model_args(parser)
    parser.add_argument("--metrics", choices=METRIC_SETS, default=None,
                        help="metric set (default: what the dataset's labels and masks allow)")
    add_sigma_arg(parser)
    parser.add_argument("--aupro", choices=metrics.AUPRO_MODES, default="cflow",
                        help="cflow: the released variant (default); exact: MVTec AD's official definition")
    add_loader_args(parser, "images per forward pass")
    add_scoring_args(parser, "score through an exported graph (export.py) with ONNX Runtime or OpenVINO",
                     "with --runtime: the folder export.py wrote")
    parser.add_argument("--classes", nargs="+", default=None, help="evaluate only these classes")
    parser.add_argument("--vis", action="store_true", help="write heat-map overlays under save_path/imgs/")
    parser.add_argument("--dump", default=None, metavar="FILE.npz", help="save paths, labels, scores, maps and masks")
    parser.add_argument("--extra_metrics", action="store_true",
                        help="add image F1-max, pixel AP and pixel F1-max to the printed table")
    parser.add_argument("--threshold_method", choices=thresholds.METHODS, default="f1",
                        help="thresholds.json: f1 = the F1-max thresholds (default); "
                             "normal_fpr = from normal images only")
    parser.add_argument("--target_fpr", type=float, default=0.01,
                        help="normal_fpr: fraction of normal images (pixels) the threshold may flag (default 0.01)")
    parser.add_argument("--report", action="store_true", help="write save_path/report.html (curves, galleries)")
    parser.add_argument("--report_k", type=int, default=5,
                        help="report: highest-scored normal and lowest-scored anomalous images per class (default 5)")
    add_memory_args(parser, dataset=True)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> EvaluationConfig:
    """``test.py``'s command line, parsed once into a checked :class:`EvaluationConfig`."""
    return parse_config(build_parser(), argv, _config)


def _config(flags: RunRecord) -> EvaluationConfig:
    """The checked config of ``flags`` (with ``--runtime``, the export's design in place of the model flags)."""
    values = flags.values
    loader = loader_spec(flags)
    check_loader_spec(loader)
    model, scoring, flags = scored_run_specs(flags)
    if values["report_k"] < 0:
        raise AnomalyCLIPError(f"--report_k {values['report_k']} must be >= 0")
    if values["dump"] and Path(values["dump"]).is_dir():
        raise AnomalyCLIPError(f"--dump {values['dump']} is a folder; give a file name, e.g. "
                               f"{Path(values['dump']) / 'dump.npz'}")
    thresholds.check_target_fpr(values["target_fpr"])
    memory = memory_spec(flags)
    if memory.active and scoring.exported:
        raise AnomalyCLIPError("few-shot evaluation (--k_shot, --reference_path) builds one memory per class with "
                               "torch; drop --runtime, or export one class's memory (export.py --memory FILE) and "
                               "score that class with test_one_example.py --runtime")
    outputs = EvaluationOutputs(save_path=values["save_path"], vis=values["vis"], dump=values["dump"],
                                extra_metrics=values["extra_metrics"], report=values["report"],
                                report_k=values["report_k"])
    classes = tuple(values["classes"]) if values["classes"] else None
    return EvaluationConfig(data_path=values["data_path"], dataset=values["dataset"], model=model, loader=loader,
                            scoring=scoring, outputs=outputs, classes=classes, metrics=values["metrics"],
                            aupro=values["aupro"], threshold_method=values["threshold_method"],
                            target_fpr=values["target_fpr"], record=flags,
                            memory=memory if memory.active else None)


@dataclass
class ImageResult:
    """What evaluation keeps of one image."""

    index: int
    img_path: str  # as meta.json writes it (relative to the dataset root)
    image_file: str  # where the image was read from
    cls_name: str
    label: int
    score: float
    anomaly_map: np.ndarray | None  # None in the light copy rank 0 gets for scores.csv
    mask: np.ndarray | None
    specie_name: str = ""  # the defect type (meta.json's specie_name)

    def without_arrays(self) -> ImageResult:
        """The result without its map and mask (what scores.csv needs)."""
        return ImageResult(self.index, self.img_path, self.image_file, self.cls_name, self.label, self.score, None,
                           None, self.specie_name)


@dataclass
class ClassResults:
    """All results of one class, stacked for the metrics."""

    cls_name: str
    labels: np.ndarray
    scores: np.ndarray
    masks: np.ndarray
    maps: np.ndarray
    types: list[str]  # defect type per image (see UNNAMED_DEFECT_TYPE)
    image_files: list[str]
    img_paths: list[str]


@dataclass
class ClassGatherer:
    """Collects per-image results and hands over each class once all its images are in.

    Attributes:
        expected: Number of images per class.
    """

    expected: dict[str, int]
    _pending: dict[str, list[ImageResult]] = field(default_factory=dict)

    def add(self, result: ImageResult) -> ClassResults | None:
        """Store ``result``; return the class's stacked results when it is complete."""
        bucket = self._pending.setdefault(result.cls_name, [])
        bucket.append(result)
        if len(bucket) < self.expected[result.cls_name]:
            return None
        del self._pending[result.cls_name]
        bucket.sort(key=lambda r: r.index)
        return ClassResults(
            cls_name=result.cls_name,
            labels=np.array([r.label for r in bucket], dtype=np.int64),
            scores=np.array([r.score for r in bucket], dtype=np.float32),
            masks=np.stack([r.mask for r in bucket]),
            maps=np.stack([r.anomaly_map for r in bucket]),
            types=[r.specie_name or UNNAMED_DEFECT_TYPE for r in bucket],
            image_files=[r.image_file for r in bucket],
            img_paths=[r.img_path for r in bucket],
        )


def image_results(scorer: Scorer, dataset: AnomalyDataset, batches: Iterable[Batch],
                  on_image: Callable[[ImageResult], None] | None = None) -> Iterable[list[ImageResult]]:
    """Per-image results of the dataset items in ``batches`` (the engine's loop), one list per batch.

    Each result is keyed by its item's own index.

    Args:
        on_image: Called with each result as it is made (overlays of the rank that scored it).
    """
    for scored in score_batches(scorer, batches):
        results = [_image_result(dataset, one) for one in scored]
        if on_image is not None:
            for result in results:
                on_image(result)
        yield results


def _image_result(dataset: AnomalyDataset, scored: ScoredImage) -> ImageResult:
    item = dataset.items[scored.index]
    return ImageResult(index=scored.index, img_path=item["img_path"], image_file=dataset.image_file(scored.index),
                       cls_name=item["cls_name"], label=int(item["anomaly"]), score=scored.score,
                       anomaly_map=scored.anomaly_map, mask=scored.mask, specie_name=str(item.get("specie_name") or ""))


@dataclass
class ClassOutcome:
    """What a class leaves once its maps are dropped: small enough to gather to rank 0.

    Attributes:
        values: ``{column: value}``: the metric set's columns, then :data:`metrics.DECISION_KEYS`.
        per_type: ``{defect type: {"image_auroc": ..., "pixel_auroc": ...}}``.
        threshold_entry: The class's ``thresholds.json`` entry.
        report_part: Figures and gallery for ``--report``, else None.
    """

    values: dict[str, float]
    per_type: dict[str, dict[str, float]]
    threshold_entry: dict[str, object]
    report_part: report.ClassReport | None = None


@dataclass(frozen=True)
class OutcomeOptions:
    """How a complete class is evaluated (see :class:`ClassMetricsCollector`)."""

    metric_set: str
    aupro_mode: str = "cflow"
    threshold_method: str = "f1"
    target_fpr: float = 0.01
    report_k: int | None = None  # None: no report


def class_outcome(finished: ClassResults, options: OutcomeOptions) -> ClassOutcome:
    """Metrics, thresholds and (optionally) the report part of one complete class."""
    labels, scores = finished.labels, finished.scores
    pixel_level = "pixel" in options.metric_set
    masks, maps = (finished.masks, finished.maps) if pixel_level else (None, None)
    values = metrics.compute_class_metrics(labels, scores, finished.masks, finished.maps, options.metric_set,
                                           options.aupro_mode)
    decision = metrics.decision_metrics(labels, scores, masks, maps)
    values.update(decision)
    per_type = metrics.per_defect_type_auroc(labels, scores, masks, maps, finished.types)
    entry = thresholds.choose_class_thresholds(
        labels, scores, finished.maps, masks,
        (decision[metrics.IMAGE_F1_THRESHOLD], decision[metrics.PIXEL_F1_THRESHOLD]),
        options.threshold_method, options.target_fpr)
    if entry["warning"]:
        logger.warning("thresholds of %s: %s", finished.cls_name, entry["warning"])
    part = None if options.report_k is None else _report_part(finished, masks, entry, values, options)
    return ClassOutcome(values, per_type, entry, part)


def _report_part(finished: ClassResults, masks: np.ndarray | None, entry: dict[str, object],
                 values: dict[str, float], options: OutcomeOptions) -> report.ClassReport:
    """The class's figures and gallery, rendered while its maps are held."""
    data = report.ClassData(cls_name=finished.cls_name, labels=finished.labels, scores=finished.scores,
                            maps=finished.maps, masks=masks, image_files=finished.image_files,
                            img_paths=finished.img_paths, types=finished.types,
                            image_threshold=entry["image_threshold"], values=values)
    return report.class_report(data, options.report_k, options.aupro_mode)


class ClassMetricsCollector:
    """Gathers per-image results per class and evaluates each class once it is complete.

    Args:
        expected: Number of images of each class this collector is responsible for.
        options: How each class is evaluated (metric set, AUPRO mode, thresholds, report).

    Attributes:
        outcomes: ``{class: ClassOutcome}`` in completion order. Only incomplete classes' maps are held.
    """

    def __init__(self, expected: dict[str, int], options: OutcomeOptions) -> None:
        self.options = options
        self._gatherer = ClassGatherer(expected)
        self.outcomes: dict[str, ClassOutcome] = {}

    @property
    def per_class(self) -> dict[str, dict[str, float]]:
        """``{class: {column: value}}`` of the complete classes, in completion order."""
        return {name: outcome.values for name, outcome in self.outcomes.items()}

    def add(self, result: ImageResult) -> None:
        finished = self._gatherer.add(result)
        if finished is not None:
            self.outcomes[finished.cls_name] = class_outcome(finished, self.options)


def check_complete(per_class: dict[str, dict[str, float]], expected: dict[str, int]) -> None:
    missing = [name for name, count in expected.items() if count and name not in per_class]
    if missing:
        raise RuntimeError(f"results missing for classes {missing}")


def collect_metrics(
    results: Iterable[ImageResult],
    expected: dict[str, int],
    metric_set: str,
    aupro_mode: str = "cflow",
    consumers: Sequence[Callable[[ImageResult], None]] = (),
) -> dict[str, dict[str, float]]:
    """Gather per-image results per class and compute each class's metrics once it is complete.

    Args:
        results: Per-image results in any order.
        expected: Number of images of each class.
        metric_set: See :func:`metrics.metric_columns`.
        aupro_mode: See :func:`metrics.pixel_aupro`.
        consumers: Called with every result as it arrives (CSV rows, overlays, dump).

    Returns:
        ``{class: {column: value}}`` in completion order. Only incomplete classes are held.
    """
    collector = ClassMetricsCollector(expected, OutcomeOptions(metric_set, aupro_mode))
    for result in results:
        for consume in consumers:
            consume(result)
        collector.add(result)
    check_complete(collector.per_class, expected)
    return collector.per_class


def route(results: Sequence[ImageResult], owners: dict[str, int], world_size: int,
          arrays_to_main: bool) -> list[list[ImageResult]]:
    """Where each result goes: whole to its class's owner; to rank 0 also, light unless ``arrays_to_main``."""
    outgoing: list[list[ImageResult]] = [[] for _ in range(world_size)]
    for result in results:
        owner = owners[result.cls_name]
        outgoing[owner].append(result)
        if owner != 0:
            outgoing[0].append(result if arrays_to_main else result.without_arrays())
    return outgoing


def choose_metric_set(dataset: AnomalyDataset, requested: str | None) -> str:
    """The requested metric set, checked against what the dataset has, or the one it allows."""
    available = dataset.availability()
    if requested is None:
        if available.metrics == "none":
            raise AnomalyCLIPError(f"{dataset.root}: no metric applies (it needs normal and anomalous images, "
                                   "or masks); check its meta.json")
        return available.metrics
    if "pixel" in requested and not available.pixel_level:
        raise AnomalyCLIPError(f"--metrics {requested} needs masks, and {dataset.root} has none; "
                               "use --metrics image-level")
    if requested.startswith("image") and not available.image_level:
        raise AnomalyCLIPError(f"--metrics {requested} needs normal and anomalous images; {dataset.root} has only "
                               f"{'anomalous' if available.n_anomalous else 'normal'} ones; use --metrics pixel-level")
    return requested


def _json_number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _versions() -> dict[str, str]:
    import PIL
    import scipy
    import sklearn

    return {**project_version(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
            "pillow": PIL.__version__}


def scores_csv_text(results: list[tuple[str, str, int, float]]) -> str:
    """``scores.csv``: one row per image (path, class, label, score)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["img_path", "cls_name", "label", "score"])
    writer.writerows((p, c, label, f"{score:.8g}") for p, c, label, score in results)
    return buffer.getvalue()


def evaluate(config: EvaluationConfig) -> dict[str, object] | None:
    """Run the evaluation; returns what results.json holds (``None`` on ranks other than 0)."""
    world, device = distributed.setup(config.model.device, resolve_device)
    try:
        with distributed.main_holds(world, config.outputs.save_path, "--save_path"):
            return _evaluate(config, world, device)
    finally:
        distributed.finish(world)


@dataclass
class Prepared:
    """What a run scores and with what: the dataset, its metric set, the scorer, the few-shot references."""

    dataset: AnomalyDataset
    metric_set: str
    scorer: Scorer
    references: dict[str, list[Reference]] | None = None


def _prepare(config: EvaluationConfig, device: torch.device) -> Prepared:
    """The dataset, its metric set and what scores it (the inference module, or an exported graph).

    With few-shot references drawn from the test split, those images are left out of the dataset.
    """
    scoring = config.scoring
    threads = config.model.threads
    exported = (ExportedScorer.load(scoring.model_dir, scoring.runtime, threads, scoring.precision)
                if scoring.exported else None)
    dataset = AnomalyDataset(config.data_path, image_size=config.model.image_size, split="test",
                             class_names=list(config.classes) if config.classes else None)
    references = None
    if config.memory is not None:
        references = dataset_references(config.data_path, dataset.class_names, config.memory, config.model.seed,
                                        config.model.image_size)
        if config.memory.references_from_test:
            drawn = {ref.name for refs in references.values() for ref in refs}
            dataset = AnomalyDataset(config.data_path, image_size=config.model.image_size, split="test",
                                     class_names=dataset.class_names, exclude=drawn)
    if exported is not None and exported.exported.manifest.get("memory") and len(dataset.class_names) > 1:
        memory = exported.exported.manifest["memory"]
        raise AnomalyCLIPError(f"{scoring.model_dir} holds the few-shot memory of one class "
                               f"({memory.get('class_name')}) and {dataset.root} has {len(dataset.class_names)}: "
                               "evaluate that class alone (--classes NAME)")
    metric_set = choose_metric_set(dataset, config.metrics)
    if config.threshold_method == "normal_fpr" and not dataset.any_normal:
        raise AnomalyCLIPError(f"--threshold_method normal_fpr needs normal images and {dataset.root} has none; "
                               "use --threshold_method f1")
    return Prepared(dataset, metric_set, exported or open_scorer(config.model, scoring, device), references)


def _few_shot_scorer(config: EvaluationConfig, world: distributed.World, prepared: Prepared,
                     provenance: dict[str, object]) -> tuple[PerClassScorer, dict[str, dict]]:
    """One memory per class, each built once (by the rank that owns the class) and shared with every rank.

    Returns:
        The per-class scorer and each class's memory provenance.
    """
    assert config.memory is not None and prepared.references is not None and isinstance(prepared.scorer, TorchScorer)
    torch_scorer = prepared.scorer
    names = list(prepared.references)
    info = {"backbone": config.model.backbone, "backbone_sha256": provenance["backbone_sha256"],
            "image_size": config.model.image_size, "dpam_layer": torch_scorer.inference.config.dpam_layer,
            "checkpoint_sha256": provenance["checkpoint_sha256"]}

    def build_owned() -> dict[str, dict[str, np.ndarray]]:
        return {name: build_class_memory(torch_scorer.inference, prepared.references[name], config.memory.settings,
                                         config.loader.batch_size, memory_info(name, **info),
                                         progress=world.is_main).to_arrays()
                for position, name in enumerate(names) if position % world.size == world.rank}

    built = distributed.together(world, build_owned)
    parts = distributed.broadcast_from_main(world, distributed.gather_to_main(world, built))
    arrays = {name: memory for part in parts for name, memory in part.items()}
    from AnomalyCLIP_lib.memory import PatchMemory

    memories = {name: PatchMemory.from_arrays(arrays[name], f"the memory of {name}") for name in names}
    scorers = {name: TorchScorer(torch_scorer.inference.with_memory(memory), torch_scorer.device)
               for name, memory in memories.items()}
    return PerClassScorer(scorers), {name: memory_provenance(memory) for name, memory in memories.items()}


def _evaluate(config: EvaluationConfig, world: distributed.World, device: torch.device) -> dict[str, object] | None:
    started = time.time()
    setup_seed(config.model.seed)
    threads = configure_threads(config.model.threads)
    num_workers = resolve_num_workers(config.loader.num_workers, device)
    # The run as it really runs (resolved defaults), recorded so in results.json: a new config, not a mutation.
    config = replaced(config, loader=replaced(config.loader, num_workers=num_workers),
                      record=config.record.with_values(num_workers=num_workers, threads=threads))
    outputs = config.outputs
    save_path = Path(outputs.save_path)
    logger = get_logger(save_path, "anomalyclip.test", main_process=world.is_main)
    stage = StagedOutputs(save_path, EARLIER_OUTPUTS)  # the run's files, swapped in as one at the end
    if world.is_main:
        for name in ("results.json", "scores.csv", "thresholds.json", "report.html"):
            remove_leftovers(save_path, name)  # of a run killed while writing
        stage.prepare()
    try:
        return _evaluate_staged(config, world, device, stage, started, logger)
    finally:
        if world.is_main:
            stage.discard()


# What test.py wrote into --save_path before it listed its files there (StagedOutputs.commit removes them).
EARLIER_OUTPUTS = ("results.json", "scores.csv", "thresholds.json", "report.html", f"{VIS_FOLDER}/**/*{OVERLAY_SUFFIX}")


def _evaluate_staged(config: EvaluationConfig, world: distributed.World, device: torch.device, stage: StagedOutputs,
                     started: float, logger: logging.Logger) -> dict[str, object] | None:
    """The run, writing its files under ``stage.staging``; rank 0 commits them as one at the end."""
    outputs = config.outputs
    staging = stage.staging
    prepared = distributed.together(world, lambda: _prepare(config, device))
    dataset, metric_set, scorer = prepared.dataset, prepared.metric_set, prepared.scorer
    columns = metrics.metric_columns(metric_set)
    manifest = scorer.exported.manifest if isinstance(scorer, ExportedScorer) else None
    provenance = thresholds.provenance_record(config.model, config.scoring, manifest)
    memories: dict[str, dict] = {}
    if manifest is not None and manifest.get("memory"):  # an export holding one class's memory
        memories = {name: manifest["memory"]["provenance"] for name in dataset.class_names}
    if prepared.references is not None:
        scorer, memories = _few_shot_scorer(config, world, prepared, provenance)

    expected = {name: sum(item["cls_name"] == name for item in dataset.items) for name in dataset.class_names}
    owners = {name: position % world.size for position, name in enumerate(dataset.class_names)}
    options = OutcomeOptions(metric_set, config.aupro, config.threshold_method, config.target_fpr,
                             outputs.report_k if outputs.report else None)
    collector = ClassMetricsCollector({name: count for name, count in expected.items() if owners[name] == world.rank},
                                      options)
    score_rows: list[ImageResult] = []
    dump_path = Path(outputs.dump if str(outputs.dump).endswith(".npz") else f"{outputs.dump}.npz") if outputs.dump \
        else None
    dump = None
    if dump_path is not None and world.is_main:
        with naming_errors(dump_path):  # a full disk names the dump, not where it is staged
            dump = DumpWriter(stage.beside(dump_path), len(dataset), config.model.image_size)
    scored_here = 0
    try:
        shard = world.shard(len(dataset))
        on_image = (lambda r: _save_vis(r, dataset, staging)) if outputs.vis else None
        batches = dataset_batches(dataset, shard, config.loader, device, progress=world.is_main)
        results = image_results(scorer, dataset, batches, on_image)
        rounds = world.rounds(len(dataset), config.loader.batch_size)
        for local, error in distributed.lockstep(world, results, rounds):
            local = local or []
            scored_here += len(local)
            outgoing = route(local, owners, world.size, arrays_to_main=bool(outputs.dump))
            for result in distributed.exchange(world, outgoing, error):
                if world.is_main:
                    score_rows.append(result)
                    if dump is not None:
                        dump.add(result)
                if owners[result.cls_name] == world.rank:
                    collector.add(result)
        parts = distributed.gather_to_main(world, (collector.outcomes, scored_here))
        if not world.is_main:
            return None
        gathered = {name: outcome for part, _ in parts for name, outcome in part.items()}
        check_complete(gathered, expected)
        if dump is not None:
            with naming_errors(dump_path):
                dump.close()
            logger.info("dump: %s", dump_path)
    finally:
        if dump is not None:
            dump.discard()

    outcomes = {name: gathered[name] for name in dataset.class_names if name in gathered}
    per_class = {name: outcome.values for name, outcome in outcomes.items()}
    table_columns = columns + list(EXTRA_COLUMNS) if outputs.extra_metrics else columns
    table = metrics.format_results_table(per_class, table_columns)
    logger.info("\n%s", table)
    mean = metrics.mean_over_classes(per_class, columns + list(EXTRA_COLUMNS))
    summary = {
        "dataset": config.dataset,
        "data_path": str(config.data_path),
        "checkpoint_path": str(config.scoring.checkpoint_path),
        **_model_hashes(config.scoring, provenance),
        "metric_set": metric_set,
        "columns": columns,
        "extra_columns": list(EXTRA_COLUMNS),
        "per_class": {name: _json_numbers(values) for name, values in per_class.items()},
        "mean": _json_numbers(mean),
        "per_defect_type": {name: {kind: _json_numbers(values) for kind, values in outcome.per_type.items()}
                            for name, outcome in outcomes.items()},
        "n_images": len(dataset),
        **_few_shot_summary(config, prepared.references),
        "world_size": world.size,
        "images_per_rank": [count for _, count in parts],
        "device": str(device),
        "precision": config.scoring.precision,
        "config": config.record.as_dict(),
        "versions": _versions(),
        "wall_time_s": round(time.time() - started, 3),
        "table": table,
    }
    score_rows.sort(key=lambda r: r.index)
    entries = {name: {**outcome.threshold_entry, "provenance": _with_memory(provenance, memories.get(name))}
               for name, outcome in outcomes.items()}
    # Together: a failure (a full disk) leaves all the old files or all the new ones.
    atomic_write_texts({staging / "results.json": json.dumps(summary, indent=2) + "\n",
                        staging / "scores.csv": scores_csv_text([(r.img_path, r.cls_name, r.label, r.score)
                                                                 for r in score_rows]),
                        staging / "thresholds.json": _thresholds_text(config, entries)})
    if outputs.report:
        report.write_report(staging / "report.html", _report_title(config), summary, table_columns,
                            {name: outcome.report_part for name, outcome in outcomes.items()}, entries)
    stage.commit()
    if outputs.report:
        logger.info("report: %s", stage.folder / "report.html")
    return summary


def _few_shot_summary(config: EvaluationConfig, references: dict[str, list[Reference]] | None) -> dict[str, object]:
    """results.json's ``few_shot`` part: where the references came from, and each one (path, SHA-256)."""
    if config.memory is None or references is None:
        return {}
    spec = config.memory
    source = "reference_path" if spec.reference_path else "test" if spec.references_from_test else "train"
    counts = {name: len(refs) for name, refs in references.items()}
    return {"few_shot": {
        "k_shot": spec.k_shot, "seed": config.model.seed, "source": source, **spec.settings.to_dict(),
        "references_per_class": counts,
        "references_left_out_of_evaluation": sum(counts.values()) if spec.references_from_test else 0,
        "references": {name: [ref.to_dict() for ref in refs] for name, refs in references.items()}}}


def _with_memory(provenance: dict[str, object], memory: dict | None) -> dict[str, object]:
    """A class's provenance: the run's, plus its memory where it has one (zero-shot files stay as they were)."""
    return provenance if memory is None else {**provenance, "memory": memory}


def _model_hashes(scoring: ScoringSpec, provenance: dict[str, object]) -> dict[str, object]:
    """SHA-256 of the checkpoint and the backbone (as the export recorded them, for an exported graph)."""
    hashes = {"checkpoint_sha256": provenance["checkpoint_sha256"], "backbone_sha256": provenance["backbone_sha256"]}
    if scoring.exported:
        hashes.update(runtime=scoring.runtime, model=str(scoring.model_dir))
    return hashes


def _json_numbers(values: dict[str, float]) -> dict[str, float | None]:
    return {key: _json_number(value) for key, value in values.items()}


def _thresholds_text(config: EvaluationConfig, classes: dict[str, dict]) -> str:
    """``thresholds.json``: the classes' thresholds, each with the provenance of the maps they were chosen on."""
    return thresholds.thresholds_text(
        classes, source="test.py", requested_method=config.threshold_method,
        target_fpr=config.target_fpr, dataset=config.dataset, data_path=str(config.data_path),
        checkpoint_path=str(config.scoring.checkpoint_path), backbone=str(config.model.backbone),
        image_size=config.model.image_size, features_list=list(config.model.features_list),
        sigma=config.scoring.sigma)


def _report_title(config: EvaluationConfig) -> str:
    return f"AnomalyCLIP on {config.dataset} ({config.data_path}), prompts {config.scoring.checkpoint_path}"


def _save_vis(result: ImageResult, dataset: AnomalyDataset, save_path: Path) -> None:
    """The overlay of one image, at the mirror of its path under the dataset root (:mod:`pipeline.naming`)."""
    relative = relative_to_root(result.image_file, dataset.root)
    save_overlay(result.image_file, result.anomaly_map, output_path(save_path / VIS_FOLDER, relative, OVERLAY_SUFFIX))


def main(argv: Sequence[str] | None = None) -> int:
    evaluate(parse_args(argv))
    return 0
