"""The shell scripts (``*.sh`` in the repository root and ``.ci/run``) parse: ``bash -n`` on each."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = sorted(REPO_ROOT.glob("*.sh")) + [REPO_ROOT / ".ci" / "run"]
BASH = shutil.which("bash")


def bash_n(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)


def test_the_scripts_are_found() -> None:
    assert {"demo.sh", "test.sh", "train.sh"} <= {p.name for p in SCRIPTS}
    assert all(p.is_file() for p in SCRIPTS)


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_script_parses(script: Path) -> None:
    completed = bash_n(script)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_a_syntax_error_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: an unclosed ``if`` is reported."""
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/usr/bin/env bash\nif [ -n \"$1\" ]; then\n  echo yes\n")
    completed = bash_n(broken)
    assert completed.returncode != 0 and "syntax error" in completed.stderr


# --- train.sh / test.sh with a stand-in python (issue 22, item 6) ------------------------------------------------


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON that records its working folder and arguments, one line a call, and succeeds."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s|%s\\n" "$PWD" "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    return fake, calls


def _run_script(name: str, cwd: Path, fake: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHON": str(fake), **env}
    return subprocess.run([BASH, str(REPO_ROOT / name)], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=30)


def _resolved(call: str, flag: str) -> Path:
    """The path given to ``flag`` in a recorded call, resolved against the call's working folder."""
    folder, args = call.split("|", 1)
    words = args.split()
    return (Path(folder) / words[words.index(flag) + 1]).resolve()


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_takes_relative_roots_from_the_callers_folder(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    caller = tmp_path / "work"
    (caller / "d" / "visa").mkdir(parents=True)
    (caller / "d" / "visa" / "meta.json").write_text("{}")
    (caller / "ck" / "9_12_4_multiscale_visa").mkdir(parents=True)
    (caller / "ck" / "9_12_4_multiscale_visa" / "epoch_3.pth").write_bytes(b"x")
    completed = _run_script("test.sh", caller, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                            EPOCH="3", DATASETS="visa")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    test_call, summary_call = calls.read_text().splitlines()
    assert _resolved(test_call, "--data_path") == (caller / "d" / "visa").resolve()
    assert _resolved(test_call, "--checkpoint_path") == (caller / "ck" / "9_12_4_multiscale_visa" / "epoch_3.pth"
                                                         ).resolve()
    assert _resolved(test_call, "--save_path") == (caller / "res" / "visa").resolve()
    assert _resolved(summary_call, "results") == (caller / "res" / "visa").resolve()


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_fails_when_a_dataset_asked_for_by_name_is_missing(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    completed = _run_script("test.sh", tmp_path, fake, DATA_ROOT="nowhere", DATASETS="mpdd")
    assert completed.returncode == 1
    assert completed.stdout.startswith("skip mpdd: nowhere/mpdd/meta.json not found")
    assert completed.stderr == ("error: DATASETS asked for mpdd, which could not run (see the skip lines above)\n")
    # A misspelt name is refused before anything runs.
    completed = _run_script("test.sh", tmp_path, fake, DATASETS="mvtc")
    assert completed.returncode == 2 and completed.stderr.startswith("error: DATASETS names mvtc, not a dataset")
    # Without DATASETS a missing dataset is skipped, and the run succeeds (the released protocol runs what is there).
    assert _run_script("test.sh", tmp_path, fake, DATA_ROOT="nowhere").returncode == 0


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_train_sh_takes_relative_roots_from_the_callers_folder_and_fails_on_a_named_missing_dataset(
        tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    (tmp_path / "d" / "mvtec").mkdir(parents=True)
    (tmp_path / "d" / "mvtec" / "meta.json").write_text("{}")
    completed = _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck")
    assert completed.returncode == 0, completed.stderr  # visa skipped: not asked for by name
    train_call = calls.read_text().splitlines()[0]
    assert _resolved(train_call, "--train_data_path") == (tmp_path / "d" / "mvtec").resolve()
    assert _resolved(train_call, "--save_path") == (tmp_path / "ck" / "9_12_4_multiscale_visa").resolve()
    completed = _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", DATASETS="visa")
    assert completed.returncode == 1 and "DATASETS asked for visa" in completed.stderr
