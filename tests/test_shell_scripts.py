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
