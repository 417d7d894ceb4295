"""The torch-free runtime: preprocessing equal to the torch transform, outputs equal to the torch module.

Both runtimes (ONNX Runtime on the ONNX export, OpenVINO on the IR and on the ONNX file) are
held to 1e-4 against :class:`AnomalyCLIPInference` on the tiny backbone; a subprocess with torch
made unimportable runs the runtime end to end.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy import export
from deploy import runtime
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference
from AnomalyCLIP_lib.transform import image_transform, load_image
from tests.deploy_helpers import TINY_SIZE, random_images, random_prompt_learner, save_prompt_checkpoint
from pipeline.config import ModelSpec, ScoringSpec
from pipeline.loading import load_model_and_prompts, scoring_config

for _package in ("onnx", "onnxruntime", "openvino"):
    pytest.importorskip(_package)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
FEATURES = [6, 12, 18, 24]


@pytest.fixture(scope="module")
def exported(tiny_clip_state, tiny_model, tmp_path_factory):
    """``(torch module, {"onnx": dir, "openvino": dir}, image files)``."""
    root = tmp_path_factory.mktemp("runtime")
    torch.save(tiny_clip_state, root / "backbone.pt")
    save_prompt_checkpoint(random_prompt_learner(tiny_model), root / "prompts.pth")
    spec = ModelSpec(backbone=str(root / "backbone.pt"), image_size=TINY_SIZE, features_list=tuple(FEATURES))
    scoring = ScoringSpec(checkpoint_path=str(root / "prompts.pth"), sigma=4.0)
    model, prompt_learner, _ = load_model_and_prompts(spec, torch.device("cpu"), scoring.checkpoint_path)
    module = AnomalyCLIPInference.from_model(model, prompt_learner, scoring_config(spec, scoring))
    dirs = {}
    for fmt in ("onnx", "openvino"):
        out = root / fmt
        out.mkdir()
        if fmt == "onnx":
            files = export.write_graph(module.export_copy(), out, "onnx")
        else:  # convert the ONNX export (what export.py does) without tracing again
            export.onnx_to_openvino(dirs["onnx"] / "anomalyclip.onnx", out / "anomalyclip.xml")
            files = ["anomalyclip.xml", "anomalyclip.bin"]
        config = export.ExportConfig(checkpoint_path=scoring.checkpoint_path, out=str(out), model=spec,
                                     sigma=scoring.sigma, format=fmt)
        (out / "anomalyclip.json").write_text(json.dumps(export.build_manifest(config, module, files, {"image": 0.5})))
        dirs[fmt] = out
    return module, dirs, _image_files(root / "images")


def _image_files(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8))
    paths = {"rgb.png": rgb, "gray.png": rgb.convert("L"), "rgba.png": rgb.convert("RGBA"),
             "palette.png": rgb.convert("P"), "big.jpg": rgb.resize((300, 200))}
    for name, image in paths.items():
        image.save(folder / name)
    Image.fromarray(rng.integers(0, 4096, (40, 50), dtype=np.uint16)).save(folder / "ct16.png")  # 'I;16'
    return sorted(folder.iterdir())


def _torch_outputs(module, images: np.ndarray):
    prediction = module.predict(torch.from_numpy(images))
    return prediction.scores.numpy(), prediction.maps.numpy()


@pytest.fixture(scope="module")
def loaded(exported):
    """Loaded exports by ``(runtime, format)``, made on first use."""
    cache = {}

    def get(runtime_name, fmt):
        if (runtime_name, fmt) not in cache:
            cache[runtime_name, fmt] = runtime.ExportedModel(exported[1][fmt], runtime_name)
        return cache[runtime_name, fmt]

    return get


@pytest.mark.parametrize("runtime_name, fmt", [("onnxruntime", "onnx"), ("openvino", "openvino"), ("openvino", "onnx")])
def test_runtime_equals_the_torch_module(exported, loaded, runtime_name, fmt):
    module, _, _ = exported
    model = loaded(runtime_name, fmt)
    for batch, seed in ((1, 0), (3, 1)):  # the graph was traced with batch 1
        images = random_images(batch, seed=seed).numpy()
        scores, maps = model.predict(images)
        expected_scores, expected_maps = _torch_outputs(module, images)
        assert scores.shape == (batch,) and maps.shape == (batch, TINY_SIZE, TINY_SIZE) and maps.dtype == np.float32
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=TOL)
        np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=TOL)
    assert model.thresholds == {"image": 0.5} and model.scoring["features_list"] == FEATURES


def test_preprocessing_is_bit_identical_to_the_torch_transform(exported):
    _, dirs, files = exported
    for size in (TINY_SIZE, 518):
        transform = image_transform(size)
        for path in files:
            ours = runtime.preprocess(runtime.load_image(path), size, *_norm(dirs["onnx"]))
            expected = transform(load_image(path)).numpy()
            assert ours.dtype == np.float32 and ours.shape == (3, size, size)
            assert np.array_equal(ours, expected), path.name


def _norm(folder):
    preprocessing = json.loads((folder / "anomalyclip.json").read_text())["preprocessing"]
    return preprocessing["mean"], preprocessing["std"]


@pytest.mark.parametrize("runtime_name, fmt", [("onnxruntime", "onnx"), ("openvino", "openvino")])
def test_files_equal_the_torch_path(exported, loaded, runtime_name, fmt):
    module, _, files = exported
    model = loaded(runtime_name, fmt)
    results = list(model.predict_files(files, batch_size=4))
    transform = image_transform(TINY_SIZE)
    expected_scores, expected_maps = _torch_outputs(module,
                                                    torch.stack([transform(load_image(p)) for p in files]).numpy())
    assert [r.path for r in results] == files
    np.testing.assert_allclose([r.score for r in results], expected_scores, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), expected_maps, rtol=0, atol=TOL)


_TORCH_FREE = r"""
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    BLOCKED = ("torch", "torchvision", "scipy")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is still importable")
from deploy.runtime import ExportedModel
out = {}
for runtime_name, folder in json.loads(sys.argv[1]).items():
    model = ExportedModel(folder, runtime_name)
    out[runtime_name] = [[str(r.path), r.score, float(r.anomaly_map.sum())] for r in model.predict_files(sys.argv[2:])]
