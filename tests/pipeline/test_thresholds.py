"""Tests of thresholds.py against hand-computed thresholds."""

import json

import numpy as np
import pytest

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline.thresholds import (NormalTail, choose_class_thresholds, class_entry, load_thresholds,
                                normal_fpr_threshold,
                        save_thresholds, select_thresholds)


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


# --------------------------------------------------------------------------------------------
# choose_class_thresholds: one class of an evaluation run
# --------------------------------------------------------------------------------------------


def _class_case():
    """Four normal images (maps in [0, 0.5)), three anomalous ones with a bright 2x2 defect."""
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 0, 1, 0, 0, 1])
    maps = (rng.random((7, 8, 8)) * 0.5).astype(np.float32)
    masks = np.zeros((7, 8, 8), np.uint8)
    masks[labels == 1, 2:4, 2:4] = 1
    maps[masks == 1] += 0.6
    scores = np.array([0.2, 0.9, 0.3, 0.6, 0.25, 0.65, 0.8], np.float32)
    return labels, scores, maps, masks


def _hand_threshold(normal_values, target_fpr):
    ordered = np.sort(np.asarray(normal_values, np.float32).ravel())[::-1]
    return float(np.nextafter(ordered[int(np.floor(target_fpr * ordered.size + 1e-9))], np.float32(np.inf)))


def test_f1_entry_takes_the_f1_thresholds_and_reports_their_f1():
    labels, scores, maps, masks = _class_case()
    entry = choose_class_thresholds(labels, scores, maps, masks, (0.6, 0.6), "f1", 0.01)
    assert (entry["image_threshold"], entry["method"], entry["pixel_method"]) == (0.6, "f1", "f1")
    # score >= 0.6 flags 1, 3, 5, 6: 3 hits, 1 false alarm, no miss -> F1 = 6 / 7.
    assert entry["image_f1"] == pytest.approx(6 / 7)
    assert entry["normal_image_fpr"] == pytest.approx(1 / 4)
    assert entry["pixel_f1"] == pytest.approx(1.0)  # normal pixels < 0.5, defect pixels >= 0.6
    assert entry["normal_pixel_fpr"] == 0.0 and entry["warning"] is None
    assert (entry["n_normal_images"], entry["n_anomalous_images"], entry["n_normal_pixels"]) == (4, 3, 4 * 64)


def test_normal_fpr_entry_uses_normal_images_only():
    labels, scores, maps, masks = _class_case()
    entry = choose_class_thresholds(labels, scores, maps, None, (0.6, 0.6), "normal_fpr", 0.05)
    normal = labels == 0
    assert entry["method"] == entry["pixel_method"] == "normal_fpr" and entry["target_fpr"] == 0.05
    assert entry["image_threshold"] == _hand_threshold(scores[normal], 0.05)  # = just above 0.65
    assert entry["pixel_threshold"] == _hand_threshold(maps[normal], 0.05)
    achieved = np.mean(maps[normal] >= entry["pixel_threshold"])
    assert achieved <= 0.05 and entry["normal_pixel_fpr"] == pytest.approx(achieved)
    assert entry["pixel_f1"] is None  # no masks


def test_f1_without_anomalous_images_falls_back_to_normal_fpr():
    labels, scores, maps, masks = _class_case()
    normal = labels == 0
    entry = choose_class_thresholds(labels[normal], scores[normal], maps[normal], masks[normal],
                                    (float("nan"), float("nan")), "f1", 0.25)
    assert entry["method"] == entry["pixel_method"] == "normal_fpr"
    assert "image: f1 needs" in entry["warning"] and "pixel: f1 needs" in entry["warning"]
    assert entry["image_threshold"] == _hand_threshold(scores[normal], 0.25)
    assert np.sum(scores[normal] >= entry["image_threshold"]) == 1  # floor(0.25 * 4)
    assert entry["image_f1"] is None and entry["normal_image_fpr"] == 0.25


def test_no_normal_image_leaves_thresholds_empty():
    labels, scores, maps, masks = _class_case()
    anomalous = labels == 1
    entry = choose_class_thresholds(labels[anomalous], scores[anomalous], maps[anomalous], masks[anomalous],
                                    (float("nan"), 0.6), "normal_fpr", 0.01)
    assert entry["image_threshold"] is None and entry["pixel_threshold"] is None
    assert "no normal image" in entry["warning"]
    f1 = choose_class_thresholds(labels[anomalous], scores[anomalous], maps[anomalous], masks[anomalous],
                                 (float("nan"), 0.6), "f1", 0.01)
    assert f1["image_threshold"] is None and f1["pixel_threshold"] == pytest.approx(0.6)
    json.dumps(f1, allow_nan=False)


def test_precision_is_part_of_the_provenance_and_an_older_record_means_fp32():
    """A record written before the precision was recorded was made in fp32: it holds at fp32, not at bf16."""
    from pipeline.config import ModelSpec, ScoringSpec
    from pipeline.thresholds import provenance_mismatches, provenance_record

    manifest = {"checkpoint": {"sha256": "c" * 64}, "backbone": {"sha256": "b" * 64}}
    bf16 = provenance_record(ModelSpec(), ScoringSpec(precision="bf16"), manifest)
    fp32 = provenance_record(ModelSpec(), ScoringSpec(), manifest)
    assert (bf16["precision"], fp32["precision"]) == ("bf16", "fp32")
    older = {name: value for name, value in fp32.items() if name != "precision"}
    assert provenance_mismatches(older, fp32) == []
    assert provenance_mismatches(older, bf16) == ["--precision bf16 against the thresholds' fp32"]
    assert provenance_mismatches(bf16, fp32) == ["--precision fp32 against the thresholds' bf16"]
