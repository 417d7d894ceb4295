"""Writing several result files together, and cleaning up after a killed write (atomic.py)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.atomic import atomic_write_texts, remove_leftovers
from tests.conftest import REPO_ROOT


def test_all_new_files_or_all_old_ones(tmp_path):
    results, scores = tmp_path / "results.json", tmp_path / "scores.csv"
    atomic_write_texts({results: "old results", scores: "old scores"})
    with pytest.raises(UnicodeEncodeError):  # the second file cannot be written
        atomic_write_texts({results: "new results", scores: "bad \ud800"})
    assert results.read_text() == "old results" and scores.read_text() == "old scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "scores.csv"]  # no temporaries left
    atomic_write_texts({results: "new results", scores: "new scores"})
    assert results.read_text() == "new results" and scores.read_text() == "new scores"


def test_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path):
    for name in (".epoch_3.pth.abc123.tmp", ".results.json.x1.tmp", "epoch_2.pth", ".epoch_notes.txt", "keep.tmp"):
        (tmp_path / name).write_text("x")
    removed = remove_leftovers(tmp_path, "epoch_*.pth")
    assert [p.name for p in removed] == [".epoch_3.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".epoch_notes.txt", ".results.json.x1.tmp", "epoch_2.pth",
                                                          "keep.tmp"]


# Rewrites a group of files with atomic_write_texts, generation after generation, while another
# thread idles (as torch's threads do in test.py: the kernel may hand a signal to it). The renames
# take microseconds; a pause after each makes a kill land between them in most tries.
GROUP_WRITER = """
import os, sys, threading, time
from pipeline.atomic import atomic_write_texts

folder, n_files = sys.argv[1], int(sys.argv[2])
threading.Thread(target=threading.Event().wait, daemon=True).start()
rename = os.replace
def slow_rename(src, dst):
    rename(src, dst)
    time.sleep(0.002)
os.replace = slow_rename
paths = [os.path.join(folder, f"{i}.txt") for i in range(n_files)]
generation = 0
while True:
    atomic_write_texts({path: str(generation) for path in paths})
    if generation == 0:
        print("ready", flush=True)
    generation += 1
"""


def test_a_signal_during_the_renames_leaves_all_new_files_and_still_ends_the_process(tmp_path):
    n_files, tries = 6, 30
    started = time.monotonic()
    for attempt in range(tries):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        signum = (signal.SIGTERM, signal.SIGINT)[attempt % 2]
        child = subprocess.Popen([sys.executable, "-c", GROUP_WRITER, str(folder), str(n_files)], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(0.001 * (attempt * 7 % 23))  # 0..22 ms: about one generation, hit at varied points
            child.send_signal(signum)
            returncode = child.wait(timeout=5)  # a signal held back and then lost would leave it running
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        assert returncode == -signum, (attempt, returncode)  # Python ends on an uncaught Ctrl-C by SIGINT too
        contents = {(folder / f"{i}.txt").read_text() for i in range(n_files)}
        assert len(contents) == 1, (attempt, signum.name, sorted(contents))
    assert time.monotonic() - started < 20


def test_deferred_signals_raises_a_signal_that_arrived_after_the_block(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    renamed = []
    rename = os.replace

    def rename_then_signal(src, dst):
        rename(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            signal.raise_signal(signal.SIGTERM)  # as if sent between the first rename and the second

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        monkeypatch.setattr(os, "replace", rename_then_signal)
        paths = [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]
        with pytest.raises(Stop):
            atomic_write_texts({path: "new" for path in paths})
        assert len(renamed) == 3 and [path.read_text() for path in paths] == ["new"] * 3
        assert signal.getsignal(signal.SIGTERM) is stop  # the handler is put back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_atomic_write_texts_in_another_thread_writes_and_leaves_the_handlers(tmp_path):
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    errors = []

    def write():
        try:
            atomic_write_texts({tmp_path / "a.txt": "1", tmp_path / "b.txt": "1"})
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "1"
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
