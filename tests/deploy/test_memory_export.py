"""export.py --memory: the few-shot memory inside the graph, scored without torch as the torch path scores it."""

import json

import numpy as np
import pytest

from pipeline import prediction
from pipeline.cli import run_cli

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def memory_run(synthetic_datasets, trained_checkpoint, design_args, tmp_path_factory):
    """A memory of three good blobs, the torch path's predictions with it, and its ONNX export."""
    import shutil

    root = tmp_path_factory.mktemp("memory_export")
    meta = json.loads((synthetic_datasets[1] / "meta.json").read_text())
    items = [item for split in meta.values() for item in split["blobs"]]
    good = [item["img_path"] for item in items if not item["anomaly"]]
    new = good[3:] + [item["img_path"] for item in items if item["anomaly"]]
    for folder, paths in (("good", good[:3]), ("new", new)):
        (root / folder).mkdir()
        for path in paths:
            shutil.copy(synthetic_datasets[1] / path, root / folder / path.replace("/", "_"))
    memory = root / "memory.npz"
    common = ["--checkpoint_path", str(trained_checkpoint), *design_args]
    assert prediction.main([*common, "--image_path", str(root / "new"), "--reference_path", str(root / "good"),
                            "--save_memory", str(memory), "--save_path", str(root / "torch")]) == 0
    from deploy import export

    out = root / "onnx"
    assert run_cli(export.main, [*common, "--memory", str(memory), "--out", str(out)]) == 0
    return root, memory, out


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_with_an_exported_memory_equals_torch(memory_run, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    root, _, out = memory_run
    assert prediction.main(["--runtime", runtime, "--model", str(out), "--image_path", str(root / "new"),
                            "--save_path", str(root / runtime)]) == 0
    expected, got = (json.loads((root / name / "predictions.json").read_text()) for name in ("torch", runtime))
    torch_scores = np.array([p["score"] for p in expected["predictions"]])
    runtime_scores = np.array([p["score"] for p in got["predictions"]])
    assert len(torch_scores) == 5  # 2 good, 3 defective
    np.testing.assert_allclose(runtime_scores, torch_scores, atol=1e-4)
    assert got["memory"] == expected["memory"] and got["memory"]["k"] == 3


def test_the_manifest_records_the_memory(memory_run):
    _, memory, out = memory_run
    manifest = json.loads((out / "anomalyclip.json").read_text())["memory"]
    assert manifest["k"] == 3 and manifest["layers"] == [6, 12, 18, 24] and manifest["class_name"] == "good"
    assert len(manifest["references"]) == 3 and manifest["file"] == str(memory)


def test_the_service_reports_the_exported_memory(memory_run):
    """serve.py --runtime on a memory export: GET /model's memory (ServiceModel.manifest, no process) is the
    torch run's record (predictions.json) with the file export.py was given and its SHA-256."""
    import hashlib

    from pipeline.service.config import parse_args
    from pipeline.service.model import ServiceModel

    root, memory, out = memory_run
    model = ServiceModel.load(parse_args(["--runtime", "onnxruntime", "--model", str(out)]))
    reported = model.manifest()["memory"]
    expected = json.loads((root / "torch" / "predictions.json").read_text())["memory"]
    assert {key: reported[key] for key in expected} == expected and reported["k"] == 3
    assert reported["file"] == str(memory)
    assert reported["file_sha256"] == hashlib.sha256(memory.read_bytes()).hexdigest()


def test_a_memory_for_another_image_size_is_refused_by_export(memory_run, trained_checkpoint, design_args, tmp_path,
                                                             capsys):
    from deploy import export

    _, memory, _ = memory_run
    flags = list(design_args)
    flags[flags.index("--image_size") + 1] = "112"
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *flags, "--memory", str(memory),
                                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was built with --image_size 56 where this run uses 112" in err


def test_reference_flags_with_a_runtime_point_to_export(memory_run, capsys):
    root, memory, out = memory_run
    assert run_cli(prediction.main, ["--runtime", "onnxruntime", "--model", str(out), "--image_path",
                                     str(root / "new"), "--memory", str(memory), "--save_path",
                                     str(root / "x")]) == 2
    assert "run export.py --memory FILE" in capsys.readouterr().err


def test_test_py_on_a_memory_export_evaluates_its_one_class(memory_run, synthetic_datasets, tmp_path, capsys):
    from pipeline import evaluation

    _, _, out = memory_run
    base = ["--runtime", "onnxruntime", "--model", str(out), "--data_path", str(synthetic_datasets[1]),
            "--num_workers", "0"]
    assert run_cli(evaluation.main, [*base, "--save_path", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds the few-shot memory of one class (good)" in err and "--classes" in err
    assert run_cli(evaluation.main, [*base, "--classes", "blobs", "--save_path", str(tmp_path / "one")]) == 0
    provenance = json.loads((tmp_path / "one" / "thresholds.json").read_text())["classes"]["blobs"]["provenance"]
    assert provenance["memory"]["k"] == 3
