"""test.py --report: the HTML parses, embeds every figure of every class, and renders in headless chromium."""

import base64
import csv
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pipeline import report
from pipeline import evaluation

REPORT_K = 2
CLASSES = ("blobs", "weave")
FIGURES_PER_CLASS = 4  # ROC, precision-recall, PRO, score histogram (both labels and masks in every class)


class _Page(HTMLParser):
    """Tables (id -> rows of cell texts), sections (id -> images), all <img> srcs and figcaptions."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.section_images: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.captions: list[str] = []
        self._table = self._section = None
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "section":
            self._section = attrs.get("id")
            self.section_images[self._section] = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
            if self._section is not None:
                self.section_images[self._section].append(attrs.get("src", ""))
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "section":
            self._section = None
        elif tag == "figcaption":
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._caption is not None:
            self._caption.append(data)


def _decoded_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


@pytest.fixture(scope="module")
def report_run(synthetic_datasets, trained_checkpoint, design_args, tmp_path_factory):
    save_path = tmp_path_factory.mktemp("report")
    assert evaluation.main(["--data_path", str(synthetic_datasets[1]), "--save_path", str(save_path),
                            "--checkpoint_path", str(trained_checkpoint), "--num_workers", "0", "--batch_size", "4",
                            "--report", "--report_k", str(REPORT_K), "--extra_metrics", *design_args]) == 0
    page = _Page()
    page.feed((save_path / "report.html").read_text(encoding="utf-8"))
    return save_path, page


def test_report_holds_the_results_table(report_run):
    save_path, page = report_run
    summary = json.loads((save_path / "results.json").read_text())
    rows = page.tables["results"]
    columns = summary["columns"] + summary["extra_columns"]
    assert rows[0] == ["objects", *columns]
    assert [row[0] for row in rows[1:]] == [*CLASSES, "mean"]
    for row, values in zip(rows[1:], [*(summary["per_class"][n] for n in CLASSES), summary["mean"]]):
        assert row[1:] == [str(np.round(values[c] * 100, decimals=1)) for c in columns]
    thresholds = json.loads((save_path / "thresholds.json").read_text())["classes"]
    assert [row[0] for row in page.tables["thresholds"][1:]] == list(CLASSES)
    for row in page.tables["thresholds"][1:]:
        assert float(row[1]) == pytest.approx(thresholds[row[0]]["image_threshold"], rel=1e-5)


def test_report_embeds_the_figures_and_gallery_of_every_class(report_run):
    _, page = report_run
    assert page.images and all(src for src in page.images)
    for src in page.images:
        _decoded_png(src)
    for name in CLASSES:
        images = page.section_images[f"class-{name}"]
        assert len(images) == FIGURES_PER_CLASS + 2 * REPORT_K
        for src in images[FIGURES_PER_CLASS:]:  # gallery tiles: overlays at most THUMBNAIL_SIDE
            assert max(_decoded_png(src).size) <= report.THUMBNAIL_SIDE
    assert not list(report_run[0].glob(".report.html.*"))  # written atomically


def test_gallery_shows_the_highest_normal_and_lowest_anomalous_scores(report_run):
    save_path, page = report_run
    with open(save_path / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = []
    for name in CLASSES:
        chosen = [r for r in rows if r["cls_name"] == name]
        normal = sorted((r for r in chosen if r["label"] == "0"), key=lambda r: -float(r["score"]))[:REPORT_K]
        anomalous = sorted((r for r in chosen if r["label"] == "1"), key=lambda r: float(r["score"]))[:REPORT_K]
        expected += [r["img_path"] for r in normal + anomalous]
    assert [caption.split(" · ")[0] for caption in page.captions] == expected


def test_gallery_picks_and_contour_by_hand(tmp_path):
    labels = np.array([0, 1, 0, 1, 0, 1])
    scores = np.array([0.5, 0.2, 0.9, 0.2, 0.5, 0.7])
    assert report.gallery_picks(labels, scores, 2) == ([2, 0], [1, 3])  # ties keep the earlier image
    assert report.gallery_picks(labels, scores, 0) == ([], [])
    image_file = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(image_file)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    tile = np.asarray(Image.open(io.BytesIO(report.contour_overlay_png(str(image_file), np.zeros((32, 32)), mask))))
    green = (tile[..., 0] == 0) & (tile[..., 1] == 255) & (tile[..., 2] == 0)
    assert green[8, 8:24].all() and green[23, 8:24].all() and not green[12:20, 12:20].any()


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------

_PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(image => !image.complete || image.naturalWidth === 0);
  document.body.setAttribute("data-images", document.images.length);
  document.body.setAttribute("data-broken", broken.length);
});
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI is set, so the browser test must run")
        pytest.skip(message)
    return found


def _headless(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed


def test_report_renders_in_headless_chromium(report_run, tmp_path):
    browser = _chromium()
    save_path, page = report_run
    # The DOM after loading, with a probe that counts images the browser failed to decode.
    probed = tmp_path / "probed.html"
    probed.write_text((save_path / "report.html").read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                      encoding="utf-8")
    dom = _headless(browser, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    assert '<table id="results">' in dom and 'id="class-weave"' in dom
    assert f'data-images="{len(page.images)}"' in dom and 'data-broken="0"' in dom
    # The report itself, rendered to a PNG: not blank.
    shot = tmp_path / "report.png"
    _headless(browser, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}",
              (save_path / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1600, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables, plots and heat maps, not one colour
    assert (pixels < 128).any(axis=2).mean() > 0.01  # dark ink on the page
