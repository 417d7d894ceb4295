"""docs/user-errors.md names the test of each case: every test it names exists."""

import re
from pathlib import Path

from tests.conftest import REPO_ROOT

USER_ERRORS = REPO_ROOT / "docs" / "user-errors.md"
ALIASES = {"UE": "tests/test_user_errors.py"}  # the shorthand the document defines


def _named_tests(text: str) -> list[tuple[str, str]]:
    """``(file, test function)`` of every ``tests/….py::test_…`` and ``UE::test_…`` reference."""
    found = []
    for file, name in re.findall(r"(tests/[\w/]+\.py|UE)::(test_\w+)", text):
        found.append((ALIASES.get(file, file), name))
    return found


def test_every_test_named_in_user_errors_exists():
    text = USER_ERRORS.read_text(encoding="utf-8")
    named = _named_tests(text)
    assert len(named) > 50  # the document is one row per case, each with its test
    missing = []
    for file, name in named:
        path = REPO_ROOT / file
        if not path.is_file() or not re.search(rf"^(async )?def {name}\(", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/user-errors.md names tests that do not exist: {sorted(set(missing))}"


def test_files_named_in_user_errors_exist():
    text = USER_ERRORS.read_text(encoding="utf-8")
    files = set(re.findall(r"`(tests/[\w/]+\.py)`", text)) | {file for file, _ in _named_tests(text)}
    assert not [file for file in files if not (REPO_ROOT / file).is_file()]


def test_the_reference_parser_finds_both_forms():
    sample = "x `UE::test_a[b]` and `tests/pipeline/test_cli.py::test_c`"
    assert _named_tests(sample) == [("tests/test_user_errors.py", "test_a"), ("tests/pipeline/test_cli.py", "test_c")]
    assert Path(ALIASES["UE"]).name == "test_user_errors.py"


def test_no_merge_conflict_markers_are_left():
    """A merge's ``<<<<<<<``/``=======``/``>>>>>>>`` lines left in a document or source file (one sat in the README)."""
    import subprocess

    files = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.sh", "*.txt", "*.ini", "*.toml"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    found = [file for file in files if marker.search((REPO_ROOT / file).read_text(encoding="utf-8", errors="replace"))]
    assert not found, f"merge-conflict markers in {found}"
