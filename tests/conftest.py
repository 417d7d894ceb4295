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


@pytest.fixture(scope="session")
def tiny_clip_state():
    """A tiny CLIP state dict in OpenAI's layout (24 vision layers, vocab 49408, context 77)."""
    from tests.tiny_clip import tiny_clip_state_dict

    return tiny_clip_state_dict(seed=0)


@pytest.fixture(scope="session")
def tiny_clip_files(tiny_clip_state, tmp_path_factory):
    """The tiny CLIP saved as a plain state dict and as a TorchScript archive: ``(plain, torchscript)``."""
    import torch

    from tests.tiny_clip import save_torchscript

    folder = tmp_path_factory.mktemp("tiny_clip")
    plain, scripted = folder / "tiny_clip_state.pt", folder / "tiny_clip_jit.pt"
    torch.save(tiny_clip_state, plain)
    save_torchscript(tiny_clip_state, scripted)
    return plain, scripted


@pytest.fixture(scope="session")
def tiny_model(tiny_clip_state):
    """The tiny CLIP built through the real model builder (fp32, eval, frozen)."""
    from AnomalyCLIP_lib.model import build_model

    return build_model(tiny_clip_state)
