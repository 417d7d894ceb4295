"""launch.py (issue 22, item 5): flags refused with a reason, Ctrl-C/SIGTERM and a rank's error as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import launch
from tests.conftest import REPO_ROOT

# A CLI of ours on each rank: says it is up (with its pid), then waits; RANK_FAILS makes that rank fail.
RANK_SCRIPT = """
import os, sys, time
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline.cli import run_cli

def main(argv):
    os.write(1, f"up {os.getpid()}\\n".encode())  # one write: the two ranks' lines cannot interleave on the pipe
    if os.environ["RANK"] == os.environ.get("RANK_FAILS"):
        raise AnomalyCLIPError("rank " + os.environ["RANK"] + " found a broken file")
    time.sleep(120)
    return 0

raise SystemExit(run_cli(main))
"""


@pytest.mark.parametrize("argv, expected", [
    (["--nproc_per_node", "0", "test.py"], "error: --nproc_per_node 0 must be at least 1 (or auto, cpu, gpu)"),
    (["--nproc_per_node", "2", "test_one_example.py", "--image_path", "x.png"],
     "error: test_one_example.py runs in one process (every rank would write the same files): run it with python, "
     "not launch.py"),
], ids=["nproc_0", "test_one_example"])
def test_refused_up_front_with_a_reason(argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as stop:
        launch.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{expected}; usage: python launch.py [torchrun flags] SCRIPT.py [its flags], see launch.py --help"]


def _start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, list[int]]:
    """launch.py with two ranks of RANK_SCRIPT; returns once both ranks are up, with their pids."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **env)
    process = subprocess.Popen([sys.executable, "launch.py", "--standalone", "--nproc_per_node", "2", str(script)],
                               cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    pids = []
    deadline = time.monotonic() + 90
    while len(pids) < 2 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("up "):
            pids.append(int(line.split()[1]))
        elif not line and process.poll() is not None:
            break
    return process, pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # torchrun with two processes
@pytest.mark.parametrize("signum, line, status", [(signal.SIGINT, "interrupted", 130),
                                                  (signal.SIGTERM, "terminated", 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_every_rank_with_one_line(tmp_path, signum, line, status):
    process, pids = _start(tmp_path)
    try:
        assert len(pids) == 2, process.stderr.read() if process.poll() is not None else "ranks did not start"
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status, err
    assert [text for text in err.splitlines() if text.strip() and "OMP_NUM_THREADS" not in text
            and not set(text) <= {"*"}] == [line]
    assert all(_gone(pid) for pid in pids)


@pytest.mark.slow  # torchrun with two processes
def test_a_rank_error_is_printed_once(tmp_path):
    process, pids = _start(tmp_path, RANK_FAILS="1")
    try:
        _, err = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode == 2, err
    assert [text for text in err.splitlines() if text.strip() and "OMP_NUM_THREADS" not in text
            and not set(text) <= {"*"}] == ["error: rank 1 found a broken file"]
    assert all(_gone(pid) for pid in pids)
