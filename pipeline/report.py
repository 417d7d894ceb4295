"""``test.py --report``: one HTML page, readable offline, that shows why the numbers are what they are.

The page holds the results table, the thresholds, and per class: the image-level ROC and
precision-recall curves, the pixel-level PRO curve up to FPR 0.3 (the curve :func:`metrics.pixel_aupro`
integrates), histograms of the normal and anomalous image scores with the image threshold, and a
gallery of the highest-scored normal images (would-be false alarms) and the lowest-scored
anomalous images (would-be misses), each an overlay with the ground-truth contour in green.

The work is split so that memory stays bounded: :func:`class_report` runs on the rank that owns a
class while its maps are held and keeps only PNG bytes (:class:`ClassReport`); :func:`write_report`
runs on rank 0 and embeds those PNGs as base64 ``data:`` URIs, so ``report.html`` is one file.
Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

import metrics
from pipeline.atomic import atomic_write_text
from pipeline.visualize import overlay

PRO_MAX_FPR = 0.3
THUMBNAIL_SIDE = 192  # longest side of a gallery image, in pixels
CURVE_POINTS = 2000  # at most this many points of a curve are drawn
CONTOUR_RGB = (0, 255, 0)


@dataclass
class ClassData:
    """One complete class as the owner rank holds it (see ``test.ClassResults``).

    Attributes:
        masks: (N, H, W) ground truth, or None when the data have no masks.
        values: The class's metrics (``{column: value}``), for the figure titles.
        image_threshold: The class's image threshold (thresholds.json), or None.
    """

    cls_name: str
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None
    image_files: Sequence[str]
    img_paths: Sequence[str]
    types: Sequence[str]
    image_threshold: float | None
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass
class GalleryImage:
    """One gallery tile: an overlay PNG and its caption."""

    caption: str
    png: bytes


@dataclass
class ClassReport:
    """What the report shows of one class: small enough to gather to rank 0.

    Attributes:
        figures: ``{title: PNG bytes}`` in display order.
        false_alarms: The highest-scored normal images, highest first.
        misses: The lowest-scored anomalous images, lowest first.
    """

    cls_name: str
    figures: dict[str, bytes]
    false_alarms: list[GalleryImage]
    misses: list[GalleryImage]


# --------------------------------------------------------------------------------------------
# Figures (owner rank)
# --------------------------------------------------------------------------------------------


def _figure() -> Figure:
    figure = Figure(figsize=(4.0, 3.2), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure rendered by the Agg canvas, as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _thinned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most :data:`CURVE_POINTS` evenly spaced points of a curve, first and last kept."""
    if x.size <= CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, CURVE_POINTS).round().astype(np.int64))
    return x[keep], y[keep]


def _title(base: str, label: str, values: Mapping[str, float], key: str) -> str:
    """``base``, plus ``label`` and the metric ×100 where the class has it (e.g. "ROC (image) AUROC 93.1")."""
    value = values.get(key)
    return base if value is None or np.isnan(value) else f"{base} {label} {metrics.format_cell(value)}"


def roc_figure(labels: np.ndarray, scores: np.ndarray, values: Mapping[str, float]) -> bytes:
    """Image-level ROC curve (needs both labels)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, drawstyle="steps-post", color="tab:blue")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
             title=_title("ROC (image)", "AUROC", values, metrics.IMAGE_AUROC))
    return figure_png(figure)


def pr_figure(labels: np.ndarray, scores: np.ndarray, values: Mapping[str, float]) -> bytes:
    """Image-level precision-recall curve (needs both labels)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(recall, precision, drawstyle="steps-post", color="tab:orange")
    axes.axhline(float(np.mean(labels)), linestyle=":", color="grey")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=_title("Precision-recall (image)", "AP", values, metrics.IMAGE_AP))
    return figure_png(figure)


