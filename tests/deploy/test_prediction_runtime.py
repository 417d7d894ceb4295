"""test.py and test_one_example.py with ``--runtime onnxruntime --model DIR``: the export scores as torch does.

Moved here from ``tests/test_test.py`` and ``tests/test_test_one_example.py`` (they run ONNX
Runtime). The script run happens in a subprocess where torch, torchvision and scipy cannot be
imported, as on a deployment machine without them.
"""

import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest

from pipeline import evaluation
from pipeline import prediction
from tests.conftest import E2E_IMAGE_SIZE, REPO_ROOT

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

BLOCKED = ("torch", "torchvision", "scipy")
# Installs an import blocker, then runs a script as ``python SCRIPT ARGS`` would (``__main__``).
_SCRIPT_WITHOUT_TORCH = r"""
import importlib.abc, runpy, sys

BLOCKED = ("torch", "torchvision", "scipy")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, f"blocked modules were loaded: {loaded}"
"""


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_example_script_runs_without_torch_and_equals_torch(synthetic_datasets, trained_checkpoint,
                                                                 trained_onnx_export, design_args, tmp_path):
    """``python test_one_example.py --runtime onnxruntime --model DIR`` with torch and scipy unimportable: the
    same predictions as the torch path, verdicts from the export's thresholds."""
    folder = synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Anomaly"
    thresholds = trained_onnx_export.parent / "thresholds.json"
    torch_run, runtime_run = tmp_path / "torch", tmp_path / "runtime"
    assert prediction.main(["--image_path", str(folder), "--checkpoint_path", str(trained_checkpoint),
                            "--save_path", str(torch_run), "--thresholds", str(thresholds), "--accept_thresholds",
                            *design_args]) == 0
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT_WITHOUT_TORCH, str(REPO_ROOT / "test_one_example.py"), "--image_path",
         str(folder), "--runtime", "onnxruntime", "--model", str(trained_onnx_export), "--save_path", str(runtime_run)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected, got = _read_csv(torch_run / "predictions.csv"), _read_csv(runtime_run / "predictions.csv")
    assert len(expected) == 3 and [row["path"] for row in expected] == [row["path"] for row in got]
    assert completed.stdout.count("\n") == len(expected)  # one printed line per image
    for a, b in zip(expected, got):
        assert abs(float(a["score"]) - float(b["score"])) <= 1e-4
        assert a["overlay"] == b["overlay"] and a["mask"] == b["mask"]
        if abs(float(a["score"]) - 0.5) > 1e-4:
            assert a["verdict"] == b["verdict"]
        assert abs(int(a["defect_pixels"]) - int(b["defect_pixels"])) <= 0.001 * 48 * 64 + 1
    assert json.loads((runtime_run / "predictions.json").read_text())["thresholds"]["image_threshold"] == 0.5


def test_runtime_scores_a_dataset_like_torch(synthetic_datasets, trained_checkpoint, trained_onnx_export,
                                             design_args, tmp_path):
    """test.py --runtime onnxruntime --model DIR: the exported graph scores the dataset as the torch path does."""
    torch_run, onnx_run = tmp_path / "torch", tmp_path / "onnx"
    common = ["--data_path", str(synthetic_datasets[1]), "--num_workers", "0", "--batch_size", "4"]
    assert evaluation.main([*common, "--save_path", str(torch_run), "--checkpoint_path", str(trained_checkpoint),
                            *design_args]) == 0
    assert evaluation.main([*common, "--save_path", str(onnx_run), "--runtime", "onnxruntime", "--model",
                            str(trained_onnx_export)]) == 0

    def scores(run):
        return {row["img_path"]: float(row["score"]) for row in _read_csv(run / "scores.csv")}

    expected, got = scores(torch_run), scores(onnx_run)
    assert expected.keys() == got.keys()
    assert max(abs(expected[k] - got[k]) for k in expected) <= 1e-4
    summary = json.loads((onnx_run / "results.json").read_text())
    assert summary["runtime"] == "onnxruntime" and summary["config"]["image_size"] == E2E_IMAGE_SIZE
    assert summary["checkpoint_sha256"] == hashlib.sha256(trained_checkpoint.read_bytes()).hexdigest()
