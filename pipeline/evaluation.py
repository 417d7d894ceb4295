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

import argparse
import csv
import io
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline import distributed
import metrics
from pipeline import report
from pipeline import thresholds
from AnomalyCLIP_lib.constants import DPAM_LAYER
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, config_from_args
from pipeline.engine import ExportedScorer
from AnomalyCLIP_lib.precision import PRECISIONS
from deploy.runtime import RUNTIMES
from AnomalyCLIP_lib.pretrained import backbone_sha256, sha256_of
from pipeline.atomic import atomic_write_texts, remove_leftovers
from pipeline.cli import add_sigma_arg, parse_noting_given
from dataset import AnomalyDataset, loader_batches
from pipeline.dump import DumpWriter
from pipeline.cli import add_loader_args, add_model_args, cli_parser, check_args, run_cli
from utils import get_logger, project_version, setup_seed
from pipeline.loading import load_model_and_prompts, resolve_device, resolve_num_workers
from pipeline.visualize import save_overlay

METRIC_SETS = ("image-level", "pixel-level", "image-pixel-level")
# Decision metrics: always in results.json, in the table with --extra_metrics.
EXTRA_COLUMNS = (metrics.IMAGE_F1_MAX, metrics.PIXEL_AP, metrics.PIXEL_F1_MAX)
UNNAMED_DEFECT_TYPE = "unspecified"  # the defect type of an anomalous item whose specie_name is empty

logger = logging.getLogger("anomalyclip.test")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("Evaluate AnomalyCLIP prompts zero-shot on a dataset.")
    parser.add_argument("--data_path", default="./data/visa", help="dataset root holding meta.json")
    parser.add_argument("--save_path", default="./results", help="folder for log.txt, results.json, scores.csv")
    parser.add_argument("--checkpoint_path", default=None,
                        help="prompt checkpoint (ours or the original's); not needed with --runtime")
    parser.add_argument("--dataset", default="mvtec", help="dataset name (for the log and results.json)")
    add_model_args(parser)
    parser.add_argument("--metrics", choices=METRIC_SETS, default=None,
                        help="metric set (default: what the dataset's labels and masks allow)")
    add_sigma_arg(parser)
    parser.add_argument("--aupro", choices=metrics.AUPRO_MODES, default="cflow",
                        help="cflow: the released variant (default); exact: MVTec AD's official definition")
    add_loader_args(parser, "images per forward pass")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16/bf16 autocast on CUDA only")
    parser.add_argument("--runtime", choices=("torch", *RUNTIMES), default="torch",
                        help="score through an exported graph (export.py) with ONNX Runtime or OpenVINO")
    parser.add_argument("--model", default=None, help="with --runtime: the folder export.py wrote")
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
    args = parse_noting_given(parser, argv)
    check_args(args, more=_check_test_flags)
    return args


def _check_test_flags(args: argparse.Namespace) -> None:
    """test.py's own flag checks (after the shared ones)."""
    if args.report_k < 0:
        raise AnomalyCLIPError(f"--report_k {args.report_k} must be >= 0")
    if args.dump and Path(args.dump).is_dir():
        raise AnomalyCLIPError(f"--dump {args.dump} is a folder; give a file name, e.g. {Path(args.dump) / 'dump.npz'}")
    thresholds.check_target_fpr(args.target_fpr)


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


