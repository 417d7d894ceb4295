"""Lower precision on the exported runtimes: ``--precision bf16|fp16`` with OpenVINO, ``int8`` exports.

What must hold: ``export.py --quantize int8`` writes a dynamically quantised ONNX graph and says
so in the manifest; ``--runtime openvino --precision bf16`` and an int8 export run and record
their precision in ``predictions.json``, ``results.json`` and the thresholds' provenance, with
scores near fp32's but not equal (they really computed in the lower precision); a precision the
export, the runtime or the CPU cannot run is one error line before anything is written;
thresholds chosen at one precision are refused at another unless ``--accept_thresholds``.
"""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("openvino")

from deploy import export, runtime  # noqa: E402
from pipeline import evaluation, prediction  # noqa: E402
from pipeline.cli import run_cli  # noqa: E402

needs_bf16 = pytest.mark.skipif("BF16" not in runtime.openvino_capabilities(),
                                reason="this CPU's OpenVINO offers no BF16")


@pytest.fixture(scope="module")
def good_images(synthetic_datasets):
    return synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Normal"


@pytest.fixture(scope="module")
def fp32_export(trained_checkpoint, design_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "onnx"
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *design_args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def int8_export(trained_checkpoint, design_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "onnx"
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *design_args, "--out", str(out),
                                 "--quantize", "int8"]) == 0
    return out


def _predict(images, model, runtime_name, save_path, *extra):
    argv = ["--image_path", str(images), "--runtime", runtime_name, "--model", str(model), "--save_path",
            str(save_path), *extra]
    assert run_cli(prediction.main, argv) == 0
    return json.loads((save_path / "predictions.json").read_text())


def _scores(document):
    return np.array([row["score"] for row in document["predictions"]])


