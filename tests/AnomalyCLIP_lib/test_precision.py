"""Precision option: fp32 computes in float32 inside the forward; half precision is an opt-in.

What the code must do (``precision.autocast`` and ``AnomalyCLIPInference._precision_context``):
fp32 runs the vision tower in float32 with autocast off; fp16 / bf16 open CUDA autocast with
float16 / bfloat16; bf16 opens CPU autocast on a CPU with bfloat16 instructions (``amx_bf16`` or
``avx512_bf16`` in /proc/cpuinfo); everything else is refused, as one error line, before the tower
runs; an export (traced graph) always runs fp32.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from AnomalyCLIP_lib import inference
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
from AnomalyCLIP_lib import precision as precision_module
from AnomalyCLIP_lib.precision import autocast, cpu_flags
from tests.deploy_helpers import FEATURES, TINY_SIZE, random_images, random_prompt_learner


@pytest.fixture(scope="module")
def learner(tiny_model):
    return random_prompt_learner(tiny_model)


def _module(model, learner, precision: str) -> AnomalyCLIPInference:
    config = ScoringConfig(image_size=TINY_SIZE, features_list=FEATURES, precision=precision)
    return AnomalyCLIPInference.from_model(model, learner, config)


@contextlib.contextmanager
def _recorded_dtypes(visual):
    """Output dtypes of every MLP input projection (a Linear autocast would run in half precision) and
    whether CPU or CUDA autocast was on while the first block ran."""
    seen: dict[str, list] = {"dtypes": [], "autocast": []}

    def record(_module, _inputs, output):
        seen["dtypes"].append(output.dtype)
        seen["autocast"].append(torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))

    handles = [block.mlp.c_fc.register_forward_hook(record) for block in visual.transformer.resblocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_fp32_forward_runs_the_tower_in_float32(tiny_model, learner):
    module = _module(tiny_model, learner, "fp32")
    with _recorded_dtypes(module.visual) as seen:
        scores, maps = module(random_images(2))
    assert len(seen["dtypes"]) >= 20  # every block the features need ran (the hooks saw them)
    assert set(seen["dtypes"]) == {torch.float32} and not any(seen["autocast"])
    assert scores.dtype == maps.dtype == torch.float32


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))


@pytest.mark.parametrize("device, precision", [("cpu", "fp16"), (torch.device("cpu"), "fp16"), ("meta", "fp16"),
                                               ("mps", "fp16"), ("meta", "bf16"), ("mps", "bf16")])
def test_half_precision_off_cuda_is_refused_with_one_line(precision, device):
    with pytest.raises(AnomalyCLIPError) as raised:
        with autocast(device, precision):
            pytest.fail("the body ran")
    assert str(raised.value) == f"--precision {precision} needs a CUDA device; use fp32 on {device}"


def test_bf16_on_a_cpu_without_bfloat16_instructions_is_refused(cpu_without_bf16):
    with pytest.raises(AnomalyCLIPError) as raised:
        with autocast("cpu", "bf16"):
            pytest.fail("the body ran")
    assert str(raised.value) == ("--precision bf16 on the CPU: this CPU has no bfloat16 instructions (amx_bf16 or "
                                 "avx512_bf16), so bf16 would be emulated and slower than fp32; it offers fp32 only: "
                                 "use --precision fp32 (the default)")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx512f", "amx_bf16", "amx_tile"})
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_bf16_on_a_cpu_with_bfloat16_computes_the_tower_in_bfloat16(tiny_model, learner, cpu_with_bf16):
    """CPU autocast: the blocks' linears run in bfloat16, scores and maps come back float32, near fp32's."""
    module = _module(tiny_model, learner, "bf16")
    with _recorded_dtypes(module.visual) as seen:
        prediction = module.predict(random_images(2, seed=5))
    scores, maps = prediction.scores, prediction.maps
    reference = _module(tiny_model, learner, "fp32").predict(random_images(2, seed=5))
    assert len(seen["dtypes"]) >= 20 and set(seen["dtypes"]) == {torch.bfloat16} and all(seen["autocast"])
    assert scores.dtype == maps.dtype == torch.float32
    # bf16 keeps 8 significant bits: near the fp32 result, not equal to it
    assert 0 < (maps - reference.maps).abs().max() <= 0.05 * reference.maps.abs().max()
    assert (scores - reference.scores).abs().max() <= 0.05


def test_half_precision_module_on_cpu_refuses_before_the_tower_runs(tiny_model, learner, cpu_without_bf16):
    for precision, message in (("fp16", "--precision fp16 needs a CUDA device"),
                               ("bf16", "--precision bf16 on the CPU: this CPU has no bfloat16")):
        module = _module(tiny_model, learner, precision)
        with _recorded_dtypes(module.visual) as seen, pytest.raises(AnomalyCLIPError, match=message):
            module.predict(random_images(1))
        assert seen["dtypes"] == []


@pytest.mark.parametrize("cli", ["test", "one"])
def test_cli_with_half_precision_on_cpu_is_one_line_and_writes_nothing(cli, tiny_model, learner, tiny_clip_files,
                                                                       synthetic_datasets, tmp_path, capsys):
    from pipeline import evaluation, prediction
    from pipeline.cli import run_cli
    from tests.deploy_helpers import save_prompt_checkpoint

    checkpoint = save_prompt_checkpoint(learner, tmp_path / "prompts.pth")
    images = synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Anomaly"
    source = (["--data_path", str(synthetic_datasets[1]), "--num_workers", "0"] if cli == "test"
              else ["--image_path", str(images)])
    main = evaluation.main if cli == "test" else prediction.main
    out = tmp_path / "out"
    argv = [*source, "--save_path", str(out), "--checkpoint_path", str(checkpoint), "--backbone",
            str(tiny_clip_files[0]), "--image_size", str(TINY_SIZE), "--features_list", "6", "24", "--device", "cpu",
            "--precision", "fp16"]
    capsys.readouterr()
    assert run_cli(main, argv) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: --precision fp16 needs a CUDA device and this run is on cpu; use --precision fp32 (the "
                      "default), or bf16 on a CPU with bfloat16 instructions, or fp16 through an export (--runtime "
                      "openvino)"] and "Traceback" not in stderr
    assert not out.exists()


def test_an_export_runs_fp32_whatever_the_precision(tiny_model, learner, monkeypatch):
    """While a graph is traced the precision context is off (a graph holds no autocast), so fp16 is not refused."""
    module = _module(tiny_model, learner, "fp16")
    monkeypatch.setattr(inference, "is_exporting", lambda: True)
    with _recorded_dtypes(module.visual) as seen, torch.inference_mode():
        scores, maps = module(random_images(2, seed=3))
    assert set(seen["dtypes"]) == {torch.float32} and not any(seen["autocast"])
    assert scores.shape == (2,) and maps.dtype == torch.float32
    assert module.export_copy().config.precision == "fp32"


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_half_precision_opens_cuda_autocast_with_its_dtype(precision, dtype, device, monkeypatch):
    """Recorded instead of run (no GPU needed): torch.autocast gets device_type cuda and the precision's dtype."""
    opened = []

    @contextlib.contextmanager
    def fake_autocast(device_type, dtype=None, **kwargs):
        opened.append((device_type, dtype))
        yield

    monkeypatch.setattr(torch, "autocast", fake_autocast)
    with autocast(device, precision):
        assert opened == [("cuda", dtype)]


def test_fp32_opens_no_autocast(monkeypatch):
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: pytest.fail("fp32 opened autocast"))
    for device in ("cpu", "cuda", "mps"):
        with autocast(device, "fp32"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_unknown_precision():
    with pytest.raises(AnomalyCLIPError, match=r"unknown precision 'fp8'; choose one of \('fp32', 'fp16', 'bf16'\)"):
        with autocast("cpu", "fp8"):
            pass
    with pytest.raises(AnomalyCLIPError, match="unknown precision 'int4'"):
        ScoringConfig(precision="int4")


@pytest.mark.gpu
def test_fp16_autocast_on_cuda():
    with autocast("cuda", "fp16"):
        assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.parametrize("precision, dtype",
                         [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_module_on_cuda_computes_in_its_precision(tiny_model, learner, precision, dtype):
    import copy

    module = _module(copy.deepcopy(tiny_model).cuda(), copy.deepcopy(learner).cuda(), precision)
    with _recorded_dtypes(module.visual) as seen:
        scores, maps = module(random_images(2).cuda())
    assert set(seen["dtypes"]) == {dtype}
    assert scores.dtype == maps.dtype == torch.float32
