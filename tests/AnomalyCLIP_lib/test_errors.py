"""errors.py: the one-line wording of memory errors, from the errors torch and Python really raise."""

from __future__ import annotations

import pytest
import torch

from AnomalyCLIP_lib.errors import out_of_memory_line, user_error_line
from pipeline.cli import run_cli

TAIL = ": lower --batch_size or --image_size, or free memory (other processes on that device)"


def _raised(make) -> BaseException:
    with pytest.raises(BaseException) as caught:
        make()
    return caught.value


def test_torch_cpu_allocation_failure_names_its_size() -> None:
    error = _raised(lambda: torch.empty(2**50, dtype=torch.uint8))  # 1 PiB: refused before any page is touched
    assert out_of_memory_line(error) == f"out of memory on the CPU (an allocation of 1048576.0 GiB){TAIL}"


def test_python_memory_error() -> None:
    error = _raised(lambda: bytearray(2**50))
    assert isinstance(error, MemoryError)
    assert user_error_line(error) == f"out of memory on the CPU{TAIL}"


def test_cuda_caching_allocator_wording() -> None:
    """torch.cuda.OutOfMemoryError's text (no GPU here to raise it)."""
    error = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.72 GiB "
                         "of which 3.19 GiB is free.")
    assert out_of_memory_line(error) == f"out of memory on the GPU (an allocation of 20.00 GiB){TAIL}"


def test_other_runtime_errors_are_not_the_users() -> None:
    assert out_of_memory_line(RuntimeError("stack expects a non-empty TensorList")) is None
    assert user_error_line(ValueError("out of memory")) is None


def test_cli_prints_the_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv):
        torch.empty(2**48, dtype=torch.float32)  # 1 PiB: more than any address space holds
        return 0

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == f"error: out of memory on the CPU (an allocation of 1048576.0 GiB){TAIL}\n"


def test_a_bug_still_raises() -> None:
    def main(argv):
        raise RuntimeError("a bug of ours")

    with pytest.raises(RuntimeError, match="a bug of ours"):
        run_cli(main, [])
