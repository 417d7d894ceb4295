"""Tests of thresholds.py against hand-computed thresholds."""

import json

import numpy as np
import pytest

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from thresholds import (NormalTail, class_entry, load_thresholds, normal_fpr_threshold, save_thresholds,
                        select_thresholds)


def test_normal_fpr_threshold_flags_at_most_the_allowed_fraction():
    values = np.arange(1, 101, dtype=np.float32) / 100  # 0.01 .. 1.00
    threshold = normal_fpr_threshold(values, 0.05)
    # 5 of 100 may be flagged: 0.96..1.00 reach it, 0.95 must not.
    assert 0.95 < threshold <= 0.96
    assert int((values >= threshold).sum()) == 5


def test_zero_fpr_is_just_above_the_maximum():
    values = np.array([0.2, 0.7, 0.4], dtype=np.float32)
    threshold = normal_fpr_threshold(values, 0.0)
    assert threshold > 0.7 and np.float32(threshold) == np.nextafter(np.float32(0.7), np.float32(1))


def test_ties_never_exceed_the_target():
    values = np.array([0.1] * 5 + [0.9] * 5, dtype=np.float32)
    threshold = normal_fpr_threshold(values, 0.3)  # 3 allowed, but the top 5 tie
    assert int((values >= threshold).sum()) == 0
    assert threshold > 0.9


def test_streaming_equals_one_array():
    rng = np.random.default_rng(0)
    chunks = [rng.random((7, 9), dtype=np.float32) for _ in range(6)]
    tail = NormalTail(sum(c.size for c in chunks), 0.02)
    for chunk in chunks:
        tail.update(chunk)
    everything = np.concatenate([c.ravel() for c in chunks])
    expected = np.sort(everything)[::-1][int(0.02 * everything.size)]  # the first value that must stay unflagged
    assert tail.threshold() == float(np.nextafter(expected, np.float32(np.inf)))


def test_bad_fpr_and_no_normals_are_one_line_errors():
    with pytest.raises(AnomalyCLIPError, match="--target_fpr"):
        normal_fpr_threshold(np.ones(3), 1.5)
    with pytest.raises(AnomalyCLIPError, match="no normal values"):
        normal_fpr_threshold(np.ones(0), 0.01)


def test_file_round_trip_and_selection(tmp_path):
    path = tmp_path / "thresholds.json"
    save_thresholds(path, {"bottle": class_entry(0.5, 0.25, "f1"), "cable": class_entry(0.6, float("nan"), "normal_fpr",
                                                                                      target_fpr=0.01)})
    document = json.loads(path.read_text())
    assert document["classes"]["cable"] == {"image_threshold": 0.6, "pixel_threshold": None,
                                            "method": "normal_fpr", "target_fpr": 0.01}
    classes = load_thresholds(path)
    assert select_thresholds(classes, "bottle") == (0.5, 0.25)
    with pytest.raises(AnomalyCLIPError, match="--class_name"):
        select_thresholds(classes, None)
    with pytest.raises(AnomalyCLIPError, match="no class 'wood'"):
        select_thresholds(classes, "wood")


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(AnomalyCLIPError, match="does not exist"):
        load_thresholds(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnomalyCLIPError, match="not readable JSON"):
        load_thresholds(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(AnomalyCLIPError, match="no 'classes'"):
        load_thresholds(tmp_path / "other.json")
