"""benchmarks/bench_precision.py runs tiny: every requested precision with its latency, differences and metrics."""

import json

import pytest

from tests.benchmarks.test_bench_smoke import _load

pytestmark = pytest.mark.deploy  # ONNX Runtime and OpenVINO in this process
for _package in ("onnx", "onnxruntime", "openvino"):
    pytest.importorskip(_package)


@pytest.mark.slow
def test_quick_run_reports_each_precision(capsys, tmp_path):
    bench = _load("bench_precision")
    runs = ["torch fp32", "onnxruntime fp32", "onnxruntime int8"]
    assert bench.main(["--quick", "--only", *runs, "--workdir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result["runs"]) == runs and (result["n_images"], result["n_anomalous"]) == (4, 2)
    assert all(2e-4 < value < 5e-3 for value in result["sensitivity_1e-3"].values())  # the stable stand-in
    reference, fp32, int8 = (result["runs"][name] for name in runs)
    for found in (reference, fp32, int8):
        assert found["latency_s"] > 0 and len(found["times_s"]) == 4
        assert 0 <= found["image_auroc"] <= 1 and 0 <= found["pixel_auroc"] <= 1
    assert fp32["max_score_diff"] <= 1e-5 and fp32["max_map_diff"] <= 1e-4  # the same fp32 computation
    assert int8["max_map_diff"] > 10 * fp32["max_map_diff"]  # quantised: really another computation
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert int8[f"delta_{name}"] == pytest.approx(int8[name] - reference[name], abs=1e-3)
    assert json.loads((tmp_path / "int8" / "anomalyclip.json").read_text())["quantization"]["precision"] == "int8"
    assert set(result["kernels"]) == {f"{kernel}_{dtype}_gflop_s" for kernel in ("matmul", "attention")
                                      for dtype in ("fp32", "bf16")}
    assert all(rate > 0 for rate in result["kernels"].values())
