"""export.py: the graph files, the manifest, and one-line errors."""

import hashlib
import json

import pytest
import torch

from deploy import export
from deploy import runtime
from AnomalyCLIP_lib.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tests.deploy_helpers import TINY_SIZE, random_prompt_learner, save_prompt_checkpoint

pytest.importorskip("onnx")  # torch.onnx.export writes through it; the OpenVINO test skips itself


@pytest.fixture(scope="module")
def files(tiny_clip_state, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_inputs")
    torch.save(tiny_clip_state, folder / "backbone.pt")
    save_prompt_checkpoint(random_prompt_learner(tiny_model), folder / "prompts.pth")
    # Made for exactly the settings of _argv (written out by hand): the export accepts them as they are.
    provenance = {"checkpoint_sha256": _sha(folder / "prompts.pth"), "backbone_sha256": _sha(folder / "backbone.pt"),
                  "image_size": TINY_SIZE, "sigma": 2.0, "features_list": [6, 24], "feature_map_layer": 0}
    (folder / "thresholds.json").write_text(json.dumps({"version": 1, "source": "val", "classes": {
        "parts": {"image_threshold": 0.61, "pixel_threshold": 0.4, "method": "f1", "provenance": provenance}}}))
    return folder


def _argv(files, out, fmt, *extra):
    return ["--checkpoint_path", str(files / "prompts.pth"), "--backbone", str(files / "backbone.pt"),
            "--image_size", str(TINY_SIZE), "--features_list", "6", "24", "--sigma", "2", "--format", fmt,
            "--out", str(out), *extra]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def onnx_export(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_export")
    assert export.main(_argv(files, out, "onnx", "--thresholds", str(files / "thresholds.json"))) == 0
    return out


def test_manifest(onnx_export, files):
    manifest = json.loads((onnx_export / "anomalyclip.json").read_text())
    assert manifest["format"] == "onnx" and manifest["graph"] == "anomalyclip.onnx"
    assert manifest["image_size"] == TINY_SIZE
    assert manifest["preprocessing"]["mean"] == list(OPENAI_DATASET_MEAN)
    assert manifest["preprocessing"]["std"] == list(OPENAI_DATASET_STD)
    assert manifest["scoring"] == {"image_size": TINY_SIZE, "features_list": [6, 24], "dpam_layer": 20, "sigma": 2.0,
                                   "feature_map_layer": 0, "reference_arithmetic": False, "precision": "fp32",
                                   "smoothing": "torch"}
    assert manifest["design"] == {"n_ctx": 12, "depth": 9, "t_n_ctx": 4}
    assert manifest["backbone"]["sha256"] == _sha(files / "backbone.pt")
    assert manifest["checkpoint"]["sha256"] == _sha(files / "prompts.pth")
    assert manifest["thresholds"] == json.loads((files / "thresholds.json").read_text())
    assert sorted(p.name for p in onnx_export.iterdir()) == ["anomalyclip.json", "anomalyclip.onnx"]  # no temp files


def test_onnx_graph_has_a_dynamic_batch_and_opset_17(onnx_export):
    import onnx

    model = onnx.load(str(onnx_export / "anomalyclip.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (image_input,) = model.graph.input
    dims = image_input.type.tensor_type.shape.dim
    assert image_input.name == "images" and dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, TINY_SIZE, TINY_SIZE]
    assert [o.name for o in model.graph.output] == ["scores", "maps"]


def test_openvino_export(files, tmp_path):
    ov = pytest.importorskip("openvino")

    assert export.main(_argv(files, tmp_path, "openvino")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anomalyclip.bin", "anomalyclip.json", "anomalyclip.xml"]
    manifest = json.loads((tmp_path / "anomalyclip.json").read_text())
    assert manifest["graph"] == "anomalyclip.xml" and "thresholds" not in manifest
    model = runtime.openvino_core().read_model(str(tmp_path / "anomalyclip.xml"))
    shape = model.inputs[0].get_partial_shape()
    assert shape[0].is_dynamic and [shape[i].get_length() for i in (1, 2, 3)] == [3, TINY_SIZE, TINY_SIZE]
    constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
    assert constants and not [op for op in constants if op.get_element_type() == ov.Type.f16]  # weights kept fp32


@pytest.mark.parametrize("case, message", [
    ("missing_checkpoint", "prompt checkpoint"),
    ("bad_thresholds", "is not a readable JSON file"),
    ("missing_thresholds", "does not exist"),
    ("out_is_file", "is a file"),
    ("bad_layer", "outside 1..24"),
])
def test_errors_are_one_line(files, tmp_path, capsys, case, message):
    from pipeline.cli import run_cli

    argv = _argv(files, tmp_path / "out", "onnx")
    if case == "missing_checkpoint":
        argv[1] = str(tmp_path / "missing.pth")
    elif case == "bad_thresholds":
        (tmp_path / "t.json").write_text("{not json")
        argv += ["--thresholds", str(tmp_path / "t.json")]
    elif case == "missing_thresholds":
        argv += ["--thresholds", str(tmp_path / "none.json")]
    elif case == "out_is_file":
        (tmp_path / "out").write_text("x")
    elif case == "bad_layer":
        argv[argv.index("6")] = "25"
    assert run_cli(export.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_opset_below_17_is_refused(files, tmp_path):
    with pytest.raises(SystemExit):
        export.parse_args(_argv(files, tmp_path, "onnx", "--opset", "16"))
