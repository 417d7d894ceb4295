"""The indexer scripts as users run them: a subprocess from another working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.generate_dataset_json.trees import Tree, mvtec_class


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "generate_dataset_json" / script), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_missing_root_and_success(tmp_path: Path) -> None:
    failed = run("mvtec.py", "--root", "no_such_folder", cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stdout == ""
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset root no_such_folder does not exist")
    assert "Traceback" not in failed.stderr

    mvtec_class(Tree(tmp_path / "data"), "bottle")
    done = run("folder.py", "--root", "data", "--classes", "bottle", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data/meta.json").is_file()
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    table = {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in rows[1:]}
    assert table[("train", "bottle")] == ["2", "0", "0"]
    assert table[("test", "bottle")] == ["2", "3", "3"]
