"""A tiled few-shot flow through export.py: tiled thresholds and a tiled memory in one export, and its runs."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import prediction
from pipeline.cli import run_cli

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiled_export(trained_checkpoint, design_args, tmp_path_factory):
    """Three good 120 x 200 parts as references (tiles of 64), thresholds calibrated on them, both exported."""
    from deploy import export

    root = tmp_path_factory.mktemp("tiled_export")
    rng = np.random.default_rng(7)
    for folder, count in (("good", 3), ("new", 2)):
        (root / folder).mkdir()
        for number in range(count):
            pixels = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{number}.png")
    common = ["--checkpoint_path", str(trained_checkpoint), *design_args, "--tile_size", "64"]
    memory, thresholds = root / "memory.npz", root / "thresholds.json"
    assert prediction.main([*common, "--image_path", str(root / "good"), "--reference_path", str(root / "good"),
                            "--save_memory", str(memory), "--calibrate", "--save_thresholds", str(thresholds)]) == 0
    out = root / "onnx"
    # Tiling is the runtime's: thresholds calibrated tiled are stored without --accept_thresholds.
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *design_args, "--memory", str(memory),
                                 "--thresholds", str(thresholds), "--out", str(out)]) == 0
    return root, out


def test_the_export_runs_with_the_tiling_of_its_memory_and_thresholds(tiled_export):
    root, out = tiled_export
    manifest = json.loads((out / "anomalyclip.json").read_text())
    assert manifest["memory"]["tiling"] == {"tile_size": 64, "tile_overlap": 0.25}
    assert "thresholds_accepted" not in manifest
    assert prediction.main(["--runtime", "onnxruntime", "--model", str(out), "--image_path", str(root / "new"),
                            "--tile_size", "64", "--save_path", str(root / "tiled")]) == 0
    document = json.loads((root / "tiled" / "predictions.json").read_text())
    assert document["thresholds"]["source"].endswith("anomalyclip.json")
    assert all(row["verdict"] in ("normal", "anomalous") for row in document["predictions"])


def test_an_untiled_run_of_a_tiled_memory_is_one_line(tiled_export, capsys):
    root, out = tiled_export
    assert run_cli(prediction.main, ["--runtime", "onnxruntime", "--model", str(out), "--image_path",
                                     str(root / "new"), "--save_path", str(root / "untiled")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was built --tile_size 64 --tile_overlap 0.25 and this run is untiled" in err