def pro_figure(curve: tuple[np.ndarray, np.ndarray], values: Mapping[str, float]) -> bytes:
    """Pixel-level PRO curve up to :data:`PRO_MAX_FPR` (from :func:`metrics.pro_curve`)."""
    fprs, pros = _thinned(*curve)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(fprs, pros, color="tab:green")
    axes.set(xlabel="false positive rate (pixels)", ylabel="per-region overlap", xlim=(0, PRO_MAX_FPR),
             ylim=(0, 1.02), title=_title("PRO (pixel)", "AUPRO", values, metrics.PIXEL_AUPRO))
    return figure_png(figure)


def histogram_figure(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> bytes:
    """Histograms of the normal and anomalous image scores, the image threshold as a line."""
    edges = np.histogram_bin_edges(scores, bins=20)
    figure = _figure()
    axes = figure.add_subplot()
    groups = [(scores[labels == label], name, colour)
              for label, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red"))]
    for chosen, name, colour in groups:
        if chosen.size:
            axes.hist(chosen, bins=edges, alpha=0.35, color=colour, label=f"{name} ({chosen.size})")
    for chosen, _, colour in groups:  # outlines on top of both fills: no group's bars hide behind the other's
        if chosen.size:
            axes.hist(chosen, bins=edges, histtype="step", linewidth=1.5, color=colour)
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.set(xlabel="image score", ylabel="images", title="Image scores")
    axes.legend(fontsize="small")
    return figure_png(figure)


def class_figures(data: ClassData, aupro_mode: str = "cflow") -> dict[str, bytes]:
    """``{title: PNG}``: ROC and PR where the class has both labels, PRO where it has masks, the histogram."""
    figures = {}
    labels, scores = np.asarray(data.labels), np.asarray(data.scores)
    if (labels == 0).any() and (labels == 1).any():
        figures["ROC"] = roc_figure(labels, scores, data.values)
        figures["Precision-recall"] = pr_figure(labels, scores, data.values)
    if data.masks is not None:
        curve = metrics.pro_curve(data.masks, data.maps, mode=aupro_mode, max_fpr=PRO_MAX_FPR)
        if curve is not None and curve[0].size:
            figures["PRO"] = pro_figure(curve, data.values)
    figures["Score histogram"] = histogram_figure(labels, scores, data.image_threshold)
    return figures


# --------------------------------------------------------------------------------------------
# Gallery (owner rank)
# --------------------------------------------------------------------------------------------


def gallery_picks(labels: np.ndarray, scores: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Indices of the ``k`` highest-scored normal images and the ``k`` lowest-scored anomalous ones.

    Ties keep the earlier image first.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    highest = normal[np.argsort(-scores[normal], kind="stable")][:k]
    lowest = anomalous[np.argsort(scores[anomalous], kind="stable")][:k]
    return [int(i) for i in highest], [int(i) for i in lowest]


def contour_overlay_png(image_file: str, anomaly_map: np.ndarray, mask: np.ndarray | None,
                        side: int = THUMBNAIL_SIDE) -> bytes:
    """The heat-map overlay (:func:`visualize.overlay`) shrunk to ``side``, ground-truth contour drawn."""
    blended = overlay(image_file, anomaly_map)
    scale = min(1.0, side / max(blended.shape[:2]))
    size = (max(1, round(blended.shape[1] * scale)), max(1, round(blended.shape[0] * scale)))
    thumbnail = np.ascontiguousarray(cv2.resize(blended, size, interpolation=cv2.INTER_AREA))
    if mask is not None and np.any(mask):
        small = cv2.resize((np.asarray(mask) != 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumbnail, contours, -1, CONTOUR_RGB, 1)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(thumbnail, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for the overlay of {image_file}")
    return encoded.tobytes()


def _tile(data: ClassData, index: int) -> GalleryImage:
    kind = "normal" if data.labels[index] == 0 else data.types[index]
    caption = f"{data.img_paths[index]} · {kind} · score {float(data.scores[index]):.4f}"
    mask = data.masks[index] if data.masks is not None else None
    return GalleryImage(caption, contour_overlay_png(data.image_files[index], data.maps[index], mask))


def class_report(data: ClassData, k: int, aupro_mode: str = "cflow") -> ClassReport:
    """Figures and gallery of one class, as PNG bytes."""
    highest_normal, lowest_anomalous = gallery_picks(data.labels, data.scores, k)
    return ClassReport(data.cls_name, class_figures(data, aupro_mode), [_tile(data, i) for i in highest_normal],
                       [_tile(data, i) for i in lowest_anomalous])


# --------------------------------------------------------------------------------------------
# The page (rank 0)
# --------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
section.class { border-top: 2px solid #444; margin-top: 2em; }
.figures img { margin: 0.3em; border: 1px solid #ddd; }
.gallery { display: flex; flex-wrap: wrap; gap: 0.6em; }
.gallery figure { margin: 0; width: 200px; font-size: 0.75em; word-break: break-all; }
.gallery img { width: 192px; height: auto; image-rendering: pixelated; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}">'


def _number(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return metrics.format_cell(value) if percent else f"{value:.6g}"


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def results_table(summary: Mapping[str, object], columns: Sequence[str]) -> str:
    """The results table (values ×100, one decimal, as printed), classes then ``mean``."""
    rows = [[name, *(_number(values.get(c)) for c in columns)] for name, values in summary["per_class"].items()]
    rows.append(["mean", *(_number(summary["mean"].get(c)) for c in columns)])
    return _table("results", ["objects", *columns], rows)


THRESHOLD_FIELDS = ("image_threshold", "pixel_threshold", "method", "pixel_method", "image_f1", "pixel_f1",
                    "normal_image_fpr", "normal_pixel_fpr", "warning")


def thresholds_table(class_thresholds: Mapping[str, Mapping[str, object]]) -> str:
    """One row per class of thresholds.json (thresholds as stored, F1 and FPRs as fractions).

    The warning column adds what the stored entry does not say: a threshold that flags every
    normal image (or every normal pixel) of the class, so its verdicts are all "anomalous".
    """
    rows = [[name, *("" if value is None else value if isinstance(value, str) else _number(value, percent=False)
                     for value in (entry.get(key) for key in THRESHOLD_FIELDS[:-1])), report_warning(entry)]
            for name, entry in class_thresholds.items()]
    return _table("thresholds", ["class", *THRESHOLD_FIELDS], rows)


def report_warning(entry: Mapping[str, object]) -> str:
    """The entry's warning, plus a note for each threshold that flags every normal image or pixel."""
    notes = [str(entry["warning"])] if entry.get("warning") else []
    for level, key in (("image", "normal_image_fpr"), ("pixel", "normal_pixel_fpr")):
        if entry.get(key) == 1:
            units = "image" if level == "image" else "pixel of the normal images"
            notes.append(f"{level}: the threshold flags every normal {units} (all verdicts 'anomalous'): "
                         "the normal and anomalous scores overlap; use --threshold_method normal_fpr")
    return "; ".join(notes)


def _gallery(title: str, tiles: Sequence[GalleryImage]) -> str:
    figures = "".join(f"<figure>{_img(t.png, t.caption)}<figcaption>{html.escape(t.caption)}</figcaption></figure>"
                      for t in tiles) or "<p>none</p>"
    return f"<h3>{html.escape(title)}</h3><div class=\"gallery\">{figures}</div>"


def class_section(name: str, part: ClassReport, per_type: Mapping[str, Mapping[str, float | None]],
                  image_threshold: float | None) -> str:
    """The section of one class: per-type AUROCs, figures, galleries."""
    types = _table(f"types-{html.escape(name)}", ["defect type", "image_auroc", "pixel_auroc"],
                   [[kind, _number(v.get(metrics.IMAGE_AUROC)), _number(v.get(metrics.PIXEL_AUROC))]
                    for kind, v in per_type.items()])
    figures = "".join(_img(png, f"{name}: {title}") for title, png in part.figures.items())
    at = "" if image_threshold is None else f" (threshold {image_threshold:.4g})"
    return (f'<section class="class" id="class-{html.escape(name)}"><h2>{html.escape(name)}</h2>{types}'
            f'<div class="figures">{figures}</div>'
            + _gallery(f"Highest-scored normal images: false alarms if ≥ the threshold{at}", part.false_alarms)
            + _gallery(f"Lowest-scored anomalous images: misses if < the threshold{at}", part.misses)
            + "</section>")


def render_html(title: str, summary: Mapping[str, object], columns: Sequence[str],
                class_reports: Mapping[str, ClassReport], class_thresholds: Mapping[str, Mapping[str, object]]) -> str:
    """The whole page, every image embedded."""
    sections = "".join(
        class_section(name, part, summary.get("per_defect_type", {}).get(name, {}),
                      class_thresholds.get(name, {}).get("image_threshold"))
        for name, part in class_reports.items())
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{summary.get('n_images', '')} images, metric set {html.escape(str(summary.get('metric_set', '')))}; "
            "values ×100; thresholds flag a value ≥ threshold.</p>"
            f"<h2>Results</h2>{results_table(summary, columns)}"
            f"<h2>Thresholds</h2>{thresholds_table(class_thresholds)}{sections}</body></html>\n")


def write_report(path: str | Path, title: str, summary: Mapping[str, object], columns: Sequence[str],
                 class_reports: Mapping[str, ClassReport],
                 class_thresholds: Mapping[str, Mapping[str, object]]) -> Path:
    """Write ``report.html`` atomically; returns its path.

    Args:
        path: Target file.
        title: Page title.
        summary: What results.json holds (``per_class``, ``mean``, ``per_defect_type``, ...).
        columns: Columns of the results table.
        class_reports: ``{class: ClassReport}`` in display order.
        class_thresholds: ``{class: thresholds.json entry}``.
    """
    return atomic_write_text(render_html(title, summary, columns, class_reports, class_thresholds), path)


@dataclass
class FolderTile:
    """One image of a folder report: its overlay (a path relative to the report) and its results."""

    path: str
    score: float
    overlay: str
    verdict: str | None = None
    defect_pixels: int | None = None


def folder_report_html(title: str, tiles: Sequence[FolderTile], thresholds_note: str) -> str:
    """A gallery of every image, highest score first, linking the overlays already written."""
    ordered = sorted(tiles, key=lambda tile: -tile.score)
    figures = []
    for tile in ordered:
        details = [f"score {tile.score:.4f}"]
        details += [tile.verdict] if tile.verdict else []
        details += [f"{tile.defect_pixels} defect px"] if tile.defect_pixels is not None else []
        caption = f"{tile.path} · {' · '.join(details)}"
        verdict_class = f' class="{tile.verdict}"' if tile.verdict else ""
        figures.append(f'<figure{verdict_class}><img src="{html.escape(tile.overlay)}" alt="{html.escape(tile.path)}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    counts = {v: sum(t.verdict == v for t in tiles) for v in ("anomalous", "normal")}
    summary = (f"{len(tiles)} images, highest score first; {thresholds_note}"
               + (f"; {counts['anomalous']} anomalous, {counts['normal']} normal" if any(counts.values()) else ""))
    style = _STYLE + "figure.anomalous figcaption { color: #b00; font-weight: bold; }\n"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>"
            f'<div class="gallery" id="gallery">{"".join(figures) or "<p>no images</p>"}</div></body></html>\n')


def write_folder_report(path: str | Path, title: str, tiles: Sequence[FolderTile], thresholds_note: str) -> Path:
    """Write a folder's ``report.html`` atomically (overlay links are relative to its folder)."""
    return atomic_write_text(folder_report_html(title, tiles, thresholds_note), path)
