"""User mistakes with ``--runtime onnxruntime --model DIR``: one ``error:`` line, exit status 2, nothing written.

Moved here from ``tests/test_user_errors.py`` (they load ONNX exports); the shared inputs and
checks (``paths``, ``refused``, ``run``) are that module's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_user_errors import make_paths, refused, run

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def paths(synthetic_datasets, trained_checkpoint, tiny_clip_files, tmp_path_factory) -> dict[str, Path]:
    """``tests/test_user_errors.py``'s shared inputs."""
    return make_paths(synthetic_datasets, trained_checkpoint, tiny_clip_files, tmp_path_factory.mktemp("user_errors"))


@pytest.fixture(scope="module")
def onnx_export(trained_onnx_export) -> Path:
    """The ONNX export of the shared checkpoint (56 px, layers 6 24, sigma 4; tests/deploy/conftest.py)."""
    return trained_onnx_export


def runtime_argv(cli: str, paths: dict[str, Path], model: Path, out: Path) -> list:
    """A valid ``--runtime onnxruntime`` command line of test.py or test_one_example.py, without model flags."""
    source = ["--data_path", paths["target"], "--num_workers", 0] if cli == "test" else ["--image_path", paths["image"]]
    return [*source, "--save_path", out, "--runtime", "onnxruntime", "--model", model]


EXPORT_MISMATCHES = [
    ("test", ["--image_size", "518"], "--image_size 518 (the export's: 56)"),
    ("one", ["--image_size", "112", "--sigma", "2"],
     "--image_size 112 (the export's: 56); --sigma 2.0 (the export's: 4.0)"),
    ("one", ["--features_list", "24"], "--features_list 24 (the export's: 6 24)"),
    ("test", ["--reference_arithmetic"], "--reference_arithmetic on (the export's: off)"),
    ("one", ["--n_ctx", "8"], "--n_ctx 8 (the export's: 12)"),
    ("test", ["--checkpoint_path", "{torchscript}"],
     "--checkpoint_path {torchscript} (not the file the export was made from)"),
    ("one", ["--backbone", "ViT-L/14@336px"], "--backbone ViT-L/14@336px (not the file the export was made from)"),
]


@pytest.mark.parametrize("cli, flags, expected", EXPORT_MISMATCHES,
                         ids=[f"{cli}{flags[0]}" for cli, flags, _ in EXPORT_MISMATCHES])
def test_runtime_flags_the_export_cannot_honour_are_refused(cli, flags, expected, paths, onnx_export, tmp_path,
                                                            capsys):
    """--runtime takes the design from the export: a flag given otherwise was silently replaced; now it is named,
    with the export's value, before the graph loads and before anything is written."""
    flags = [flag.format(**paths) for flag in flags]
    out = tmp_path / "out"
    line = refused(cli, [*runtime_argv(cli, paths, onnx_export, out), *flags], capsys)
    assert line == (f"error: {expected.format(**paths)}: {onnx_export} was exported otherwise and an exported graph's "
                    "design is fixed; drop the flag(s), or run export.py again with them")
    assert not out.exists()


def test_runtime_flags_equal_to_the_export_are_taken(paths, onnx_export, design_args, tmp_path, capsys):
    """The export's own settings, the default --feature_map_layer list (only its first value counts) and the
    checkpoint under another path (same SHA-256) are accepted; results.json records the export's design and no
    private attribute of the parsed flags."""
    checkpoint_copy = tmp_path / "copy.pth"
    shutil.copy(paths["checkpoint"], checkpoint_copy)
    out = tmp_path / "out"
    argv = [*runtime_argv("test", paths, onnx_export, out), *design_args, "--sigma", "4", "--feature_map_layer", 0, 3,
            "--checkpoint_path", checkpoint_copy]
    status, stderr = run("test", argv, capsys)
    assert status == 0, stderr[-3000:]
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["image_size"], config["features_list"], config["sigma"]) == (56, [6, 24], 4.0)
    assert not [key for key in config if key.startswith("_")]


@pytest.mark.parametrize("edit, expected", [
    (lambda manifest: manifest.pop("scoring"), "lacks the field 'scoring'"),
    (lambda manifest: manifest["scoring"].pop("sigma"), "lacks the field 'scoring.sigma'"),
    (lambda manifest: manifest["design"].update(n_ctx="12"), "'design.n_ctx' has the wrong type ('12')"),
    (lambda manifest: manifest.update(image_size=True), "'image_size' has the wrong type (True)"),
    (lambda manifest: manifest.update(backbone="tiny.pt"), "'backbone' must be an object, not 'tiny.pt'"),
], ids=["no_scoring", "no_sigma", "n_ctx_a_string", "image_size_a_bool", "backbone_a_string"])
def test_hand_edited_export_manifest_is_one_line(edit, expected, paths, onnx_export, tmp_path, capsys):
    """A manifest that lacks a field this code reads (a KeyError traceback before) or holds a wrong type."""
    model = shutil.copytree(onnx_export, tmp_path / "model")
    manifest = json.loads((model / "anomalyclip.json").read_text())
    edit(manifest)
    (model / "anomalyclip.json").write_text(json.dumps(manifest))
    line = refused("one", runtime_argv("one", paths, model, tmp_path / "out"), capsys)
    assert line.startswith(f"error: {model / 'anomalyclip.json'}") and expected in line and "re-run export.py" in line
