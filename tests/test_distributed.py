"""torchrun test.py with two gloo processes on the CPU, against one process."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import test as evaluation
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # each test starts torchrun with two processes


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _test_args(target, checkpoint, save_path, design_args):
    return ["--data_path", str(target), "--checkpoint_path", str(checkpoint), "--save_path", str(save_path),
            "--batch_size", "2", "--num_workers", "0", "--dump", str(save_path / "dump.npz"), *design_args]


def test_two_processes_equal_one(synthetic_datasets, design_args, trained_checkpoint, tmp_path):
    target = synthetic_datasets[1]
    one, two = tmp_path / "one", tmp_path / "two"
    assert evaluation.main(_test_args(target, trained_checkpoint, one, design_args)) == 0
    completed = _torchrun(["test.py", *_test_args(target, trained_checkpoint, two, design_args)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (one / "scores.csv").read_bytes() == (two / "scores.csv").read_bytes()
    a, b = (json.loads((p / "results.json").read_text()) for p in (one, two))
    assert a["per_class"] == b["per_class"] and a["mean"] == b["mean"] and a["table"] == b["table"]
    n_images = a["n_images"]
    assert a["world_size"] == 1 and a["images_per_rank"] == [n_images]
    assert b["world_size"] == 2 and b["images_per_rank"] == [(n_images + 1) // 2, n_images // 2]
    dump_one, dump_two = np.load(one / "dump.npz"), np.load(two / "dump.npz")
    for key in dump_one.files:
        assert np.array_equal(dump_one[key], dump_two[key]), key
    assert (two / "log.txt").read_text().count("| mean") == 1  # rank 0 alone writes the log


def test_user_error_on_one_rank_ends_both(synthetic_datasets, design_args, trained_checkpoint, tmp_path):
    import shutil

    target = tmp_path / "target"
    shutil.copytree(synthetic_datasets[1], target)
    meta = json.loads((target / "meta.json").read_text())
    items = [item for cls in meta["test"].values() for item in cls]
    (target / items[1]["img_path"]).write_bytes(b"not an image")  # index 1: scored by rank 1
    completed = _torchrun(["test.py", *_test_args(target, trained_checkpoint, tmp_path / "out", design_args)])
    assert completed.returncode != 0
    # A progress bar may stand right before the line, so count occurrences rather than lines.
    error_lines = re.findall(r"(?<![A-Za-z_])error: [^\n]*", completed.stderr)
    assert len(error_lines) == 1, completed.stderr[-3000:]
    assert "cannot read image file" in error_lines[0] and items[1]["img_path"].split("/")[-1] in error_lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_train_refuses_torchrun_with_one_line(synthetic_datasets, design_args, tmp_path):
    completed = _torchrun(["train.py", "--train_data_path", str(synthetic_datasets[0]), "--save_path",
                           str(tmp_path / "ck"), "--epoch", "1", *design_args])
    assert completed.returncode != 0
    # Every rank refuses before any collective, each with the one line.
    assert re.findall(r"(?<![A-Za-z_])error: train.py runs in one process", completed.stderr), completed.stderr[-2000:]
    assert not list((tmp_path / "ck").glob("epoch_*.pth"))
