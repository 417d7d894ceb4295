"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def goldens_path() -> Path:
    """Where the reference outputs of the original implementation live (``../shared/goldens``)."""
    override = os.environ.get("ANOMALYCLIP_GOLDENS")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "goldens"


@pytest.fixture(scope="session")
def goldens_dir() -> Path:
    """The read-only goldens folder; tests that need it are skipped when it is absent."""
    path = goldens_path()
    if not (path / "README.md").is_file():
        pytest.skip(f"goldens folder {path} is absent (it ships beside the project, not in it)")
    return path
