"""tools/summarize.py on hand-made results.json and log.txt files; expected cells worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "summarize.py"


def _load():
    spec = importlib.util.spec_from_file_location("summarize_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load()


def write_results(folder: Path, dataset: str, metric_set: str, mean: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"dataset": dataset, "metric_set": metric_set, "mean": mean,
                                                     "per_class": {}}))
    return folder


def cells(table: str) -> list[list[str]]:
    """The stripped cells of a pipe table, header first, without the alignment row."""
    lines = table.strip().splitlines()
    assert lines[1].startswith("|:") or lines[1].startswith("|-")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert summarize.main(list(argv)) == 0
    return capsys.readouterr().out


def test_results_table_in_percent_with_one_decimal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = write_results(tmp_path / "mvtec", "mvtec", "image-pixel-level",
                         {"pixel_auroc": 0.91249, "pixel_aupro": 0.8, "image_auroc": 0.95051, "image_ap": 1.0})
    image_only = write_results(tmp_path / "visa", "visa", "image-level", {"image_auroc": 0.5, "image_ap": 0.123})
    (tmp_path / "no_results").mkdir()  # a run that wrote nothing is left out
    out = run(capsys, "results", str(full), str(tmp_path / "no_results"), str(image_only))
    # 91.249 -> 91.2, 95.051 -> 95.1, 12.3; metrics the run has not got print "-".
    assert cells(out) == [
        ["dataset", "metrics", "pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"],
        ["mvtec", "image-pixel-level", "91.2", "80.0", "95.1", "100"],
        ["visa", "image-level", "-", "-", "50", "12.3"],
    ]


def test_results_table_text_of_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = write_results(tmp_path / "r", "btad", "image-pixel-level",
                            {"pixel_auroc": 0.479, "pixel_aupro": 0.118, "image_auroc": 0.5625, "image_ap": 0.70749})
    assert run(capsys, "results", str(run_dir)) == (
        "| dataset   | metrics           |   pixel_auroc |   pixel_aupro |   image_auroc |   image_ap |\n"
        "|:----------|:------------------|--------------:|--------------:|--------------:|-----------:|\n"
        "| btad      | image-pixel-level |          47.9 |          11.8 |          56.2 |       70.7 |\n"
    )


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


def test_command_line_from_another_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As train.sh and test.sh call it: ``python tools/summarize.py KIND DIR ...`` with relative folders."""
    write_results(tmp_path / "r", "mpdd", "image-level", {"image_auroc": 0.75, "image_ap": 0.8})
    completed = subprocess.run([sys.executable, str(SCRIPT), "results", "r"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert cells(completed.stdout)[1] == ["mpdd", "image-level", "-", "-", "75", "80"]
    refused = subprocess.run([sys.executable, str(SCRIPT), "scores", "r"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'scores'" in refused.stderr


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
