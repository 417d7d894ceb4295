"""Small output faults (issue 22, item 9): quoted TSV paths, error lines after a progress bar, report warnings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline import report
from pipeline.cli import run_cli
from pipeline.prediction import Prediction, print_line


def test_a_tab_or_newline_in_a_file_name_is_quoted(capsys):
    print_line(Prediction(Path("parts/a\tb\nc.png"), 0.5, overlay=Path("out/a\tb\nc.png.overlay.png"),
                          verdict="normal"))
    print_line(Prediction(Path("parts/plain.png"), 0.25, overlay=Path("out/plain.png.overlay.png")))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    fields = lines[0].split("\t")
    assert fields == ['"parts/a\\tb\\nc.png"', "0.5000", "normal", '"out/a\\tb\\nc.png.overlay.png"']
    assert json.loads(fields[0]) == "parts/a\tb\nc.png"
    assert lines[1].split("\t") == ["parts/plain.png", "0.2500", "out/plain.png.overlay.png"]  # unchanged


def test_an_error_after_an_open_progress_bar_starts_a_new_line(capsys):
    from tqdm import tqdm

    def main(argv):
        bar = tqdm(total=10, desc="scoring")  # writes to the captured stderr, left open by the error
        bar.update(3)
        raise AnomalyCLIPError("image x.png is broken")

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err
    # The bar is closed (its line ended) before the error, and not redrawn after it.
    assert "scoring" in err and err.endswith("\nerror: image x.png is broken\n")


def test_an_error_without_a_bar_is_its_own_line_alone(capsys):
    def main(argv):
        raise AnomalyCLIPError("no bar here")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: no bar here\n"


def test_a_threshold_flagging_every_normal_image_is_said_in_the_report():
    entry = {"image_threshold": 0.1, "pixel_threshold": 0.2, "method": "f1", "pixel_method": "f1",
             "image_f1": 0.67, "pixel_f1": 0.3, "normal_image_fpr": 1.0, "normal_pixel_fpr": 0.05, "warning": None}
    table = report.thresholds_table({"blobs": entry})
    assert "the threshold flags every normal image" in table and "pixel: the threshold" not in table
    assert "flags every normal" not in report.thresholds_table({"blobs": {**entry, "normal_image_fpr": 0.5}})


def _has_colour(png: bytes, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=1) <= tolerance).any())


def test_histogram_bars_of_both_groups_show_where_they_overlap():
    """Overlapping groups: each group's own colour, unblended, must still be drawn (its outline)."""
    labels = np.array([0] * 30 + [1] * 10)
    scores = np.concatenate([np.linspace(0.2, 0.6, 30), np.linspace(0.4, 0.8, 10)])
    png = report.histogram_figure(labels, scores, 0.5)
    assert _has_colour(png, (31, 119, 180)) and _has_colour(png, (214, 39, 40))  # tab:blue, tab:red at full strength
