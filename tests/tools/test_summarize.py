"""tools/summarize.py on hand-made results.json and log.txt files; expected cells worked out by hand.

The paper's values in these tests are typed in from Tables 1 and 2 of the paper (and the released
logs), not read from the project's data file, so a wrong number there fails them.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "summarize.py"
HEADERS = ["dataset", "metric", "ours", "paper", "diff"]
SEED_HEADERS = ["dataset", "metric", "ours", "std", "n", "paper", "diff"]


def _load():
    spec = importlib.util.spec_from_file_location("summarize_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load()


def write_results(folder: Path, dataset: str, metric_set: str, mean: dict[str, float | None],
                  config: dict | None = None, **extra: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"dataset": dataset, "metric_set": metric_set, "mean": mean,
                                                     "per_class": {}, "config": config or {}, **extra}))
    return folder


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def cells(text: str) -> list[list[str]]:
    """The stripped cells of the pipe table in ``text``, header first, without the alignment row."""
    lines = table_lines(text)
    assert lines[1].startswith("|:") or lines[1].startswith("|-")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]


def lines_before_table(text: str) -> list[str]:
    return text[:text.index("\n|")].splitlines()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert summarize.main(list(argv)) == 0
    return capsys.readouterr().out


def test_each_dataset_beside_the_paper_with_the_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # MVTec AD in the paper: pixel AUROC 91.1, AUPRO 81.4, image AUROC 91.5, AP 96.2; HeadCT: image 93.4 / 91.6.
    mvtec = write_results(tmp_path / "mvtec", "mvtec", "image-pixel-level",
                          {"pixel_auroc": 0.91249, "pixel_aupro": 0.8, "image_auroc": 0.95051, "image_ap": 1.0})
    headct = write_results(tmp_path / "headct", "headct", "image-level", {"image_auroc": 0.9, "image_ap": 0.9})
    (tmp_path / "no_results").mkdir()  # a run that wrote nothing is left out
    out = run(capsys, "results", str(mvtec), str(tmp_path / "no_results"), str(headct))
    assert cells(out) == [
        HEADERS,
        ["mvtec", "pixel_auroc", "91.2", "91.1", "+0.1"],  # 91.249 - 91.1 = +0.149
        ["mvtec", "pixel_aupro", "80.0", "81.4", "-1.4"],
        ["mvtec", "image_auroc", "95.1", "91.5", "+3.6"],  # 95.051 - 91.5 = 3.551
        ["mvtec", "image_ap", "100.0", "96.2", "+3.8"],
        ["headct", "image_auroc", "90.0", "93.4", "-3.4"],
        ["headct", "image_ap", "90.0", "91.6", "-1.6"],
        # means over the datasets run that the paper reports: pixel ones of mvtec alone, image ones of both
        ["mean of 1", "pixel_auroc", "91.2", "91.1", "+0.1"],
        ["mean of 1", "pixel_aupro", "80.0", "81.4", "-1.4"],
        ["mean of 2", "image_auroc", "92.5", "92.5", "+0.1"],  # (95.051 + 90) / 2 = 92.5255; (91.5 + 93.4) / 2 = 92.45
        ["mean of 2", "image_ap", "95.0", "93.9", "+1.1"],  # (100 + 90) / 2 = 95; (96.2 + 91.6) / 2 = 93.9
    ]
    assert lines_before_table(out)[0] == "settings: the released protocol (nothing differs)"


def test_what_the_paper_does_not_report_shows_a_dash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # ISIC is reported at pixel level only (89.7 / 78.4); "parts" is not in the paper at all.
    isic = write_results(tmp_path / "isic", "isic", "image-pixel-level",
                         {"pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_auroc": 0.7, "image_ap": None})
    own = write_results(tmp_path / "parts", "parts", "image-level", {"image_auroc": 0.75, "image_ap": 0.5})
    out = run(capsys, "results", str(isic), str(own))
    assert cells(out)[1:] == [
        ["isic", "pixel_auroc", "90.0", "89.7", "+0.3"],
        ["isic", "pixel_aupro", "80.0", "78.4", "+1.6"],
        ["isic", "image_auroc", "70.0", "-", "-"],
        ["parts", "image_auroc", "75.0", "-", "-"],
        ["parts", "image_ap", "50.0", "-", "-"],
        ["mean of 1", "pixel_auroc", "90.0", "89.7", "+0.3"],
        ["mean of 1", "pixel_aupro", "80.0", "78.4", "+1.6"],
        ["mean of 2", "image_auroc", "72.5", "-", "-"],  # no paper value: our mean over every dataset run
        ["mean of 1", "image_ap", "50.0", "-", "-"],
    ]


def test_a_metric_the_paper_reports_but_the_run_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    visa = write_results(tmp_path / "visa", "VisA", "image-level", {"image_auroc": 0.8, "image_ap": 0.85})
    # the paper's name (VisA) finds test.sh's row (visa): 95.5, 87.0, 82.1, 85.4
    assert cells(run(capsys, "results", str(visa)))[1:5] == [
        ["VisA", "pixel_auroc", "-", "95.5", "-"],
        ["VisA", "pixel_aupro", "-", "87.0", "-"],
        ["VisA", "image_auroc", "80.0", "82.1", "-2.1"],
        ["VisA", "image_ap", "85.0", "85.4", "-0.4"],
    ]


def test_released_log_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # released logs: MVTec AD 91.1 / 81.4 / 91.6 / 96.4; MPDD is in the paper only.
    mvtec = write_results(tmp_path / "mvtec", "mvtec", "image-pixel-level",
                          {"pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_auroc": 0.9, "image_ap": 0.9})
    mpdd = write_results(tmp_path / "mpdd", "mpdd", "image-level", {"image_auroc": 0.7, "image_ap": 0.8})
    out = run(capsys, "results", "--paper", "released_log", str(mvtec), str(mpdd))
    table = cells(out)
    assert table[0] == ["dataset", "metric", "ours", "released log", "diff"]
    assert table[1:7] == [
        ["mvtec", "pixel_auroc", "90.0", "91.1", "-1.1"],
        ["mvtec", "pixel_aupro", "80.0", "81.4", "-1.4"],
        ["mvtec", "image_auroc", "90.0", "91.6", "-1.6"],
        ["mvtec", "image_ap", "90.0", "96.4", "-6.4"],
        ["mpdd", "image_auroc", "70.0", "-", "-"],
        ["mpdd", "image_ap", "80.0", "-", "-"],
    ]


def test_seeds_give_mean_and_sample_standard_deviation(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    values = {1: (0.80, 0.90), 2: (0.84, 0.93), 3: (0.85, 0.90)}  # image AUROC, AP of headct per training seed
    folders = [str(write_results(tmp_path / f"seed_{s}" / "headct", "headct", "image-level",
                                 {"image_auroc": a, "image_ap": p}, {"seed": s})) for s, (a, p) in values.items()]
    base = write_results(tmp_path / "headct", "headct", "image-level", {"image_auroc": 0.88, "image_ap": 0.875})
    out = run(capsys, "results", *folders, "--base", str(base))
    # by hand: AUROC 80, 84, 85 -> mean 83, deviations -3, 1, 2 -> sum of squares 14 / (3 - 1) = 7 -> std 2.6458
    # AP 90, 93, 90 -> mean 91, deviations -1, 2, -1 -> 6 / 2 = 3 -> std 1.7321; paper: 93.4 / 91.6
    assert cells(out) == [
        ["dataset", "metric", "ours", "std", "n", "base", "paper", "diff"],
        ["headct", "image_auroc", "83.0", "2.65", "3", "88.0", "93.4", "-10.4"],
        ["headct", "image_ap", "91.0", "1.73", "3", "87.5", "91.6", "-0.6"],
        ["mean of 1", "image_auroc", "83.0", "-", "-", "88.0", "93.4", "-10.4"],
        ["mean of 1", "image_ap", "91.0", "-", "-", "87.5", "91.6", "-0.6"],
    ]
    assert "runs per dataset: 3; training seeds 1, 2, 3" in lines_before_table(out)[1]


def test_settings_that_differ_are_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    released = {"image_size": 518, "features_list": [24], "feature_map_layer": [0, 1, 2, 3], "sigma": 4.0,
                "aupro": "cflow", "precision": "fp32", "backbone": "ViT-L/14@336px", "seed": 111}
    changed = {**released, "image_size": 336, "features_list": [6, 12, 18, 24], "sigma": 2.0, "aupro": "exact",
               "precision": "fp16", "k_shot": 4, "reference_path": "refs/", "memory_weight": 0.5,
               "memory_layers": [6, 24], "memory_stream": "dpam", "tile_size": 256, "tile_overlap": 0.25}
    plain = write_results(tmp_path / "visa", "visa", "image-level", {"image_auroc": 0.8}, released)
    other = write_results(tmp_path / "mvtec", "mvtec", "image-level", {"image_auroc": 0.8}, changed)
    assert lines_before_table(run(capsys, "results", str(plain)))[0] == (
        "settings: the released protocol (nothing differs)")
    line = lines_before_table(run(capsys, "results", str(plain), str(other)))[0]
    assert line == ("settings that differ from the released protocol: image size 336 (released 518) on mvtec; "
                    "features list 6 12 18 24 (released 24) on mvtec; sigma 2 (released 4) on mvtec; "
                    "AUPRO variant exact (released cflow) on mvtec; precision fp16 (released fp32) on mvtec; "
                    "k-shot 4 from refs/; memory weight 0.5, layers 6 24, stream dpam (released 0, zero-shot) "
                    "on mvtec; "
                    "tiling 256 px, overlap 0.25 (released off) on mvtec")


def test_training_settings_come_from_the_checkpoint_the_run_scored(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from AnomalyCLIP_lib.pretrained import sha256_of

    checkpoint = tmp_path / "ck" / "epoch_10.pth"
    checkpoint.parent.mkdir()
    torch.save({"prompt_learner": {}, "epoch": 10, "config": {"batch_size": 16, "epoch": 10, "learning_rate": 0.001,
                                                               "image_size": 518, "features_list": [24],
                                                               "image_loss_only": False, "seed": 7}}, checkpoint)
    run_dir = write_results(tmp_path / "run", "mvtec", "image-level", {"image_auroc": 0.9}, {"seed": 111},
                            checkpoint_path=str(checkpoint), checkpoint_sha256=sha256_of(checkpoint))
    line = lines_before_table(run(capsys, "results", str(run_dir)))[0]
    assert line == ("settings that differ from the released protocol: training batch size 16 (released 8); "
                    "training epochs 10 (released 15); checkpoint epoch 10 (released 15)")
    # The file was replaced since the run: its settings are not the run's, so none are claimed, and the line says so.
    torch.save({"prompt_learner": {}, "epoch": 15, "config": {"batch_size": 32}}, checkpoint)
    assert lines_before_table(run(capsys, "results", str(run_dir)))[0] == (
        f"settings: the released protocol (nothing differs); training settings not known (mvtec: {checkpoint} "
        "changed since the run)")
    checkpoint.unlink()
    assert lines_before_table(run(capsys, "results", str(run_dir)))[0].endswith(
        f"training settings not known (mvtec: {checkpoint} not found)")
    # A checkpoint without a config (the original's format, as the released ones): nothing to say.
    torch.save({"prompt_learner": {}}, checkpoint)
    run_dir = write_results(tmp_path / "released", "mvtec", "image-level", {"image_auroc": 0.9}, {},
                            checkpoint_path=str(checkpoint), checkpoint_sha256=sha256_of(checkpoint))
    assert lines_before_table(run(capsys, "results", str(run_dir)))[0] == (
        "settings: the released protocol (nothing differs)")


def test_summary_json_and_report_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeds = [write_results(tmp_path / f"s{s}" / "mvtec", "mvtec", "image-pixel-level",
                           {"pixel_auroc": 0.90 + s / 100, "pixel_aupro": 0.7, "image_auroc": 0.9, "image_ap": 0.95},
                           {"seed": s, "sigma": 2.0}) for s in (1, 3)]
    json_path, page_path = tmp_path / "out" / "summary.json", tmp_path / "out" / "summary.html"
    text = run(capsys, "results", *map(str, seeds), "--json", str(json_path), "--report", str(page_path))
    summary = json.loads(json_path.read_text())
    assert summary["compared_with"] == "paper" and summary["settings"] == lines_before_table(text)[0]
    assert summary["settings_differ"] == [{"setting": "sigma", "value": "2", "released": "4", "datasets": ["mvtec"]}]
    first = summary["rows"][0]
    assert first["dataset"] == "mvtec" and first["metric"] == "pixel_auroc" and first["n"] == 2
    assert math.isclose(first["ours"], 92.0) and math.isclose(first["std"], math.sqrt(2.0))  # 91, 93
    assert math.isclose(first["paper"], 91.1) and math.isclose(first["diff"], 0.9)
    assert [row["metric"] for row in summary["mean"]] == ["pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"]
    assert [run["seed"] for run in summary["runs"]] == [1, 3]

    page = _Page()
    page.feed(page_path.read_text(encoding="utf-8"))
    assert page.tables["summary"] == cells(text)  # the same table as printed
    assert len(page.images) == 4  # one bar chart per metric
    for src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
        assert image.format == "PNG" and image.width > 100


@pytest.mark.slow  # a headless browser
def test_report_page_renders_in_headless_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.pipeline.test_report import _PROBE, _chromium, _headless

    browser = _chromium()
    runs = [write_results(tmp_path / name, name, "image-level", {"image_auroc": 0.8, "image_ap": 0.7})
            for name in ("headct", "brainmri")]
    page_path = tmp_path / "summary.html"
    run(capsys, "results", *map(str, runs), "--report", str(page_path))
    probed = tmp_path / "probed.html"
    probed.write_text(page_path.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _headless(browser, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    assert '<table id="summary">' in dom and 'data-images="2"' in dom and 'data-broken="0"' in dom


class _Page(HTMLParser):
    """Tables (id -> rows of cell texts) and image sources."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_train_table_takes_each_runs_last_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done, started, empty = tmp_path / "done", tmp_path / "started", tmp_path / "empty"
    for folder in (done, started, empty, tmp_path / "no_log"):
        folder.mkdir()
    (done / "log.txt").write_text("training on 12 images\n"
                                  "epoch [1/3], loss:1.2345, image_loss:0.5000\n"
                                  "epoch [2/3], loss:0.9876, image_loss:0.4000\n"
                                  "epoch [3/3], loss:0.5555, image_loss:0.3210\n")
    (started / "log.txt").write_text("epoch [1/15], loss:nan, image_loss:0.6931\n")
    (empty / "log.txt").write_text("training on 12 images\n")  # killed before the first epoch ended
    out = run(capsys, "train", str(done), str(started), str(empty), str(tmp_path / "no_log"))
    assert cells(out) == [
        ["checkpoints", "epoch", "loss", "image_loss"],
        [str(done), "3/3", "0.5555", "0.3210"],  # as the log wrote them
        [str(started), "1/15", "nan", "0.6931"],
        [str(empty), "-", "-", "-"],
    ]