def score_batches(
    inference: AnomalyCLIPInference | ExportedScorer,
    dataset: AnomalyDataset,
    indices: Sequence[int],
    args: argparse.Namespace,
    device: torch.device,
    on_image: Callable[[ImageResult], None] | None = None,
    progress: bool = True,
) -> Iterator[list[ImageResult]]:
    """Per-image results of the items ``indices`` of ``dataset``, one list per batch, in that order.

    Args:
        on_image: Called with each result as it is made (overlays of the rank that scored it).
        progress: Show the progress bar (rank 0 only).
    """
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    position = 0
    with loader_batches(loader) as batches:
        for batch in tqdm(batches, total=len(loader), desc="scoring", unit="batch", disable=not progress):
            prediction = inference.predict(batch["img"].to(device, non_blocking=True))
            masks = batch["img_mask"][:, 0].numpy().astype(np.uint8)
            results = []
            for i in range(len(prediction.scores)):
                index = indices[position]
                position += 1
                item = dataset.items[index]
                result = ImageResult(index=index, img_path=item["img_path"],
                                     image_file=batch["img_path"][i], cls_name=batch["cls_name"][i],
                                     label=int(batch["anomaly"][i]), score=float(prediction.scores[i]),
                                     anomaly_map=prediction.maps[i].numpy(), mask=masks[i],
                                     specie_name=str(item.get("specie_name") or ""))
                if on_image is not None:
                    on_image(result)
                results.append(result)
            yield results


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


def evaluate(args: argparse.Namespace) -> dict[str, object] | None:
    """Run the evaluation; returns what results.json holds (``None`` on ranks other than 0)."""
    world, device = distributed.setup(args.device, resolve_device)
    try:
        with distributed.main_holds(world, args.save_path, "--save_path"):
            return _evaluate(args, world, device)
    finally:
        distributed.finish(world)


def _prepare(args: argparse.Namespace, device: torch.device
             ) -> tuple[AnomalyDataset, str, AnomalyCLIPInference | ExportedScorer]:
    """The dataset, its metric set and what scores it (the inference module, or an exported graph)."""
    exported = None
    if args.runtime != "torch":
        exported = ExportedScorer(args.model, args.runtime)
    dataset = AnomalyDataset(args.data_path, image_size=args.image_size, split="test", class_names=args.classes)
    metric_set = choose_metric_set(dataset, args.metrics)
    if args.threshold_method == "normal_fpr" and not dataset.any_normal:
        raise AnomalyCLIPError(f"--threshold_method normal_fpr needs normal images and {dataset.root} has none; "
                               "use --threshold_method f1")
    if exported is not None:
        return dataset, metric_set, exported
    model, prompt_learner, _ = load_model_and_prompts(args, device, args.checkpoint_path)
    return dataset, metric_set, AnomalyCLIPInference.from_model(model, prompt_learner,
                                                                config_from_args(args, DPAM_LAYER))


