"""Thresholds hold only for the maps they were chosen on: every writer records the settings, every reader checks them.

A thresholds.json made for another sigma, image size, features list, feature-map layer, checkpoint or
backbone is refused by ``test_one_example.py --thresholds`` in one line naming the setting and both
values; ``--accept_thresholds`` uses it anyway and predictions.json records what was accepted.
(export.py and the runtimes: ``tests/deploy/test_thresholds_provenance.py``.)
"""

import hashlib
import json

import pytest
import torch

from pipeline import prediction as test_one_example
from pipeline.cli import run_cli
from tests.conftest import E2E_IMAGE_SIZE


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def good_images(synthetic_datasets):
    return synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Normal"


@pytest.fixture(scope="module")
def calibrated(good_images, trained_checkpoint, design_args, tmp_path_factory):
    """A thresholds.json calibrated with the design flags and --sigma 4 (the default)."""
    path = tmp_path_factory.mktemp("calibrated") / "thresholds.json"
    assert run_cli(test_one_example.main, ["--image_path", str(good_images), "--checkpoint_path",
                                           str(trained_checkpoint), "--calibrate", "--save_thresholds", str(path),
                                           "--class_name", "blobs", *design_args]) == 0
    return path


@pytest.fixture(scope="module")
def other_checkpoint(trained_checkpoint, tmp_path_factory):
    """The trained prompts with one learnable value moved: another file, another SHA-256."""
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    first = next(iter(checkpoint["prompt_learner"]))
    checkpoint["prompt_learner"][first] = checkpoint["prompt_learner"][first] + 1e-3
    path = tmp_path_factory.mktemp("other") / "epoch_1.pth"
    torch.save(checkpoint, path)
    return path


def test_calibration_records_the_settings(calibrated, trained_checkpoint, tiny_clip_files):
    entry = json.loads(calibrated.read_text())["classes"]["blobs"]
    assert entry["provenance"] == {"checkpoint_sha256": _sha(trained_checkpoint),
                                   "backbone_sha256": _sha(tiny_clip_files[0]), "image_size": E2E_IMAGE_SIZE,
                                   "sigma": 4.0, "features_list": [6, 24], "feature_map_layer": 0,
                                   "precision": "fp32"}


def _design(design_args, **changes):
    """``design_args`` with some flags replaced (``features_list="24"``)."""
    argv, flags = list(design_args), {f"--{name}": str(value).split() for name, value in changes.items()}
    out, skip = [], 0
    for position, token in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if token in flags:
            values = flags.pop(token)
            out += [token, *values]
            while position + 1 + skip < len(argv) and not argv[position + 1 + skip].startswith("--"):
                skip += 1
            continue
        out.append(token)
    for token, values in flags.items():
        out += [token, *values]
    return out


@pytest.mark.parametrize("change, expected", [
    ({"sigma": "2"}, "--sigma 2 against the thresholds' 4"),
    ({"image_size": "42"}, "--image_size 42 against the thresholds' 56"),
    ({"features_list": "24"}, "--features_list 24 against the thresholds' 6 24"),
    ({"feature_map_layer": "1"}, "--feature_map_layer 1 against the thresholds' 0"),
])
def test_other_settings_are_refused_in_one_line(calibrated, good_images, trained_checkpoint, design_args, tmp_path,
                                                capsys, change, expected):
    out = tmp_path / "out"
    argv = ["--image_path", str(good_images), "--checkpoint_path", str(trained_checkpoint), "--save_path", str(out),
            "--thresholds", str(calibrated), *_design(design_args, **change)]
    assert run_cli(test_one_example.main, argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: --thresholds {calibrated} was made for other settings")
    assert expected in error and "--accept_thresholds" in error
    assert not out.exists()  # refused before anything was written


def test_another_checkpoint_is_refused_and_the_override_is_recorded(calibrated, good_images, other_checkpoint,
                                                                    design_args, tmp_path, capsys):
    argv = ["--image_path", str(good_images), "--checkpoint_path", str(other_checkpoint), "--thresholds",
            str(calibrated), *design_args]
    assert run_cli(test_one_example.main, [*argv, "--save_path", str(tmp_path / "refused")]) == 2
    assert "--checkpoint_path (another file than the thresholds were made with)" in capsys.readouterr().err
    out = tmp_path / "accepted"
    assert run_cli(test_one_example.main, [*argv, "--save_path", str(out), "--accept_thresholds"]) == 0
    in_force = json.loads((out / "predictions.json").read_text())["thresholds"]
    assert in_force["accepted_other_settings"] == ["--checkpoint_path (another file than the thresholds were made "
                                                   "with)"]
    calibrated_entry = json.loads(calibrated.read_text())["classes"]["blobs"]
    assert in_force["image_threshold"] == calibrated_entry["image_threshold"]


def test_same_settings_are_accepted_without_the_flag(calibrated, good_images, trained_checkpoint, design_args,
                                                     tmp_path):
    out = tmp_path / "out"
    assert run_cli(test_one_example.main, ["--image_path", str(good_images), "--checkpoint_path",
                                           str(trained_checkpoint), "--save_path", str(out), "--thresholds",
                                           str(calibrated), *design_args]) == 0
    assert "accepted_other_settings" not in json.loads((out / "predictions.json").read_text())["thresholds"]


def test_a_file_without_provenance_is_refused(good_images, trained_checkpoint, design_args, tmp_path, capsys):
    hand_made = tmp_path / "thresholds.json"
    hand_made.write_text(json.dumps({"version": 1, "classes": {"parts": {"image_threshold": 0.5}}}))
    assert run_cli(test_one_example.main, ["--image_path", str(good_images), "--checkpoint_path",
                                           str(trained_checkpoint), "--save_path", str(tmp_path / "o"), "--thresholds",
                                           str(hand_made), *design_args]) == 2
    assert "it records no settings (written by hand or by an older version)" in capsys.readouterr().err
