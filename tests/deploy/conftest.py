"""Fixtures of the deploy tests: an ONNX export of the shared trained checkpoint."""

import json

import pytest


@pytest.fixture(scope="session")
def trained_onnx_export(trained_checkpoint, design_args, tmp_path_factory):
    """export.py's ONNX export of ``trained_checkpoint`` (56 px, layers 6 24, sigma 4) with the thresholds of
    one class, ``parts`` (image 0.5, pixel 0.3), written by hand (no provenance: stored with
    --accept_thresholds); read-only for the tests (they copy what they change)."""
    pytest.importorskip("onnx")
    from deploy import export
    from pipeline.cli import run_cli

    folder = tmp_path_factory.mktemp("trained_export")
    thresholds = folder / "thresholds.json"
    thresholds.write_text(json.dumps({"version": 1, "classes": {"parts": {"image_threshold": 0.5,
                                                                          "pixel_threshold": 0.3, "method": "f1"}}}))
    out = folder / "onnx"
    assert run_cli(export.main, ["--checkpoint_path", str(trained_checkpoint), *design_args, "--format", "onnx",
                                 "--out", str(out), "--thresholds", str(thresholds), "--accept_thresholds"]) == 0
    return out
