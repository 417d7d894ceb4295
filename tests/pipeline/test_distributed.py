"""torchrun test.py and train.py with two gloo processes on the CPU, against one process."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import training as train
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # each test starts torchrun with two processes


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc),
                           *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _test_args(target, checkpoint, save_path, design_args):
    return ["--data_path", str(target), "--checkpoint_path", str(checkpoint), "--save_path", str(save_path),
            "--batch_size", "2", "--num_workers", "0", "--dump", str(save_path / "dump.npz"), *design_args]


def test_two_processes_equal_one(synthetic_datasets, design_args, trained_checkpoint, tmp_path):
    target = synthetic_datasets[1]
    one, two = tmp_path / "one", tmp_path / "two"
    # Both at one thread per process: on some CPUs (AMD's MKL paths) float sums depend on the thread count.
    for save_path, nproc in ((one, 1), (two, 2)):
        completed = _torchrun(["test.py", *_test_args(target, trained_checkpoint, save_path, design_args)], nproc)
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


def _train_args(data_root, save_path, design_args, *extra):
    return ["--train_data_path", str(data_root), "--save_path", str(save_path), "--epoch", "2", "--batch_size", "4",
            "--num_workers", "0", *design_args, *extra]


def test_train_two_processes_equal_one(synthetic_datasets, design_args, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Both under the same thread count: the prompt optimisation's float sums depend on it.
    for save_path, nproc in ((one, 1), (two, 2)):
        completed = _torchrun(["train.py", *_train_args(synthetic_datasets[0], save_path, design_args)], nproc)
        assert completed.returncode == 0, completed.stderr[-3000:]
    for epoch in (1, 2):
        a = torch.load(one / f"epoch_{epoch}.pth", weights_only=True)["prompt_learner"]
        b = torch.load(two / f"epoch_{epoch}.pth", weights_only=True)["prompt_learner"]
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    log = (two / "log.txt").read_text()
    n_images = len(train.AnomalyDataset(synthetic_datasets[0], image_size=32, split="test"))
    # The caching pass was split: each rank encoded every second image.
    assert f"images per rank: [{(n_images + 1) // 2}, {n_images // 2}]" in log
    assert log.count("epoch [2/2]") == 1  # rank 0 alone trains and logs


def test_train_error_on_one_rank_ends_both(synthetic_datasets, design_args, tmp_path):
    import shutil

    data = tmp_path / "aux"
    shutil.copytree(synthetic_datasets[0], data)
    meta = json.loads((data / "meta.json").read_text())
    items = [item for cls in meta["test"].values() for item in cls]
    (data / items[1]["img_path"]).write_bytes(b"not an image")  # index 1: encoded by rank 1
    completed = _torchrun(["train.py", *_train_args(data, tmp_path / "ck", design_args)])
    assert completed.returncode != 0
    error_lines = re.findall(r"(?<![A-Za-z_])error: [^\n]*", completed.stderr)
    assert len(error_lines) == 1, completed.stderr[-3000:]
    assert "cannot read image file" in error_lines[0]
    assert not list((tmp_path / "ck").glob("epoch_*.pth"))


def test_train_cache_dir_under_a_file_is_one_line_over_the_ranks(synthetic_datasets, design_args, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    flags = ["--cache_memory_gb", "0", "--cache_dir", str(not_a_folder / "sub")]
    completed = _torchrun(["train.py", *_train_args(synthetic_datasets[0], tmp_path / "ck", design_args, *flags)])
    assert completed.returncode != 0
    error_lines = re.findall(r"(?<![A-Za-z_])error: [^\n]*", completed.stderr)
    assert error_lines == [f"error: --cache_dir {not_a_folder / 'sub'} lies under {not_a_folder}, which is a file; "
                           "give a folder"], completed.stderr[-3000:]


def test_guarded_shares_user_errors_and_raises_the_rest():
    """On a rank of several, a user error (ours, or a full disk) becomes the line to share; bugs still raise."""
    import errno

    from AnomalyCLIP_lib.errors import AnomalyCLIPError
    from pipeline.distributed import World, guarded

    world = World(rank=1, size=2)

    def fail(exc):
        def work():
            raise exc
        return work

    assert guarded(world, lambda: 7) == (7, None)
    assert guarded(world, fail(AnomalyCLIPError("bad image x.png"))) == (None, "bad image x.png")
    full = OSError(errno.ENOSPC, "No space left on device", "/out/epoch_1.pth")
    assert guarded(world, fail(full)) == (None, "cannot write /out/epoch_1.pth: the disk is full: free space there "
                                                "or choose another folder")
    with pytest.raises(OSError):
        guarded(world, fail(OSError(errno.EPIPE, "Broken pipe")))
    with pytest.raises(ValueError):
        guarded(world, fail(ValueError("a bug")))


@pytest.mark.parametrize("bad", [["--sigma", "-1"], ["--sigmaa", "4"]], ids=["bad-value", "unknown-flag"])
def test_bad_command_line_is_printed_once_over_the_ranks(synthetic_datasets, design_args, trained_checkpoint, tmp_path,
                                                        bad):
    """Every rank finds a bad command line alike; rank 0 alone says so (argparse's usage block neither)."""
    target = synthetic_datasets[1]
    completed = _torchrun(["test.py", *_test_args(target, trained_checkpoint, tmp_path / "out", design_args), *bad])
    assert completed.returncode != 0
    error_lines = re.findall(r"(?<![A-Za-z_])error: [^\n]*", completed.stderr)
    assert len(error_lines) == 1 and bad[0] in error_lines[0], completed.stderr[-3000:]
    assert "usage:" not in completed.stderr


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "launch.py", "--standalone", "--nproc_per_node", "2", *args], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bad, expected", [(["--seed", "-1"], "error: --seed -1 must be in"),
                                           (["--data_path", "nowhere"], "error: dataset root nowhere does not exist")],
                         ids=["flag", "missing-dataset"])
def test_launcher_ends_a_user_error_as_its_one_line(synthetic_datasets, design_args, trained_checkpoint, tmp_path,
                                                   bad, expected):
    """torchrun adds a traceback and a failure summary after the line; launch.py adds nothing and exits with 2."""
    argv = ["test.py", *_test_args(synthetic_datasets[1], trained_checkpoint, tmp_path / "out", design_args), *bad]
    completed = _launch(argv)
    assert completed.returncode == 2, completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.parametrize("argv, expected", [
    ([], "error: the following arguments are required: training_script, training_script_args; usage: python "
         "launch.py [torchrun flags] SCRIPT.py [its flags], see launch.py --help"),
    (["--nproc_per_node", "2", "nope.py"], "error: the script nope.py does not exist; usage: python launch.py"),
    (["--nproc_per_node", "x", "test.py"], "error: torchrun: Unsupported nproc_per_node value: x; see launch.py"),
    (["--nnodes", "3:1", "test.py"], "error: torchrun: min_nodes must be > 0 and <= max_nodes, got min_nodes=3"),
], ids=["no_script", "script_absent", "nproc_not_a_number", "nnodes_min_above_max"])
def test_launcher_mistakes_are_one_line(argv, expected):
    """torchrun's own usage block or traceback (or one line per rank from python) before; no rank starts."""
    completed = subprocess.run([sys.executable, "launch.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert completed.returncode == 2, completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_launcher_reports_a_crash_with_torchruns_summary(tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nsys.exit(3)\n")
    completed = _launch([str(crash)])
    assert completed.returncode == 1
    assert f"{crash} FAILED" in completed.stderr and "exitcode  : 3" in completed.stderr
