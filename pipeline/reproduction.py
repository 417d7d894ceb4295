"""Did I reproduce the paper? Runs of ``test.py`` beside AnomalyCLIP's published numbers.

``tools/summarize.py results`` (the table that ends ``test.sh``) reads each run's ``results.json``
and puts, per dataset and metric, our value beside the paper's (Tables 1 and 2 of Zhou et al.,
ICLR 2024) or the released logs', with the difference in points, and the mean over the datasets
run. Several runs of one dataset (``SEEDS="1 2 3" bash test.sh``) are one row: their mean and
sample standard deviation (n - 1). A *base* run (``results/<dataset>`` of a plain ``bash test.sh``)
can stand beside them. Above the table one line names every setting that differs from the released
protocol, read from each run's ``config`` and, for the training settings, from its prompt
checkpoint's ``config`` (when the file is still the one the run scored, by SHA-256).

The published values live in ``pipeline/data/anomalyclip_paper_results.csv`` (percent; see its header).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline.config import DEFAULT_BACKBONE


PAPER_FILE = Path(__file__).resolve().parent / "data" / "anomalyclip_paper_results.csv"
SOURCES = ("paper", "released_log")
SOURCE_LABELS = {"paper": "paper", "released_log": "released log"}
METRICS = ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap")
CITATION = ("Zhou, Pang, Tian, He, Chen. AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly "
            "Detection. ICLR 2024 (arXiv 2310.18961), Tables 1 and 2")


# --------------------------------------------------------------------------------------------
# The published numbers
# --------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    """A dataset name compared loosely: ``MVTec AD``, ``mvtec_ad`` and ``mvtecad`` are one name."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass(frozen=True)
class PublishedTable:
    """One source's values: ``{test.sh name: {metric: percent}}``, and the names each dataset answers to.

    Attributes:
        source: ``paper`` or ``released_log``.
        values: Percent values per dataset (test.sh's folder name) and metric.
        aliases: ``{loose name: test.sh name}`` (the folder name and the paper's name).
    """

    source: str
    values: Mapping[str, Mapping[str, float]]
    aliases: Mapping[str, str]

    def lookup(self, dataset: str) -> Mapping[str, float]:
        """The values of ``dataset`` (by test.sh name or the paper's name); empty where the source is silent."""
        name = self.aliases.get(_key(dataset))
        return self.values.get(name, {}) if name else {}