def _evaluate(args: argparse.Namespace, world: distributed.World, device: torch.device) -> dict[str, object] | None:
    started = time.time()
    setup_seed(args.seed)
    args.num_workers = resolve_num_workers(args.num_workers, device)
    save_path = Path(args.save_path)
    logger = get_logger(save_path, "anomalyclip.test", main_process=world.is_main)
    if world.is_main:
        for name in ("results.json", "scores.csv", "thresholds.json", "report.html"):
            remove_leftovers(save_path, name)  # of a run killed while writing
    dataset, metric_set, inference = distributed.together(world, lambda: _prepare(args, device))
    columns = metrics.metric_columns(metric_set)

    expected = {name: sum(item["cls_name"] == name for item in dataset.items) for name in dataset.class_names}
    owners = {name: position % world.size for position, name in enumerate(dataset.class_names)}
    options = OutcomeOptions(metric_set, args.aupro, args.threshold_method, args.target_fpr,
                             args.report_k if args.report else None)
    collector = ClassMetricsCollector({name: count for name, count in expected.items() if owners[name] == world.rank},
                                      options)
    score_rows: list[ImageResult] = []
    dump = DumpWriter(args.dump, len(dataset), args.image_size) if args.dump and world.is_main else None
    scored_here = 0
    try:
        shard = world.shard(len(dataset))
        on_image = (lambda r: _save_vis(r, save_path)) if args.vis else None
        batches = score_batches(inference, dataset, shard, args, device, on_image, progress=world.is_main)
        for local, error in distributed.lockstep(world, batches, world.rounds(len(dataset), args.batch_size)):
            local = local or []
            scored_here += len(local)
            outgoing = route(local, owners, world.size, arrays_to_main=bool(args.dump))
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
            logger.info("dump: %s", dump.close())
    finally:
        if dump is not None:
            dump.discard()

    outcomes = {name: gathered[name] for name in dataset.class_names if name in gathered}
    per_class = {name: outcome.values for name, outcome in outcomes.items()}
    table_columns = columns + list(EXTRA_COLUMNS) if args.extra_metrics else columns
    table = metrics.format_results_table(per_class, table_columns)
    logger.info("\n%s", table)
    mean = metrics.mean_over_classes(per_class, columns + list(EXTRA_COLUMNS))
    summary = {
        "dataset": args.dataset,
        "data_path": str(args.data_path),
        "checkpoint_path": str(args.checkpoint_path),
        **_model_hashes(args, inference),
        "metric_set": metric_set,
        "columns": columns,
        "extra_columns": list(EXTRA_COLUMNS),
        "per_class": {name: _json_numbers(values) for name, values in per_class.items()},
        "mean": _json_numbers(mean),
        "per_defect_type": {name: {kind: _json_numbers(values) for kind, values in outcome.per_type.items()}
                            for name, outcome in outcomes.items()},
        "n_images": len(dataset),
        "world_size": world.size,
        "images_per_rank": [count for _, count in parts],
        "device": str(device),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "versions": _versions(),
        "wall_time_s": round(time.time() - started, 3),
        "table": table,
    }
    score_rows.sort(key=lambda r: r.index)
    entries = {name: outcome.threshold_entry for name, outcome in outcomes.items()}
    # Together: a failure (a full disk) leaves all the old files or all the new ones.
    atomic_write_texts({save_path / "results.json": json.dumps(summary, indent=2) + "\n",
                        save_path / "scores.csv": scores_csv_text([(r.img_path, r.cls_name, r.label, r.score)
                                                                   for r in score_rows]),
                        save_path / "thresholds.json": _thresholds_text(args, entries)})
    if args.report:
        path = report.write_report(save_path / "report.html", _report_title(args), summary, table_columns,
                                   {name: outcome.report_part for name, outcome in outcomes.items()}, entries)
        logger.info("report: %s", path)
    return summary


def _model_hashes(args: argparse.Namespace, inference: AnomalyCLIPInference | ExportedScorer) -> dict[str, str]:
    """SHA-256 of the checkpoint and the backbone (as the export recorded them, for an exported graph)."""
    if isinstance(inference, ExportedScorer):
        manifest = inference.exported.manifest
        return {"checkpoint_sha256": manifest["checkpoint"]["sha256"],
                "backbone_sha256": manifest["backbone"]["sha256"],
                "runtime": args.runtime, "model": str(args.model)}
    return {"checkpoint_sha256": sha256_of(args.checkpoint_path), "backbone_sha256": backbone_sha256(args.backbone)}


def _json_numbers(values: dict[str, float]) -> dict[str, float | None]:
    return {key: _json_number(value) for key, value in values.items()}


def _thresholds_text(args: argparse.Namespace, classes: dict[str, dict]) -> str:
    """``thresholds.json`` with what the thresholds depend on (model, image size, sigma)."""
    return thresholds.thresholds_text(
        classes, source="test.py", requested_method=args.threshold_method,
        target_fpr=args.target_fpr, dataset=args.dataset, data_path=str(args.data_path),
        checkpoint_path=str(args.checkpoint_path), backbone=str(args.backbone), image_size=args.image_size,
        features_list=list(args.features_list), sigma=args.sigma)


def _report_title(args: argparse.Namespace) -> str:
    return f"AnomalyCLIP on {args.dataset} ({args.data_path}), prompts {args.checkpoint_path}"


def _save_vis(result: ImageResult, save_path: Path) -> None:
    # The image's full name stays in the overlay's (000.png -> 000.png.overlay.png), so 000.png and
    # 000.jpg in one folder get two overlays, as in test_one_example.py.
    relative = Path(result.img_path)
    save_overlay(result.image_file, result.anomaly_map,
                 save_path / "imgs" / result.cls_name / relative.parent.name / f"{relative.name}.overlay.png")


def main(argv: Sequence[str] | None = None) -> int:
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
