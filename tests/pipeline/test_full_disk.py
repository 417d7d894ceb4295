"""Full disks, file-size limits and read-only file systems, as the kernel reports them.

Two real conditions, no simulated errors:

* a small tmpfs, filled up or mounted read-only (ENOSPC, EROFS): mounting needs root in a
  container that allows it (CI's does); the tests skip elsewhere;
* the process's file-size limit (``ulimit -f``, RLIMIT_FSIZE: EFBIG), which any user can set,
  so the checkpoint write path is covered on every machine.

Checked: the error is one ``error:`` line naming the file that could not be written, nothing a
user had is changed, and no temporary file is left behind.
"""

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import evaluation as test_cli
from pipeline import training as train_cli
from pipeline.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text, atomic_write_texts
from pipeline.cli import run_cli
from tests.conftest import one_thread_env

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096
DISK_FULL = "the disk is full: free space there or choose another folder"


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                               text=True)
    if completed.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({completed.stderr.strip() or 'mount failed'})")


@pytest.fixture
def mount_disk(tmp_path):
    """``mount_disk(size_bytes, read_only=False) -> folder``: a fresh tmpfs, unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: int, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        _mount_tmpfs(folder, f"size={-(-size // PAGE) * PAGE}" + (",ro" if read_only else ""))
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave_pages: int = 0) -> None:
    """Fill ``disk`` with one file until the kernel says ENOSPC, then free ``leave_pages`` pages."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, bytes(PAGE))
        assert full.value.errno == errno.ENOSPC
        os.ftruncate(fd, os.fstat(fd).st_size // PAGE * PAGE - leave_pages * PAGE)
    finally:
        os.close(fd)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a CLI's stderr (progress bars aside), checking there is one."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0][errors[0].index("error:"):]


def test_atomic_writes_on_a_full_disk_name_the_target_and_keep_the_old_file(mount_disk):
    disk = mount_disk(64 * 1024)
    target = disk / "epoch_1.pth"
    atomic_torch_save({"ctx": torch.arange(10.0)}, target)
    old = target.read_bytes()
    fill(disk)
    writers = {"torch": lambda: atomic_torch_save({"ctx": torch.zeros(10_000)}, target),
               "bytes": lambda: atomic_write_bytes(bytes(10_000), target),
               "text": lambda: atomic_write_text("y" * 10_000, target)}
    for name, write in writers.items():
        with pytest.raises(OSError) as failure:
            write()
        assert (failure.value.errno, failure.value.filename) == (errno.ENOSPC, str(target)), name
        assert target.read_bytes() == old and temporaries(disk) == [], name
    assert torch.equal(torch.load(target, weights_only=True)["ctx"], torch.arange(10.0))


def test_files_written_together_stay_all_old_when_the_disk_fills_between_them(mount_disk):
    disk = mount_disk(64 * 1024)
    results, scores = disk / "results.json", disk / "scores.csv"
    atomic_write_texts({results: "old results", scores: "old scores"})
    fill(disk, leave_pages=1)  # room for the first temporary file, not for the second
    with pytest.raises(OSError) as failure:
        atomic_write_texts({results: "new results", scores: "new scores"})
    assert (failure.value.errno, failure.value.filename) == (errno.ENOSPC, str(scores))
    assert (results.read_text(), scores.read_text()) == ("old results", "old scores")
    assert temporaries(disk) == []


_SAVE_UNDER_LIMIT = """
import errno, json, sys, torch
from pipeline.atomic import atomic_torch_save
target = sys.argv[1]
try:
    atomic_torch_save({"ctx": torch.zeros(100_000)}, target)
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "filename": exc.filename}))
"""


def _limited(limit: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG

    return set_limit


def test_checkpoint_write_past_the_file_size_limit_names_the_file(tmp_path):
    target = tmp_path / "epoch_3.pth"
    target.write_bytes(b"the previous checkpoint")
    completed = subprocess.run([sys.executable, "-c", _SAVE_UNDER_LIMIT, str(target)], capture_output=True, text=True,
                               cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                               preexec_fn=_limited(64 * 1024), timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout) == {"errno": errno.EFBIG, "filename": str(target)}
    assert target.read_bytes() == b"the previous checkpoint" and temporaries(tmp_path) == []


def _train_argv(synthetic_datasets, design_args, save_path: Path, *flags: str) -> list[str]:
    return ["--train_data_path", str(synthetic_datasets[0]), "--save_path", str(save_path), "--batch_size", "4",
            "--num_workers", "0", *design_args, *flags]


def test_train_past_the_file_size_limit_is_one_line(synthetic_datasets, design_args, trained_checkpoint, tmp_path):
    save_path = tmp_path / "run"
    limit = trained_checkpoint.stat().st_size // 2  # log.txt fits, the checkpoint does not
    completed = subprocess.run([sys.executable, "train.py", *_train_argv(synthetic_datasets, design_args, save_path,
                                                                         "--epoch", "1")],
                               capture_output=True, text=True, cwd=REPO_ROOT, preexec_fn=_limited(limit), timeout=600,
                               env=one_thread_env(PYTHONDONTWRITEBYTECODE="1"))
    assert completed.returncode == 2, completed.stderr[-2000:]
    line = one_error_line(completed.stderr)
    assert line.startswith(f"error: cannot write {save_path / 'epoch_1.pth'}: the file would pass the file-size "
                           "limit (ulimit -f)"), line
    assert sorted(p.name for p in save_path.iterdir()) == ["log.txt"]


def test_train_on_a_full_disk_keeps_the_last_checkpoint(synthetic_datasets, design_args, trained_checkpoint,
                                                        mount_disk, capsys):
    checkpoint_size = trained_checkpoint.stat().st_size
    disk = mount_disk(checkpoint_size * 3 // 2)  # room for epoch_1.pth, not for epoch_2.pth beside it
    save_path = disk / "run"
    argv = _train_argv(synthetic_datasets, design_args, save_path, "--epoch", "2")
    assert run_cli(train_cli.main, argv) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {save_path / 'epoch_2.pth'}: {DISK_FULL}"
    assert sorted(p.name for p in save_path.iterdir()) == ["epoch_1.pth", "log.txt"]
    state = torch.load(save_path / "epoch_1.pth", weights_only=True)
    assert state["epoch"] == 1


def test_feature_cache_on_a_small_disk_is_refused_before_writing(synthetic_datasets, design_args, mount_disk,
                                                                   tmp_path, capsys):
    disk = mount_disk(8 * PAGE)
    argv = _train_argv(synthetic_datasets, design_args, tmp_path / "run", "--epoch", "1", "--cache_memory_gb", "0",
                       "--cache_dir", str(disk / "cache"))
    assert run_cli(train_cli.main, argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: the feature cache needs ") and f"but {disk / 'cache'} has " in line, line
    assert "give --cache_dir on a larger disk, or --no_cache" in line and "0.00" not in line
    assert not (disk / "cache").exists()  # made by this run, for the cache, and removed with it


def _test_argv(synthetic_datasets, design_args, checkpoint: Path, save_path: Path, *flags: str) -> list[str]:
    return ["--data_path", str(synthetic_datasets[1]), "--save_path", str(save_path), "--checkpoint_path",
            str(checkpoint), "--num_workers", "0", *design_args, *flags]


RESULT_FILES = ("results.json", "scores.csv", "thresholds.json")


def test_test_py_on_a_full_disk_leaves_all_old_results(synthetic_datasets, design_args, trained_checkpoint,
                                                       mount_disk, capsys):
    disk = mount_disk(512 * 1024)
    save_path = disk / "results"
    assert run_cli(test_cli.main, _test_argv(synthetic_datasets, design_args, trained_checkpoint, save_path)) == 0
    old = {name: (save_path / name).read_bytes() for name in RESULT_FILES}
    fill(disk, leave_pages=1)  # log.txt grows inside its page; one result file fits, the next does not
    argv = _test_argv(synthetic_datasets, design_args, trained_checkpoint, save_path, "--sigma", "2")
    assert run_cli(test_cli.main, argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {save_path}/") and line.endswith(DISK_FULL), line
    assert line.split(": ")[1].rsplit("/", 1)[1] in RESULT_FILES
    assert {name: (save_path / name).read_bytes() for name in RESULT_FILES} == old
    assert temporaries(disk) == []


def test_log_on_a_full_disk_is_one_line(synthetic_datasets, design_args, trained_checkpoint, mount_disk, capsys):
    disk = mount_disk(16 * PAGE)
    fill(disk)
    save_path = disk / "results"
    assert run_cli(test_cli.main, _test_argv(synthetic_datasets, design_args, trained_checkpoint, save_path)) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {save_path / 'log.txt'}: {DISK_FULL}"


def test_read_only_file_system_is_one_line_in_every_cli(synthetic_datasets, design_args, trained_checkpoint,
                                                        mount_disk, capsys):
    from pipeline import prediction as test_one_example

    disk = mount_disk(16 * PAGE, read_only=True)
    image = next(synthetic_datasets[1].rglob("*.JPG"))
    commands = {
        train_cli: _train_argv(synthetic_datasets, design_args, disk / "run", "--epoch", "1"),
        test_cli: _test_argv(synthetic_datasets, design_args, trained_checkpoint, disk / "results"),
        test_one_example: ["--image_path", str(image), "--checkpoint_path", str(trained_checkpoint), "--save_path",
                           str(disk / "one"), *design_args],
    }
    for cli, argv in commands.items():
        assert run_cli(cli.main, argv) == 2, cli.__name__
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: cannot write {disk}/") and line.endswith(
            "the folder is on a read-only file system: choose a writable folder"), (cli.__name__, line)


def test_dump_that_does_not_fit_is_one_line_before_scoring(synthetic_datasets, design_args, trained_checkpoint,
                                                          mount_disk, tmp_path, capsys):
    """The dump's spill files are reserved up front: a full disk is a line naming the dump, not a SIGBUS later."""
    disk = mount_disk(4 * PAGE)
    dump = disk / "maps.npz"
    argv = _test_argv(synthetic_datasets, design_args, trained_checkpoint, tmp_path / "results", "--dump", str(dump))
    assert run_cli(test_cli.main, argv) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: cannot write {dump}: {DISK_FULL}"
    assert list(disk.iterdir()) == []