assert not any(m.split(".")[0] in Blocker.BLOCKED for m in sys.modules), "a blocked module was loaded"
print(json.dumps(out))
"""


def test_runtime_runs_with_torch_unimportable(exported):
    """deploy.runtime imported, both exports loaded and images scored where torch, torchvision and scipy raise
    ImportError: the runtime needs none of them (test_prediction_runtime.py runs test_one_example.py so)."""
    module, dirs, files = exported
    folders = json.dumps({"onnxruntime": str(dirs["onnx"]), "openvino": str(dirs["openvino"])})
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run([sys.executable, "-c", _TORCH_FREE, folders, *map(str, files)], check=False, env=env,
                               capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    transform = image_transform(TINY_SIZE)
    scores, maps = _torch_outputs(module, torch.stack([transform(load_image(p)) for p in files]).numpy())
    for rows in out.values():
        assert [row[0] for row in rows] == [str(p) for p in files]
        np.testing.assert_allclose([row[1] for row in rows], scores, rtol=0, atol=TOL)
        np.testing.assert_allclose([row[2] for row in rows], maps.sum(axis=(1, 2)), rtol=1e-5)


_DROPPED_IN_LOAD_ORDER = r"""
import faulthandler, gc, os, signal, sys
from deploy.runtime import ExportedModel

faulthandler.enable()  # as pytest does: Python's own alternate signal stack for the main thread
models = [ExportedModel(sys.argv[1], "openvino") for _ in range(3)]
while models:
    models.pop(0)  # first loaded, first dropped
    gc.collect()
