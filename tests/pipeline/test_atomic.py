"""atomic.py: a write replaces the file whole or not at all, leaves no temporary file, follows the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.atomic import LOCK_NAME, atomic_write, atomic_write_bytes, atomic_write_text, locked_folder
from tests.conftest import REPO_ROOT


@pytest.fixture()
def restore_umask() -> Iterator[None]:
    """The test may change the process umask; the previous one is restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replaces_the_content_of_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old content, longer than the new one\n")
    assert atomic_write_text("new ✓\n", target) == target
    assert target.read_bytes() == "new ✓\n".encode()
    assert atomic_write_bytes(b"\x00\x01\x02", target) == target
    assert target.read_bytes() == b"\x00\x01\x02"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_accepts_a_string_path_and_creates_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "log.txt"
    assert atomic_write_text("x", str(target)) == target
    assert target.read_text() == "x"


def test_the_write_goes_to_a_temporary_file_beside_the_target(tmp_path: Path) -> None:
    """While the callback writes, the target still holds the old content; the temporary file is in its folder."""
    target = tmp_path / "meta.json"
    target.write_text("old")
    seen = {}

    def write(tmp: str) -> None:
        seen["folder"], seen["target_during_write"] = Path(tmp).parent, target.read_text()
        Path(tmp).write_text("new")

    atomic_write(target, write)
    assert seen == {"folder": tmp_path, "target_during_write": "old"}
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "epoch_1.pth"
    target.write_bytes(b"previous checkpoint")

    def half_write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a checkp")
        raise KeyboardInterrupt  # Ctrl-C mid-write: not even an Exception

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_write)
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_1.pth"]


def test_a_failing_first_write_leaves_nothing(tmp_path: Path) -> None:
    def fail(tmp: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "new.txt", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_callback_that_removes_its_temporary_file_is_an_error_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("kept")
    with pytest.raises(FileNotFoundError):
        atomic_write(target, os.unlink)
    assert target.read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
@pytest.mark.usefixtures("restore_umask")
def test_permissions_of_a_new_file_follow_the_umask(tmp_path: Path, mask: int, expected: int) -> None:
    """As ``open()`` would create it (0o666 minus the umask), not mkstemp's private 0o600."""
    os.umask(mask)
    target = atomic_write_text("x", tmp_path / f"file_{mask:o}.txt")
    assert mode(target) == expected
    plain = tmp_path / f"plain_{mask:o}.txt"
    plain.write_text("x")
    assert mode(plain) == expected  # the same as a file written the ordinary way


# --- locked_folder ---------------------------------------------------------------------------------

def _try_lock_in_another_process(folder: Path) -> str:
    """What a second process gets when it asks for ``folder``: ``"locked"`` or its error line."""
    code = ("import sys\nfrom pipeline.atomic import locked_folder\n"
            "from AnomalyCLIP_lib.errors import AnomalyCLIPError\n"
            "try:\n    with locked_folder(sys.argv[1], '--save_path'):\n        print('locked')\n"
            "except AnomalyCLIPError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_locked_folder_refuses_a_second_process_and_frees_the_folder_on_exit(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with locked_folder(folder, "--save_path") as held:
        assert held == folder and folder.is_dir()
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert _try_lock_in_another_process(folder) == (
            f"--save_path {folder} is in use by another run (process {os.getpid()}): wait for it to end, "
            "or choose another folder")
        (folder / "log.txt").write_text("written while held\n")
    assert sorted(p.name for p in folder.iterdir()) == ["log.txt"]
    assert _try_lock_in_another_process(folder) == "locked"


def test_locked_folder_removes_the_folders_it_made_when_they_stay_empty(tmp_path: Path) -> None:
    made, existing = tmp_path / "new" / "deeper" / "run", tmp_path / "existing"
    existing.mkdir()
    with locked_folder(made, "--save_path"), locked_folder(existing, "--out"):
        pass
    assert not (tmp_path / "new").exists()  # the folder and the parents it made
    assert existing.is_dir() and not list(existing.iterdir())
    with locked_folder(made, "--save_path"):
        (tmp_path / "new" / "other.txt").write_text("made meanwhile")
    assert not (tmp_path / "new" / "deeper").exists() and (tmp_path / "new" / "other.txt").is_file()


def test_locked_folder_ignores_a_stale_lock_file(tmp_path: Path) -> None:
    """A lock file left by a killed run (it holds that run's pid) is no lock: the kernel's lock died with it."""
    (tmp_path / LOCK_NAME).write_text("999999999\n")
    with locked_folder(tmp_path, "--save_path"):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / LOCK_NAME).exists()