def test_quantised_export_is_int8_and_says_so(int8_export, fp32_export):
    import onnx

    manifest = json.loads((int8_export / "anomalyclip.json").read_text())
    assert manifest["quantization"]["precision"] == "int8" and "quantize_dynamic" in manifest["quantization"]["method"]
    assert "quantization" not in json.loads((fp32_export / "anomalyclip.json").read_text())
    ops = {node.op_type for node in onnx.load(str(int8_export / "anomalyclip.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    fp32_ops = {node.op_type for node in onnx.load(str(fp32_export / "anomalyclip.onnx")).graph.node}
    assert "MatMulInteger" not in fp32_ops


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "openvino"])
def test_int8_export_runs_and_records_int8(int8_export, fp32_export, good_images, tmp_path, runtime_name):
    reference = _predict(good_images, fp32_export, "onnxruntime", tmp_path / "fp32")
    found = _predict(good_images, int8_export, runtime_name, tmp_path / "int8")  # --precision left out: the export's
    assert (reference["precision"], found["precision"], found["runtime"]) == ("fp32", "int8", runtime_name)
    difference = np.abs(_scores(found) - _scores(reference)).max()
    assert 0 < difference < 0.05  # quantised: not the fp32 numbers, but near them


@needs_bf16
def test_openvino_bf16_prediction_records_bf16(fp32_export, good_images, tmp_path):
    reference = _predict(good_images, fp32_export, "openvino", tmp_path / "fp32")
    found = _predict(good_images, fp32_export, "openvino", tmp_path / "bf16", "--precision", "bf16")
    assert (reference["precision"], found["precision"]) == ("fp32", "bf16")
    difference = np.abs(_scores(found) - _scores(reference)).max()
    assert 0 < difference < 0.05  # bf16 keeps 8 significant bits


@needs_bf16
def test_openvino_bf16_evaluation_records_bf16_everywhere(fp32_export, synthetic_datasets, tmp_path):
    out = tmp_path / "test"
    assert run_cli(evaluation.main, ["--data_path", str(synthetic_datasets[1]), "--runtime", "openvino", "--model",
                                     str(fp32_export), "--precision", "bf16", "--save_path", str(out),
                                     "--num_workers", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == results["config"]["precision"] == "bf16" and results["runtime"] == "openvino"
    classes = json.loads((out / "thresholds.json").read_text())["classes"]
    assert {entry["provenance"]["precision"] for entry in classes.values()} == {"bf16"}


@pytest.mark.parametrize("model, runtime_name, precision, message", [
    ("fp32", "onnxruntime", "int8", "--precision int8: {model} holds an fp32 graph; make a quantised one with "
                                    "export.py --format onnx --quantize int8 --out DIR and pass --model DIR"),
    ("fp32", "onnxruntime", "bf16", "--precision bf16 with --runtime onnxruntime: ONNX Runtime's CPU provider runs "
                                    "fp32 graphs in fp32 (and int8 exports); use --runtime openvino --precision bf16"),
    ("int8", "openvino", "fp32", "--precision fp32: {model} holds a graph quantised to int8 (export.py --quantize "
                                 "int8), which runs in int8 only; drop --precision, or export again without "
                                 "--quantize"),
])
def test_a_precision_the_export_cannot_run_is_one_line(fp32_export, int8_export, good_images, tmp_path, capsys,
                                                       model, runtime_name, precision, message):
    folder = fp32_export if model == "fp32" else int8_export
    out = tmp_path / "out"
    assert run_cli(prediction.main, ["--image_path", str(good_images), "--runtime", runtime_name, "--model",
                                     str(folder), "--precision", precision, "--save_path", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(model=folder)}\n"
    assert not out.exists()


def test_a_precision_the_cpu_does_not_offer_names_what_it_offers(fp32_export, good_images, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(runtime, "openvino_capabilities", lambda: ["WINOGRAD", "FP32", "INT8", "BIN"])
    out = tmp_path / "out"
    for precision, capability in (("bf16", "BF16"), ("fp16", "FP16")):
        assert run_cli(prediction.main, ["--image_path", str(good_images), "--runtime", "openvino", "--model",
                                         str(fp32_export), "--precision", precision, "--save_path", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: --precision {precision}: OpenVINO offers WINOGRAD, FP32, INT8, BIN "
                                           f"on this CPU, not {capability}; use --precision fp32\n")
    assert not out.exists()


def test_quantize_needs_the_onnx_format(trained_checkpoint, design_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *design_args, "--out", str(out),
                                 "--format", "openvino", "--quantize", "int8"]) == 2
    assert capsys.readouterr().err == ("error: --quantize int8 writes an ONNX graph (ONNX Runtime's quantisation; "
                                       "OpenVINO runs it too): use --format onnx\n")
    assert not out.exists()


@needs_bf16
def test_thresholds_of_one_precision_are_refused_at_another(fp32_export, good_images, tmp_path, capsys):
    calibrated = tmp_path / "fp32.json"
    base = ["--image_path", str(good_images), "--runtime", "openvino", "--model", str(fp32_export)]
    assert run_cli(prediction.main, [*base, "--calibrate", "--save_thresholds", str(calibrated), "--save_path",
                                     str(tmp_path / "c")]) == 0
    assert json.loads(calibrated.read_text())["classes"]["Normal"]["provenance"]["precision"] == "fp32"
    bf16 = [*base, "--precision", "bf16", "--thresholds", str(calibrated)]
    assert run_cli(prediction.main, [*bf16, "--save_path", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--precision bf16 against the thresholds' fp32" in error
    assert not (tmp_path / "refused").exists()
    accepted = _predict(good_images, fp32_export, "openvino", tmp_path / "accepted", "--precision", "bf16",
                        "--thresholds", str(calibrated), "--accept_thresholds")
    assert accepted["thresholds"]["accepted_other_settings"] == ["--precision bf16 against the thresholds' fp32"]


@needs_bf16
def test_thresholds_accepted_at_export_are_checked_again_at_another_precision(trained_checkpoint, design_args,
                                                                              good_images, tmp_path, capsys):
    """An export's stored thresholds were checked against fp32 maps: a bf16 run is a difference the export never had."""
    calibrated = tmp_path / "sigma2.json"
    assert run_cli(prediction.main, ["--image_path", str(good_images), "--checkpoint_path", str(trained_checkpoint),
                                     *design_args, "--sigma", "2", "--calibrate", "--save_thresholds",
                                     str(calibrated), "--save_path", str(tmp_path / "c")]) == 0
    out = tmp_path / "export"
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *design_args, "--out", str(out),
                                 "--thresholds", str(calibrated), "--accept_thresholds"]) == 0
    sigma = "--sigma 4 against the thresholds' 2"
    assert _predict(good_images, out, "openvino", tmp_path / "fp32")["thresholds"]["accepted_other_settings"] == [sigma]
    base = ["--image_path", str(good_images), "--runtime", "openvino", "--model", str(out), "--precision", "bf16"]
    capsys.readouterr()
    assert run_cli(prediction.main, [*base, "--save_path", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{sigma}; --precision bf16 against the thresholds' fp32" in error
    found = _predict(good_images, out, "openvino", tmp_path / "bf16", "--precision", "bf16", "--accept_thresholds")
    assert found["thresholds"]["accepted_other_settings"] == [sigma, "--precision bf16 against the thresholds' fp32"]
