"""export.py --thresholds and the runtime path check the thresholds' provenance as test_one_example.py does.

A thresholds.json calibrated at another sigma (or for another checkpoint) is refused by ``export.py
--thresholds`` and by ``test_one_example.py --runtime ... --thresholds`` in one line; ``--accept_thresholds``
stores / uses it and the manifest / predictions.json record what was accepted.
"""

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from deploy import export  # noqa: E402
from pipeline import prediction as test_one_example  # noqa: E402
from pipeline.cli import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def good_images(synthetic_datasets):
    return synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Normal"


def _calibrate(folder, good_images, checkpoint, design_args, *extra):
    path = folder / "thresholds.json"
    assert run_cli(test_one_example.main, ["--image_path", str(good_images), "--checkpoint_path", str(checkpoint),
                                           "--calibrate", "--save_thresholds", str(path), "--class_name", "blobs",
                                           *design_args, *extra]) == 0
    return path


@pytest.fixture(scope="module")
def thresholds_sigma_4(good_images, trained_checkpoint, design_args, tmp_path_factory):
    return _calibrate(tmp_path_factory.mktemp("sigma4"), good_images, trained_checkpoint, design_args)


@pytest.fixture(scope="module")
def thresholds_sigma_2(good_images, trained_checkpoint, design_args, tmp_path_factory):
    return _calibrate(tmp_path_factory.mktemp("sigma2"), good_images, trained_checkpoint, design_args, "--sigma", "2")


@pytest.fixture(scope="module")
def exported(trained_checkpoint, design_args, tmp_path_factory):
    """An ONNX export at the default sigma 4, without thresholds."""
    out = tmp_path_factory.mktemp("export")
    assert export.main(["--checkpoint_path", str(trained_checkpoint), *design_args, "--out", str(out)]) == 0
    return out


def test_export_refuses_thresholds_of_another_sigma(thresholds_sigma_2, trained_checkpoint, design_args, tmp_path,
                                                    capsys):
    out = tmp_path / "export"
    argv = ["--checkpoint_path", str(trained_checkpoint), *design_args, "--out", str(out), "--thresholds",
            str(thresholds_sigma_2)]
    assert run_cli(export.main, argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--sigma 4 against the thresholds' 2" in error
    assert not out.exists()
    assert run_cli(export.main, [*argv, "--accept_thresholds"]) == 0
    manifest = json.loads((out / "anomalyclip.json").read_text())
    assert manifest["thresholds_accepted"] == ["--sigma 4 against the thresholds' 2"]
    assert manifest["thresholds"] == json.loads(thresholds_sigma_2.read_text())


def test_runtime_refuses_thresholds_of_another_sigma(exported, thresholds_sigma_2, thresholds_sigma_4, good_images,
                                                     tmp_path, capsys):
    base = ["--image_path", str(good_images), "--runtime", "onnxruntime", "--model", str(exported)]
    assert run_cli(test_one_example.main, [*base, "--save_path", str(tmp_path / "a"), "--thresholds",
                                           str(thresholds_sigma_2)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--sigma 4 against the thresholds' 2" in error
    assert run_cli(test_one_example.main, [*base, "--save_path", str(tmp_path / "b"), "--thresholds",
                                           str(thresholds_sigma_4)]) == 0
    assert json.loads((tmp_path / "b" / "predictions.json").read_text())["thresholds"]["class_name"] == "blobs"


def test_runtime_checks_thresholds_embedded_in_a_hand_edited_manifest(exported, thresholds_sigma_2, good_images,
                                                                      tmp_path, capsys):
    """Thresholds written into the manifest by hand (not through export.py's check) are checked at load."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    manifest = json.loads((edited / "anomalyclip.json").read_text())
    manifest["thresholds"] = json.loads(thresholds_sigma_2.read_text())
    (edited / "anomalyclip.json").write_text(json.dumps(manifest))
    base = ["--image_path", str(good_images), "--runtime", "onnxruntime", "--model", str(edited)]
    assert run_cli(test_one_example.main, [*base, "--save_path", str(tmp_path / "a")]) == 2
    assert "--sigma 4 against the thresholds' 2" in capsys.readouterr().err
    assert run_cli(test_one_example.main, [*base, "--save_path", str(tmp_path / "b"), "--accept_thresholds"]) == 0
    in_force = json.loads((tmp_path / "b" / "predictions.json").read_text())["thresholds"]
    assert in_force["accepted_other_settings"] == ["--sigma 4 against the thresholds' 2"]