def published_table(source: str = "paper", path: Path = PAPER_FILE) -> PublishedTable:
    """The published values of ``source`` from the data file.

    Raises:
        AnomalyCLIPError: An unknown source.
    """
    if source not in SOURCES:
        raise AnomalyCLIPError(f"--paper {source}: choose one of {', '.join(SOURCES)}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    values: dict[str, dict[str, float]] = {}
    aliases: dict[str, str] = {}
    for row in csv.DictReader(lines):
        aliases[_key(row["dataset"])] = aliases[_key(row["test_sh_name"])] = row["test_sh_name"]
        if row["source"] == source:
            values.setdefault(row["test_sh_name"], {})[row["metric"]] = float(row["value"])
    return PublishedTable(source, values, aliases)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What the comparison needs of one ``test.py`` run.

    Attributes:
        folder: The run's ``--save_path``.
        dataset: ``results.json``'s ``dataset``.
        mean: Mean metrics over the classes (fractions; ``None`` where undefined).
        config: The run's flags (``results.json``'s ``config``).
        training: The prompt checkpoint's ``config`` (train.py's flags) and ``epoch``, or ``None``
            when unknown (the original's checkpoints, a moved or changed file).
        backbone_sha256: SHA-256 of the backbone the run used.
        training_unknown: Why the training settings are not known (checkpoint gone or changed), else None.
    """

    folder: Path
    dataset: str
    mean: Mapping[str, float | None]
    config: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] | None = None
    backbone_sha256: str | None = None
    training_unknown: str | None = None

    @property
    def seed(self) -> int | None:
        """The seed of the run: the reference draw's with ``--k_shot``, else the prompts' training seed."""
        if self.config.get("k_shot") or self.training is None:
            return self.config.get("seed")
        return self.training.get("seed", self.config.get("seed"))


def load_run(folder: Path, read_checkpoint: bool = True) -> Run:
    """The run written by ``test.py`` in ``folder``.

    Raises:
        AnomalyCLIPError: ``results.json`` is missing, damaged or not test.py's.
    """
    path = folder / "results.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        run = Run(folder=folder, dataset=str(summary["dataset"]), mean=dict(summary["mean"]),
                  config=dict(summary.get("config") or {}), backbone_sha256=summary.get("backbone_sha256"))
        checkpoint = summary.get("checkpoint_path")
        expected_sha = summary.get("checkpoint_sha256")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as error:
        raise AnomalyCLIPError(f"{path} is not a results.json written by test.py ({type(error).__name__}: "
                               f"{error}); run test.py again or leave that folder out") from None
    if read_checkpoint and checkpoint:
        training, unknown = training_settings(Path(checkpoint), expected_sha)
        run = Run(run.folder, run.dataset, run.mean, run.config, training, run.backbone_sha256, unknown)
    return run


def training_settings(checkpoint: Path, expected_sha256: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """train.py's flags stored in ``checkpoint`` (plus ``"saved_epoch"``), if it is the file the run scored.

    Returns:
        ``(settings, None)``; ``(None, None)`` for a checkpoint without a config (the original's, e.g. the
        released ones); ``(None, why)`` when the file is gone, unreadable or changed since the run
        (another SHA-256 than results.json records).
    """
    if not checkpoint.is_file():
        return None, f"{checkpoint} not found"
    from AnomalyCLIP_lib.pretrained import sha256_of
    from AnomalyCLIP_lib.safe_load import load_tensors

    if expected_sha256 and sha256_of(checkpoint) != expected_sha256:
        return None, f"{checkpoint} changed since the run"
    try:
        loaded = load_tensors(checkpoint, "prompt checkpoint")
    except AnomalyCLIPError:
        return None, f"{checkpoint} unreadable"
    if not isinstance(loaded, dict) or not isinstance(loaded.get("config"), dict):
        return None, None
    return {**loaded["config"], "saved_epoch": loaded.get("epoch")}, None


# --------------------------------------------------------------------------------------------
# Settings that differ from the released protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """One setting of a run that is not the released protocol's (values as text)."""

    setting: str
    value: str
    released: str


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


# (setting as printed, results.json config key, released value, how a value is read)
EVALUATION_SETTINGS: tuple[tuple[str, str, Any, Any], ...] = (
    ("image size", "image_size", 518, int),
    ("features list", "features_list", [24], list),
    ("feature map layer", "feature_map_layer", 0, _first),
    ("sigma", "sigma", 4.0, float),
    ("AUPRO variant", "aupro", "cflow", str),
    ("precision", "precision", "fp32", str),
    ("depth", "depth", 9, int),
    ("n_ctx", "n_ctx", 12, int),
    ("t_n_ctx", "t_n_ctx", 4, int),
    ("runtime", "runtime", "torch", str),
)
TRAINING_SETTINGS: tuple[tuple[str, str, Any, Any], ...] = (
    ("training batch size", "batch_size", 8, int),
    ("training epochs", "epoch", 15, int),
    ("learning rate", "learning_rate", 1e-3, float),
    ("training image size", "image_size", 518, int),
    ("training features list", "features_list", [24], list),
    ("image loss only", "image_loss_only", False, bool),
)


def _compare(table: Sequence[tuple[str, str, Any, Any]], values: Mapping[str, Any]) -> list[Difference]:
    found = []
    for setting, key, released, read in table:
        if values.get(key) is None:
            continue
        value = read(values[key])
        if value != read(released):
            found.append(Difference(setting, _text(value), _text(released)))
    return found


def few_shot_text(config: Mapping[str, Any]) -> str | None:
    """The few-shot setting of a run (``4 from the train normals; memory weight 0.5, layers 6 12 18 24, dpam``), or
    ``None`` for a zero-shot run (no ``k_shot``/``reference_path`` in its config: results.json of before them)."""
    k_shot = int(config.get("k_shot") or 0)
    reference_path = config.get("reference_path")
    if not k_shot and not reference_path:
        return None
    if reference_path:
        source = f"from {reference_path}" if k_shot else f"all of {reference_path}"
    else:
        source = "from the test normals" if config.get("references_from_test") else "from the train normals"
    memory = [f"{label} {_text(config[key])}" for label, key in (("memory weight", "memory_weight"),
                                                                 ("layers", "memory_layers"),
                                                                 ("stream", "memory_stream")) if key in config]
    return " ".join(filter(None, [str(k_shot) if k_shot else None, source])) + (
        f"; {', '.join(memory)}" if memory else "")


def differences(run: Run) -> list[Difference]:
    """Every setting of ``run`` that differs from the released protocol (flags absent from its record count as
    the released ones: results.json files older than a flag). A backbone file whose SHA-256 is the registered
    ViT-L/14@336px's is the released backbone."""
    from AnomalyCLIP_lib.pretrained import backbone_sha256

    config = run.config
    found = _compare(EVALUATION_SETTINGS, config)
    backbone = config.get("backbone")
    if backbone and backbone != DEFAULT_BACKBONE and run.backbone_sha256 != backbone_sha256(DEFAULT_BACKBONE):
        found.append(Difference("backbone", str(backbone), DEFAULT_BACKBONE))
    if config.get("classes"):
        found.append(Difference("classes", _text(config["classes"]), "all"))
    few_shot = few_shot_text(config)
    if few_shot:
        found.append(Difference("k-shot", few_shot, "0, zero-shot"))
    if config.get("tile_size") is not None:
        overlap = f", overlap {_text(config['tile_overlap'])}" if config.get("tile_overlap") is not None else ""
        found.append(Difference("tiling", f"{_text(config['tile_size'])} px{overlap}", "off"))
    if run.training is not None:
        found += _compare(TRAINING_SETTINGS, run.training)
        saved = run.training.get("saved_epoch")
        if saved is not None and int(saved) != 15:
            found.append(Difference("checkpoint epoch", str(saved), "15"))
    return found


def settings_line(runs: Sequence[Run]) -> tuple[str, list[dict]]:
    """The line above the table, and its entries for summary.json.

    A difference found in only some datasets names them (``sigma 2 (released 4) on mvtec``).
    """
    datasets = list(dict.fromkeys(run.dataset for run in runs))
    where: dict[Difference, list[str]] = {}
    for run in runs:
        for difference in differences(run):
            where.setdefault(difference, [])
            if run.dataset not in where[difference]:
                where[difference].append(run.dataset)
    entries = [{"setting": d.setting, "value": d.value, "released": d.released,
                "datasets": names} for d, names in where.items()]
    unknown = list(dict.fromkeys(f"{run.dataset}: {run.training_unknown}" for run in runs if run.training_unknown))
    note = f"; training settings not known ({'; '.join(unknown)})" if unknown else ""
    if not entries:
        return "settings: the released protocol (nothing differs)" + note, entries
    parts = [f"{e['setting']} {e['value']} (released {e['released']})"
             + ("" if len(e["datasets"]) == len(datasets) else f" on {', '.join(e['datasets'])}") for e in entries]
    return "settings that differ from the released protocol: " + "; ".join(parts) + note, entries


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Mean and sample standard deviation (percent) of one metric over the runs of a dataset."""

    mean: float | None
    std: float | None
    n: int


def stats(values: Iterable[float | None]) -> Stats:
    """Mean and sample standard deviation (n - 1) of the defined fractions in ``values``, in percent."""
    kept = [100.0 * v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return Stats(None, None, 0)
    return Stats(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None, len(kept))


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.dataset, []).append(run)
    return grouped


def comparison_rows(runs: Sequence[Run], published: PublishedTable,
                    base: Sequence[Run] = ()) -> list[dict[str, Any]]:
    """One row per dataset and metric: ``ours`` (mean over its runs), ``std``, ``n``, ``base``, ``paper``,
    ``diff`` (ours - paper, points); ``None`` where unknown. A metric is listed where we or the source have it."""
    bases = _groups(base)
    rows = []
    for dataset, group in _groups(runs).items():
        reported = published.lookup(dataset)
        for metric in METRICS:
            ours = stats(run.mean.get(metric) for run in group)
            theirs = reported.get(metric)
            if ours.n == 0 and theirs is None:
                continue
            base_stats = stats(run.mean.get(metric) for run in bases.get(dataset, []))
            diff = ours.mean - theirs if ours.mean is not None and theirs is not None else None
            rows.append({"dataset": dataset, "metric": metric, "ours": ours.mean, "std": ours.std, "n": ours.n,
                         "base": base_stats.mean, "paper": theirs, "diff": diff})
    return rows


def mean_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per metric, the mean over the datasets run: over those the source reports too (so ``diff`` is the mean
    difference), else over all with our value and no paper value."""
    means = []
    for metric in METRICS:
        ours = [row for row in rows if row["metric"] == metric and row["ours"] is not None]
        both = [row for row in ours if row["paper"] is not None]
        chosen = both or ours
        if not chosen:
            continue
        with_base = [row["base"] for row in chosen if row["base"] is not None]
        means.append({
            "dataset": f"mean of {len(chosen)}", "metric": metric, "datasets": [row["dataset"] for row in chosen],
            "ours": statistics.fmean(row["ours"] for row in chosen), "std": None, "n": None,
            "base": statistics.fmean(with_base) if len(with_base) == len(chosen) else None,
            "paper": statistics.fmean(row["paper"] for row in both) if both else None,
            "diff": statistics.fmean(row["diff"] for row in both) if both else None})
    return means


@dataclass(frozen=True)
class Comparison:
    """The whole summary: what the text table, summary.json and the HTML page show."""

    source: str
    settings: str
    settings_entries: list[dict]
    rows: list[dict[str, Any]]
    means: list[dict[str, Any]]
    runs: list[Run]
    base: list[Run]

    @property
    def repeated(self) -> bool:
        """Whether some dataset has several runs (mean and standard deviation columns)."""
        return any((row["n"] or 0) > 1 for row in self.rows)

    def seeds_line(self) -> str | None:
        """Which runs make each mean (``runs per dataset: ...; seeds ...``), when a dataset has several."""
        if not self.repeated:
            return None
        groups = _groups(self.runs)
        counts = sorted({len(group) for group in groups.values()})
        seeds = sorted({run.seed for run in self.runs if run.seed is not None})
        kind = "reference-draw" if any(run.config.get("k_shot") for run in self.runs) else "training"
        seeds_text = f"; {kind} seeds {', '.join(map(str, seeds))}" if seeds else ""
        return (f"runs per dataset: {'/'.join(map(str, counts))}{seeds_text}; ours = mean, std = sample standard "
                "deviation (n - 1) over the runs")

    def as_json(self) -> dict[str, Any]:
        """summary.json: the table's rows (percent, unrounded) and where they come from."""
        return {
            "version": 1, "compared_with": self.source, "published": CITATION, "settings": self.settings,
            "settings_differ": self.settings_entries, "seeds": self.seeds_line(),
            "rows": self.rows, "mean": self.means,
            "runs": [{"folder": str(run.folder), "dataset": run.dataset, "seed": run.seed} for run in self.runs],
            "base_runs": [{"folder": str(run.folder), "dataset": run.dataset} for run in self.base],
        }


def compare(runs: Sequence[Run], source: str = "paper", base: Sequence[Run] = ()) -> Comparison:
    """The comparison of ``runs`` (and ``base`` runs) with ``source``'s values."""
    rows = comparison_rows(runs, published_table(source), base)
    settings, entries = settings_line(runs)
    return Comparison(source, settings, entries, rows, mean_rows(rows), list(runs), list(base))


# --------------------------------------------------------------------------------------------
# Text and HTML
# --------------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the table (percent, one decimal; std two; diff signed)."""
    repeated, with_base = comparison.repeated, bool(comparison.base)
    headers = ["dataset", "metric", "ours", *(["std", "n"] if repeated else []), *(["base"] if with_base else []),
               SOURCE_LABELS[comparison.source], "diff"]
    cells = []
    for row in [*comparison.rows, *comparison.means]:
        line = [row["dataset"], row["metric"], _cell(row["ours"])]
        if repeated:
            line += [_cell(row["std"], ".2f"), "-" if row["n"] is None else str(row["n"])]
        if with_base:
            line.append(_cell(row["base"]))
        line += [_cell(row["paper"]), _cell(row["diff"], "+.1f")]
        cells.append(line)
    return headers, cells


def render_text(comparison: Comparison) -> str:
    """The settings line, the seeds line (several runs per dataset) and the pipe table."""
    headers, cells = table_rows(comparison)
    table = tabulate(cells, headers=headers, tablefmt="pipe", disable_numparse=True,
                     colalign=("left", "left", *("right",) * (len(headers) - 2)))
    lines = [comparison.settings]
    seeds = comparison.seeds_line()
    if seeds:
        lines.append(seeds)
    label = SOURCE_LABELS[comparison.source]
    lines.append(f"values in percent; diff = ours - {label} in points; '-': not reported or not run"
                 + ("; base: the runs given with --base" if comparison.base else ""))
    return "\n".join([*lines, table])


def bars_figure(comparison: Comparison, metric: str) -> bytes | None:
    """Bars of ours (with the standard deviation), the base runs' (when given) and the source's values, per dataset.

    A missing value draws no bar.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.report import figure_png

    rows = [row for row in comparison.rows if row["metric"] == metric]
    if not rows:
        return None
    series = [("ours", "ours", "tab:blue"), *([("base", "base", "tab:orange")] if comparison.base else []),
              ("paper", SOURCE_LABELS[comparison.source], "tab:grey")]
    width = 0.8 / len(series)
    figure = Figure(figsize=(max(4.0, 0.8 * len(rows) + 1.5), 3.4), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for offset, (key, label, colour) in enumerate(series):
        kept = [(i, row) for i, row in enumerate(rows) if row[key] is not None]
        errors = [row["std"] or 0.0 for _, row in kept] if key == "ours" else None
        axes.bar([i - 0.4 + width * (offset + 0.5) for i, _ in kept], [row[key] for _, row in kept], width=width,
                 yerr=errors, capsize=3, color=colour, label=label)
    axes.set_xticks(range(len(rows)), [row["dataset"] for row in rows], rotation=45, ha="right")
    axes.set(ylabel="percent", ylim=(0, 115), title=metric)
    axes.legend(fontsize="small", loc="upper center", ncol=len(series))
    return figure_png(figure)


def render_html(comparison: Comparison, title: str = "AnomalyCLIP: our runs beside the paper") -> str:
    """The page: the settings, the table and one bar chart per metric (PNG embedded as base64)."""
    from pipeline.report import _STYLE, _img, _table

    headers, cells = table_rows(comparison)
    figures = [(metric, bars_figure(comparison, metric)) for metric in METRICS]
    charts = "".join(_img(png, f"{metric}: ours and {comparison.source}") for metric, png in figures if png)
    notes = [comparison.settings, comparison.seeds_line(), f"published values: {CITATION}"]
    paragraphs = "".join(f"<p>{html.escape(note)}</p>" for note in notes if note)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{paragraphs}"
            f"{_table('summary', headers, cells)}<div class=\"figures\" id=\"bars\">{charts}</div></body></html>\n")
