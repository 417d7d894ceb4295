"""Shared pytest fixtures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Pins PyTorch, MKL and oneDNN to the AVX2 kernels the goldens were recorded with.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_on_avx2_kernels(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repo root with PyTorch, MKL and oneDNN pinned to AVX2 kernels.

    Floating-point results of the goldens are reproduced bit for bit only on the kernels they
    were recorded with; skips where those kernels cannot exist (not x86-64 Linux).
    """
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("the goldens' AVX2 kernels exist on x86-64 only")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **AVX2_ENV)
    completed = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                               cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def one_thread_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that runs our CLIs on the tiny backbone: one PyTorch thread, as in
    this process (see ``pytest_configure``). Not for the parity runs, which keep the goldens' settings."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


# The goldens were recorded on an AMD CPU. MKL picks other AVX2 code paths on Intel CPUs even
# when pinned to AVX2, so bit-exactness can only be asserted on the recording vendor; elsewhere
# the goldens' documented tolerance (1e-5) applies.
GOLDENS_CPU_VENDOR = "AuthenticAMD"


def cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def same_kernels_as_goldens() -> bool:
    """Whether this CPU runs the MKL kernels the goldens were recorded with (bit-exact parity)."""
    return cpu_vendor() == GOLDENS_CPU_VENDOR


def goldens_path() -> Path:
    """Where the reference outputs of the original implementation live (``../shared/goldens``)."""
    override = os.environ.get("ANOMALYCLIP_GOLDENS")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "goldens"


def writable_copy(source: Path, target: Path, ignore=None) -> Path:
    """Copy a folder of the read-only goldens so a test may write into it (e.g. a new meta.json)."""
    import shutil

    shutil.copytree(source, target, ignore=ignore)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


# Every test under tests/deploy/ runs ONNX, ONNX Runtime or OpenVINO (each module skips itself
# where a package it needs is absent); tests elsewhere that do so carry ``pytestmark`` themselves.
DEPLOY_DIR = REPO_ROOT / "tests" / "deploy"


def pytest_configure(config: pytest.Config) -> None:
    """One PyTorch thread in the test process.

    The tests run tiny models (56 px, width 128), whose ops take microseconds: split over two
    threads, every op waits for both to be scheduled, and on a busy 2-core machine a training run
    took 3-5 s instead of 0.9 s. Subprocesses (the parity runs on the goldens' kernels, torchrun)
    keep their own settings.
    """
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that use the goldens ``parity``; skip ``gpu`` tests where CUDA is unavailable.

    Tests under ``tests/deploy/`` (ONNX Runtime / OpenVINO in this process) are marked ``deploy``
    so that ``-m "not deploy"`` runs without the runtimes; the whole suite runs in one process. It once
    could not: the process segfaulted (or aborted) after the OpenVINO tests, because every
    ``ExportedModel`` made its own ``openvino.Core``, each Core's CPU plugin swapped in an
    alternate signal stack of its own, and plugins released first-in-first-out left the main
    thread's on unmapped memory, where the next Python signal handler ran (torch's DataLoader
    SIGCHLD handler, once a later test ran a subprocess). ``runtime.openvino_core`` (one Core per
    process) fixed it; ``test_runtime.py`` holds the regression test.
    """
    for item in items:
        if DEPLOY_DIR in item.path.parents:
            item.add_marker(pytest.mark.deploy)
    gpu_items = []
    for item in items:
        if "goldens_dir" in getattr(item, "fixturenames", ()):  # directly or through another fixture
            item.add_marker(pytest.mark.parity)
        if item.get_closest_marker("gpu") is not None:
            gpu_items.append(item)
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def goldens_dir() -> Path:
    """The read-only goldens folder; tests that need it are skipped when it is absent."""
    path = goldens_path()
    if not (path / "README.md").is_file():
        message = f"goldens folder {path} is absent (it ships beside the project, not in it)"
        if os.environ.get("ANOMALYCLIP_REQUIRE_GOLDENS"):
            pytest.fail(message + "; ANOMALYCLIP_REQUIRE_GOLDENS is set (CI), so parity tests must run")
        pytest.skip(message)
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


E2E_IMAGE_SIZE = 56


@pytest.fixture(scope="session")
def synthetic_datasets(tmp_path_factory):
    """Small synthetic datasets: ``(auxiliary MVTec-layout root, target VisA-layout root)``."""
    from pipeline.synthetic import make_mvtec_like, make_visa_like

    root = tmp_path_factory.mktemp("synthetic")
    sizes = {"n_train": 2, "n_test_good": 3, "n_test_defect": 3, "image_size": (64, 48)}
    make_mvtec_like(root / "auxiliary", class_names=("stripes", "checker"), seed=0, **sizes)
    make_visa_like(root / "target", class_names=("blobs", "weave"), seed=1, **sizes)
    return root / "auxiliary", root / "target"


@pytest.fixture(scope="session")
def design_args(tiny_clip_files):
    """CLI flags shared by train.py, test.py and test_one_example.py runs on the tiny backbone."""
    return ["--backbone", str(tiny_clip_files[0]), "--image_size", str(E2E_IMAGE_SIZE), "--features_list", "6", "24",
            "--device", "cpu"]


@pytest.fixture(scope="session")
def trained_checkpoint(synthetic_datasets, design_args, tmp_path_factory):
    """A prompt checkpoint written by train.py after one epoch on the auxiliary dataset."""
    from pipeline import training as train

    save_path = tmp_path_factory.mktemp("trained")
    assert train.main(["--train_data_path", str(synthetic_datasets[0]), "--save_path", str(save_path), "--epoch", "1",
                       "--batch_size", "4", "--num_workers", "0", *design_args]) == 0
    return save_path / "epoch_1.pth"
