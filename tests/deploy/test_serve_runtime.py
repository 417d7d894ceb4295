"""serve.py --runtime onnxruntime --model DIR in an environment made from requirements-deploy.txt alone (no torch):
it starts, and its predictions are test_one_example.py --runtime's for the same files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pipeline import prediction
from pipeline.service.client import ServiceProcess
from tests.deploy.test_deploy_install import deploy_venv

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.deploy, pytest.mark.slow]


def test_service_runs_without_torch_and_equals_test_one_example(synthetic_datasets, trained_onnx_export, tmp_path):
    python = deploy_venv(tmp_path / "env")
    folder = synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Anomaly"
    images = sorted(folder.iterdir())
    args = ["--runtime", "onnxruntime", "--model", str(trained_onnx_export)]
    with ServiceProcess(args, tmp_path / "service.log", python=str(python)) as service:
        client = service.client()
        status, body = client.predict([(path.name, path.read_bytes()) for path in images], mask=True)
        assert status == 200, body
        status, manifest = client.json("GET", "/model")
        assert status == 200 and manifest["runtime"] == "onnxruntime"
    assert service.process.returncode == 0
    out = tmp_path / "cli"
    assert prediction.main(["--image_path", str(folder), *args, "--save_path", str(out)]) == 0
    rows = {Path(row["path"]).name: row for row in json.loads((out / "predictions.json").read_text())["predictions"]}
    served = {p["file"]: p for p in body["predictions"]}
    assert served.keys() == rows.keys() and len(rows) == len(images) == 3
    for name, row in rows.items():
        got = served[name]
        assert abs(got["score"] - row["score"]) <= 1e-6
        assert got["verdict"] == row["verdict"] and got["defect_pixels"] == row["defect_pixels"]
        assert base64.b64decode(got["mask_png"]) == (out / row["mask"]).read_bytes()
        assert got["thresholds"]["image_threshold"] == 0.5  # the export's stored thresholds