@pytest.mark.parametrize("kind", ["results", "train"])
def test_nothing_to_summarise(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    assert summarize.main([kind, str(tmp_path / "absent"), str(tmp_path)]) == 0
    captured = capsys.readouterr()
    wanted = "results.json" if kind == "results" else "log.txt"
    assert captured.out == "no runs to summarise\n"
    assert captured.err.splitlines() == [f"skipped {tmp_path / 'absent'}: no such folder",
                                         f"skipped {tmp_path}: no {wanted} in it"]
    assert run(capsys, kind) == "no runs to summarise\n"


def test_command_line_from_another_folder(tmp_path: Path) -> None:
    """As train.sh and test.sh call it: ``python tools/summarize.py KIND DIR ...`` with relative folders."""
    write_results(tmp_path / "r", "mpdd", "image-level", {"image_auroc": 0.75, "image_ap": 0.8})
    completed = subprocess.run([sys.executable, str(SCRIPT), "results", "--json", "s.json", "r"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    # MPDD's pixel rows (the paper's 96.5 / 88.7) come first, without our value: the run was image-level
    assert cells(completed.stdout)[1:4] == [["mpdd", "pixel_auroc", "-", "96.5", "-"],
                                            ["mpdd", "pixel_aupro", "-", "88.7", "-"],
                                            ["mpdd", "image_auroc", "75.0", "77.0", "-2.0"]]
    assert (tmp_path / "s.json").is_file()
    refused = subprocess.run([sys.executable, str(SCRIPT), "scores", "r"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'scores'" in refused.stderr
    refused = subprocess.run([sys.executable, str(SCRIPT), "results", "--paper", "table9", "r"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'table9'" in refused.stderr


def test_a_damaged_results_json_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{\n")
    completed = subprocess.run([sys.executable, str(SCRIPT), "results", str(run)], capture_output=True, text=True,
                               cwd=tmp_path, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        f"error: {run / 'results.json'} is not a results.json written by test.py (JSONDecodeError: Expecting "
        "property name enclosed in double quotes: line 2 column 1 (char 2)); run test.py again or leave that "
        "folder out"]
