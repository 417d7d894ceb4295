"""Tiling around the exported graph (numpy, no torch): the same scores and maps as the torch path to 1e-4."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline import prediction
from pipeline.engine import ExportedScorer
from tests.conftest import REPO_ROOT
from tests.deploy.test_prediction_runtime import _SCRIPT_WITHOUT_TORCH

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiled_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiled_runtime")
    rng = np.random.default_rng(5)
    for name, (height, width) in {"wide.png": (120, 260), "small.png": (50, 60)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_runtime_tiling_equals_torch(tiled_images, trained_checkpoint, trained_onnx_export, design_args):
    files = sorted(tiled_images.iterdir())
    argv = ["--image_path", str(tiled_images), "--checkpoint_path", str(trained_checkpoint), "--tile_size", "64",
            "--batch_size", "3", *design_args]
    torch_results = list(prediction.scored_files(prediction.parse_args(argv), files, None))
    exported = ExportedScorer.load(str(trained_onnx_export), "onnxruntime")
    runtime_results = list(prediction.scored_files(prediction.parse_args(argv), files, exported))
    for (_, size, score, anomaly_map), (_, runtime_size, runtime_score, runtime_map) in zip(torch_results,
                                                                                        runtime_results):
        assert size == runtime_size and anomaly_map.shape == runtime_map.shape
        assert abs(score - runtime_score) <= 1e-4
        assert np.abs(anomaly_map - runtime_map).max() <= 1e-4
    assert torch_results[1][3].shape == (120, 260)  # wide.png: tiled, native size


def test_tiled_script_runs_without_torch(tiled_images, trained_checkpoint, trained_onnx_export, design_args,
                                        tmp_path):
    torch_run, runtime_run = tmp_path / "torch", tmp_path / "runtime"
    flags = ["--tile_size", "64", "--threshold", "0.5", "--pixel_threshold", "0.3"]
    assert prediction.main(["--image_path", str(tiled_images), "--checkpoint_path", str(trained_checkpoint),
                            "--save_path", str(torch_run), *flags, *design_args]) == 0
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT_WITHOUT_TORCH, str(REPO_ROOT / "test_one_example.py"), "--image_path",
         str(tiled_images), "--runtime", "onnxruntime", "--model", str(trained_onnx_export), "--save_path",
         str(runtime_run), *flags],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected, got = (json.loads((run / "predictions.json").read_text()) for run in (torch_run, runtime_run))
    assert expected["tiling"] == got["tiling"]
    for a, b in zip(expected["predictions"], got["predictions"]):
        assert a["tiles"] == b["tiles"] and abs(a["score"] - b["score"]) <= 1e-4
        with Image.open(torch_run / a["mask"]) as mask_a, Image.open(runtime_run / b["mask"]) as mask_b:
            assert mask_a.size == mask_b.size
            differing = np.count_nonzero(np.asarray(mask_a) != np.asarray(mask_b))
            assert differing <= 0.001 * mask_a.size[0] * mask_a.size[1]  # only pixels within 1e-4 of the threshold
    with Image.open(runtime_run / "wide.png.mask.png") as mask:
        assert mask.size == (260, 120)
