"""benchmarks/bench_runtimes.py runs tiny and reports every runtime next to the matmul rate."""

import json

import pytest

from tests.benchmarks.test_bench_smoke import _load

pytestmark = pytest.mark.deploy  # ONNX Runtime and OpenVINO in this process
for _package in ("onnx", "onnxruntime", "openvino"):
    pytest.importorskip(_package)


@pytest.mark.slow
def test_quick_run_reports_all_runtimes(capsys, tmp_path):
    bench = _load("bench_runtimes")
    assert bench.main(["--quick", "--no_variants", "--warmup", "0", "--workdir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["parity_ok"] and result["image_size"] == 56 and result["matmul_gflop_s"] > 0
    for name in ("torch", "onnxruntime", "openvino"):
        found = result["runtimes"][name]
        assert found["latency_s"] > 0 and found["gflop_s"] > 0 and found["peak_rss_mb"] > 0, name
        assert found["fraction_of_matmul"] > 0
    for name in ("onnxruntime", "openvino"):
        assert result["runtimes"][name]["max_map_diff"] <= 1e-4
    assert {"onnx_export_s", "openvino_convert_s"} <= set(result["export"])


def test_quantised_variant_and_matmul_rate(tmp_path):
    bench = _load("bench_runtimes")
    assert bench.matmul_gflop_s({"vision_patch_size": 14, "vision_width": 64}, 56, repeats=1) > 0
    args = bench.parse_args(["--quick"])
    assert (args.preset, args.image_size, args.repeats) == ("tiny", 56, 1)
    args = bench.parse_args([])
    assert (args.preset, args.image_size, args.repeats) == ("ViT-L/14@336px", 518, 3)
