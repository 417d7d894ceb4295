"""A run's outputs in a folder are one run's: an interrupted re-run leaves the last run's files as they were.

``test_one_example.py`` and ``test.py`` write under ``save_path/.anomalyclip-staging`` and swap the
files in at the end, removing the previous run's (listed in ``.anomalyclip-outputs.json``). The
interruption is a real SIGTERM sent to a real run once its first overlay is written.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline import evaluation as test_cli
from pipeline import prediction as test_one_example
from pipeline.atomic import OUTPUTS_NAME, STAGING_NAME, StagedOutputs
from pipeline.cli import run_cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the lock and the appended log, with its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in (".anomalyclip.lock", "log.txt")}


def _images(synthetic_datasets, folder: Path, names: list[str]) -> Path:
    source = sorted((synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Anomaly").iterdir())
    folder.mkdir()
    for position, name in enumerate(names):
        Image.open(source[position % len(source)]).convert("RGB").save(folder / name)
    return folder


def _overlays(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.overlay.png"))


def test_sigterm_during_a_rerun_leaves_the_last_run(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    out = tmp_path / "out"
    first = _images(synthetic_datasets, tmp_path / "first", ["old_a.png", "old_b.png"])
    flags = ["--checkpoint_path", str(trained_checkpoint), "--save_path", str(out), "--threshold", "0.5",
             "--report", "--batch_size", "1", *design_args]
    assert run_cli(test_one_example.main, ["--image_path", str(first), *flags]) == 0
    before = listing(out)
    assert _overlays(out) == ["old_a.png.overlay.png", "old_b.png.overlay.png"]
    assert {"predictions.csv", "predictions.json", "report.html", OUTPUTS_NAME} <= set(before)

    second = _images(synthetic_datasets, tmp_path / "second", [f"new_{i:02d}.png" for i in range(40)])
    run = subprocess.Popen([sys.executable, "test_one_example.py", "--image_path", str(second), *flags],
                           cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / STAGING_NAME).glob("*.overlay.png")):  # mid-run: new overlays are being written
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it was interrupted"
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143, stderr
    assert listing(out) == before  # the first run's files, every byte; none of the second's
    assert not (out / STAGING_NAME).exists()

    third = _images(synthetic_datasets, tmp_path / "third", ["new_a.png"])
    assert run_cli(test_one_example.main, ["--image_path", str(third), *flags]) == 0
    assert _overlays(out) == ["new_a.png.overlay.png"]  # the first run's overlays went with it
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(third / "new_a.png"))
    assert json.loads((out / OUTPUTS_NAME).read_text())["files"] == [
        "new_a.png.overlay.png", "predictions.csv", "predictions.json", "report.html"]


def test_what_a_killed_run_staged_is_removed_by_the_next_run(tmp_path):
    """SIGKILL allows no clean-up: the staging folder stays aside (the folder's files untouched) until the next run."""
    out = tmp_path / "out"
    (out / STAGING_NAME / "sub").mkdir(parents=True)
    (out / STAGING_NAME / "sub" / "a.png.overlay.png").write_text("of the killed run")
    (out / "predictions.csv").write_text("of the last finished run")
    stage = StagedOutputs(out, test_one_example.EARLIER_OUTPUTS)
    (stage.prepare() / "predictions.csv").write_text("new")
    assert list((out / STAGING_NAME).rglob("*")) == [out / STAGING_NAME / "predictions.csv"]
    stage.commit()
    assert listing(out) == {OUTPUTS_NAME: b'{\n "files": [\n  "predictions.csv"\n ]\n}\n', "predictions.csv": b"new"}


def test_test_py_rerun_replaces_the_whole_run(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    """--vis overlays and the dump of a run are not left beside a re-run's tables that has none."""
    out = tmp_path / "out"
    common = ["--data_path", str(synthetic_datasets[1]), "--dataset", "visa", "--checkpoint_path",
              str(trained_checkpoint), "--save_path", str(out), "--num_workers", "0", *design_args]
    assert run_cli(test_cli.main, [*common, "--vis", "--dump", str(out / "dump.npz")]) == 0
    assert {path.split("/")[1] for path in _overlays(out)} == {"blobs", "weave"}
    assert (out / "dump.npz").is_file()
    (out / "mine.txt").write_text("the user's own file")
    assert run_cli(test_cli.main, [*common, "--classes", "blobs"]) == 0
    assert _overlays(out) == [] and not (out / "dump.npz").exists()  # this run wrote no overlays and no dump
    assert sorted(listing(out)) == [OUTPUTS_NAME, "mine.txt", "results.json", "scores.csv", "thresholds.json"]
    assert list(json.loads((out / "results.json").read_text())["per_class"]) == ["blobs"]


def test_a_folder_from_before_the_list_loses_the_old_outputs_only(tmp_path):
    """No .anomalyclip-outputs.json: files named as test_one_example.py names them are the previous run's."""
    out = tmp_path / "out"
    for name in ("predictions.csv", "sub/x.png.overlay.png", "sub/x.png.mask.png", "notes.txt", "sub/photo.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    stage = StagedOutputs(out, test_one_example.EARLIER_OUTPUTS)
    (stage.prepare() / "predictions.csv").write_text("new")
    stage.commit()
    assert listing(out) == {OUTPUTS_NAME: b'{\n "files": [\n  "predictions.csv"\n ]\n}\n', "notes.txt": b"notes.txt",
                            "predictions.csv": b"new", "sub/photo.png": b"sub/photo.png"}


def test_a_tampered_list_never_removes_files_outside_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    (out / OUTPUTS_NAME).write_text(json.dumps({"files": ["../precious.txt", str(outside)]}))
    stage = StagedOutputs(out)
    (stage.prepare() / "a.txt").write_text("a")
    stage.commit()
    assert outside.read_text() == "keep"


@pytest.mark.parametrize("dump_inside", [True, False])
def test_dump_is_swapped_in_with_the_tables(tmp_path, dump_inside):
    out = tmp_path / "out"
    target = (out if dump_inside else tmp_path / "elsewhere") / "dump.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("old")
    stage = StagedOutputs(out)
    stage.prepare()
    staged = stage.beside(target)
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text("new")
    assert target.read_text() == "old"  # until the commit
    stage.commit()
    assert target.read_text() == "new" and not staged.exists()
