"""tools/check_precision.py: one test.py run per precision on a labelled set, compared with fp32.

The comparison is recomputed here from the runs' own files (results.json means, scores.csv rows),
and each run must have computed in its precision (results.json records it).
"""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.deploy  # ONNX Runtime and OpenVINO in this process
for _package in ("onnx", "onnxruntime", "openvino"):
    pytest.importorskip(_package)

SCRIPT = REPO_ROOT / "tools" / "check_precision.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_precision_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_precision = _load()


@pytest.fixture(scope="module")
def exports(trained_checkpoint, design_args, tmp_path_factory):
    from deploy import export

    folder = tmp_path_factory.mktemp("exports")
    base = ["--checkpoint_path", str(trained_checkpoint), *design_args]
    assert export.main([*base, "--out", str(folder / "fp32")]) == 0
    assert export.main([*base, "--out", str(folder / "int8"), "--quantize", "int8"]) == 0
    return folder / "fp32", folder / "int8"


def _scores(path):
    with open(path, newline="") as handle:
        return {row["img_path"]: float(row["score"]) for row in csv.DictReader(handle)}


def test_each_precision_is_run_and_compared_with_fp32(exports, synthetic_datasets, tmp_path, capsys):
    from pipeline.cli import run_cli

    save = tmp_path / "check"
    assert run_cli(check_precision.main, ["--model", str(exports[0]), "--int8_model", str(exports[1]),
                                          "--data_path", str(synthetic_datasets[1]), "--save_path", str(save),
                                          "--precisions", "int8", "--batch_size", "4"]) == 0
    rows = json.loads((save / "check_precision.json").read_text())["rows"]
    assert [row["precision"] for row in rows] == ["fp32", "int8"]  # fp32 added first: the reference
    results = {p: json.loads((save / p / "results.json").read_text()) for p in ("fp32", "int8")}
    assert (results["fp32"]["precision"], results["int8"]["precision"]) == ("fp32", "int8")
    for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert rows[0][f"delta_{name}"] == 0
        assert rows[1][f"delta_{name}"] == pytest.approx(results["int8"]["mean"][name] -
                                                         results["fp32"]["mean"][name], abs=1e-12)
    fp32, int8 = _scores(save / "fp32" / "scores.csv"), _scores(save / "int8" / "scores.csv")
    expected = np.max(np.abs(np.array([int8[path] - fp32[path] for path in fp32])))
    assert rows[0]["max_score_change"] == 0 and rows[1]["max_score_change"] == pytest.approx(expected, abs=1e-9)
    assert rows[1]["max_score_change"] > 0  # quantised: other scores
    out = capsys.readouterr().out
    assert "| int8 " in out and "onnxruntime" in out


@pytest.mark.parametrize("flags, message", [
    (["--precisions", "int8"], "--precisions int8 needs --int8_model DIR: the model exported with export.py --format "
                               "onnx --quantize int8"),
    (["--runtime", "onnxruntime", "--precisions", "bf16"], "--precisions fp16/bf16 run on OpenVINO: use --runtime "
                                                           "openvino"),
])
def test_a_precision_that_cannot_run_is_one_line(flags, message, tmp_path, capsys):
    from pipeline.cli import run_cli

    save = tmp_path / "check"
    assert run_cli(check_precision.main, ["--model", str(tmp_path), "--data_path", str(tmp_path), "--save_path",
                                          str(save), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not save.exists()