handled = []
signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))  # Python's handlers run on that stack
os.kill(os.getpid(), signal.SIGUSR1)
assert handled
print("handled")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_dropping_openvino_models_in_load_order_keeps_signals_working(exported):
    """Models released first-in-first-out leave the process able to take a signal.

    With one ``openvino.Core`` per model, each Core's CPU plugin swapped in an alternate signal
    stack of its own, and released in that order they left the main thread's on unmapped
    memory: the next Python signal handler (torch's DataLoader SIGCHLD handler, when a later test
    ran a subprocess) killed the pytest process with SIGSEGV.
    """
    completed = subprocess.run([sys.executable, "-c", _DROPPED_IN_LOAD_ORDER, str(exported[1]["openvino"])],
                               check=False, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                               text=True, timeout=120, cwd=REPO_ROOT)
    assert completed.returncode == 0 and completed.stdout.split() == ["handled"], \
        f"exit status {completed.returncode}: {completed.stderr[-3000:]}"


def test_errors(exported, loaded, tmp_path):
    _, dirs, _ = exported
    with pytest.raises(AnomalyCLIPError, match="holds no anomalyclip.json"):
        runtime.ExportedModel(tmp_path)
    with pytest.raises(AnomalyCLIPError, match="onnxruntime runs .onnx graphs"):
        runtime.ExportedModel(dirs["openvino"], "onnxruntime")
    with pytest.raises(AnomalyCLIPError, match="unknown runtime"):
        runtime.ExportedModel(dirs["onnx"], "tensorrt")
    model = loaded("onnxruntime", "onnx")
    with pytest.raises(AnomalyCLIPError, match=r"\(B, 3, 56, 56\)"):
        model.predict(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(AnomalyCLIPError, match="does not exist"):
        list(model.predict_files([tmp_path / "missing.png"]))
    (tmp_path / "anomalyclip.json").write_text(json.dumps({"manifest_version": 99}))
    with pytest.raises(AnomalyCLIPError, match="manifest version 99"):
        runtime.ExportedModel(tmp_path)


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "openvino"])
def test_damaged_or_mismatched_exports_are_one_line(exported, tmp_path, runtime_name):
    """A graph cut short, and a manifest whose image size is not the graph's: our words, naming the file."""
    import shutil

    _, dirs, _ = exported
    damaged = shutil.copytree(dirs["onnx"], tmp_path / "damaged")
    graph = damaged / "anomalyclip.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    manifest = json.loads((damaged / "anomalyclip.json").read_text())
    del manifest["files_sha256"]  # an earlier export's manifest: the runtime itself meets the cut file
    (damaged / "anomalyclip.json").write_text(json.dumps(manifest))
    with pytest.raises(AnomalyCLIPError, match=rf"^{runtime_name} cannot load {graph} \(.+\): the file is damaged "
                                               r"or was not written by export.py; re-run export.py$"):
        runtime.ExportedModel(damaged, runtime_name)
    edited = shutil.copytree(dirs["onnx"], tmp_path / "edited")
    manifest = json.loads((edited / "anomalyclip.json").read_text())
    manifest["image_size"] = 2 * TINY_SIZE
    (edited / "anomalyclip.json").write_text(json.dumps(manifest))
    with pytest.raises(AnomalyCLIPError, match=rf"says image_size {2 * TINY_SIZE} but .* takes \(3, {TINY_SIZE}, "
                                               rf"{TINY_SIZE}\): they come from different exports"):
        runtime.ExportedModel(edited, runtime_name)


def test_exported_scorer_has_the_module_interface(exported):
    from pipeline.engine import ExportedScorer

    module, dirs, _ = exported
    images = random_images(2, seed=5)
    expected = module.predict(images)
    for runtime_name, fmt in (("onnxruntime", "onnx"), ("openvino", "openvino")):
        scorer = ExportedScorer.load(dirs[fmt], runtime_name)
        assert scorer.image_size == TINY_SIZE
        scores, maps = scorer.predict(images)  # the torch batch a DataLoader makes
        np.testing.assert_allclose(scores, expected.scores.numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(maps, expected.maps.numpy(), rtol=0, atol=TOL)
