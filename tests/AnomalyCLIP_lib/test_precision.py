"""Precision option: fp32 is a no-op everywhere; half precision is a CUDA-only opt-in."""

import pytest
import torch

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.precision import autocast


def test_fp32_leaves_computation_alone():
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_needs_cuda(precision):
    with pytest.raises(AnomalyCLIPError, match="needs a CUDA device"):
        with autocast("cpu", precision):
            pass


def test_unknown_precision():
    with pytest.raises(AnomalyCLIPError, match="unknown precision"):
        with autocast("cpu", "fp8"):
            pass


@pytest.mark.gpu
def test_fp16_autocast_on_cuda():
    with autocast("cuda", "fp16"):
        assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == torch.float16
