"""test.py end to end on the tiny backbone and synthetic data."""

import csv
import json
from pathlib import Path

import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline import evaluation
from pipeline import thresholds
from dataset import AnomalyDataset
from tests.conftest import E2E_IMAGE_SIZE
from tests.metrics_reference import reference_cflow_aupro, reference_exact_aupro
from pipeline.cli import run_cli


def _evaluate(data_root, save_path, checkpoint, design_args, *extra):
    return evaluation.main(["--data_path", str(data_root), "--save_path", str(save_path), "--checkpoint_path",
                            str(checkpoint), "--num_workers", "0", "--batch_size", "4", *design_args, *extra])


@pytest.fixture(scope="module")
def full_run(synthetic_datasets, trained_checkpoint, design_args, tmp_path_factory):
    save_path = tmp_path_factory.mktemp("evaluation")
    dump = save_path / "dump.npz"
    assert _evaluate(synthetic_datasets[1], save_path, trained_checkpoint, design_args, "--dump", str(dump),
                     "--vis") == 0
    return save_path, dump


def _rewrite_meta(source_root, target_root, keep):
    """A copy of ``source_root`` (its images stay inside the root, as the loader requires) whose meta.json keeps
    only the items ``keep`` accepts."""
    import shutil

    meta = json.loads((source_root / "meta.json").read_text())
    for split in meta.values():
        for name, items in split.items():
            split[name] = [item for item in items if keep(item)]
    shutil.copytree(source_root, target_root, ignore=shutil.ignore_patterns("meta.json"))
    (target_root / "meta.json").write_text(json.dumps(meta))
    return meta


def test_results_json_table_and_log(full_run, synthetic_datasets):
    save_path, _ = full_run
    summary = json.loads((save_path / "results.json").read_text())
    assert summary["metric_set"] == "image-pixel-level"
    assert summary["columns"] == ["pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"]
    assert list(summary["per_class"]) == ["blobs", "weave"]
    for column in summary["columns"]:
        values = [summary["per_class"][name][column] for name in ("blobs", "weave")]
        assert all(0 <= v <= 1 for v in values)
        assert summary["mean"][column] == pytest.approx(np.mean(values))
    assert summary["n_images"] == 12 and summary["wall_time_s"] > 0
    assert summary["config"]["image_size"] == E2E_IMAGE_SIZE and summary["config"]["aupro"] == "cflow"
    assert {"python", "torch", "numpy", "anomalyclip", "git_commit"} <= set(summary["versions"])
    import hashlib

    checkpoint = Path(summary["checkpoint_path"])
    assert summary["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    backbone = Path(summary["config"]["backbone"])
    assert summary["backbone_sha256"] == hashlib.sha256(backbone.read_bytes()).hexdigest()
    assert summary["table"] in (save_path / "log.txt").read_text()
    assert summary["table"].splitlines()[0].startswith("| objects   |   pixel_auroc |")
    assert summary["table"].splitlines()[-1].startswith("| mean ")


def test_dump_holds_every_image_in_dataset_order(full_run, synthetic_datasets):
    save_path, dump_path = full_run
    dump = np.load(dump_path)
    assert set(dump.files) == {"img_paths", "cls_names", "labels", "scores", "maps", "masks"}
    dataset = AnomalyDataset(str(synthetic_datasets[1]), image_size=E2E_IMAGE_SIZE)
    n, s = len(dataset), E2E_IMAGE_SIZE
    assert dump["maps"].shape == (n, s, s) and dump["maps"].dtype == np.float32
    assert dump["masks"].shape == (n, s, s) and dump["masks"].dtype == np.uint8
    assert dump["scores"].shape == (n,) and dump["scores"].dtype == np.float32
    assert list(dump["img_paths"]) == [item["img_path"] for item in dataset.items]
    assert list(dump["cls_names"]) == [item["cls_name"] for item in dataset.items]
    for i in range(n):
        item = dataset[i]
        assert dump["labels"][i] == item["anomaly"]
        assert np.array_equal(dump["masks"][i], item["img_mask"][0].numpy().astype(np.uint8))
    assert dump["masks"][dump["labels"] == 1].any(axis=(1, 2)).all()
    assert not dump["masks"][dump["labels"] == 0].any()
    with open(save_path / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["img_path"] for row in rows] == list(dump["img_paths"])
    np.testing.assert_allclose([float(r["score"]) for r in rows], dump["scores"], rtol=1e-6)
    summary = json.loads((save_path / "results.json").read_text())
    for name in ("blobs", "weave"):
        chosen = dump["cls_names"] == name
        labels, scores, masks, maps = (dump[key][chosen] for key in ("labels", "scores", "masks", "maps"))
        independent = {"pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
                       "pixel_aupro": reference_cflow_aupro(masks, maps),
                       "image_auroc": roc_auc_score(labels, scores),
                       "image_ap": average_precision_score(labels, scores)}
        reported = {key: summary["per_class"][name][key] for key in independent}
        assert reported == pytest.approx(independent, abs=1e-9), name
    assert not list(dump_path.parent.glob(".dump.npz.*"))


def test_vis_writes_one_overlay_per_image(full_run, synthetic_datasets):
    # The one naming rule: the image's path under the dataset root, mirrored under imgs/, extension kept.
    save_path, _ = full_run
    dataset = AnomalyDataset(str(synthetic_datasets[1]), image_size=E2E_IMAGE_SIZE)
    for item in dataset.items:
        overlay = save_path / "imgs" / (item["img_path"] + ".overlay.png")
        with Image.open(overlay) as image:
            assert image.size == (E2E_IMAGE_SIZE, E2E_IMAGE_SIZE) and image.mode == "RGB"
    overlays = sorted(path.relative_to(save_path / "imgs").as_posix() for path in (save_path / "imgs").rglob("*.png"))
    assert overlays == sorted(item["img_path"] + ".overlay.png" for item in dataset.items)


@pytest.mark.parametrize("metric_set, columns", [("image-level", ["image_auroc", "image_ap"]),
                                                 ("pixel-level", ["pixel_auroc", "pixel_aupro"])])
def test_metric_set_choice(synthetic_datasets, trained_checkpoint, design_args, tmp_path, full_run, metric_set,
                           columns):
    assert _evaluate(synthetic_datasets[1], tmp_path, trained_checkpoint, design_args, "--metrics", metric_set) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["columns"] == columns
    reference = json.loads((full_run[0] / "results.json").read_text())
    for name, values in summary["per_class"].items():
        for column in columns:
            assert values[column] == pytest.approx(reference["per_class"][name][column], abs=1e-6)


def test_exact_aupro_mode(synthetic_datasets, trained_checkpoint, design_args, tmp_path, full_run):
    assert _evaluate(synthetic_datasets[1], tmp_path, trained_checkpoint, design_args, "--metrics", "pixel-level",
                     "--aupro", "exact") == 0
    exact = json.loads((tmp_path / "results.json").read_text())["per_class"]
    dump = np.load(full_run[1])
    chosen = dump["cls_names"] == "blobs"
    expected = reference_exact_aupro(dump["masks"][chosen], dump["maps"][chosen])
    assert exact["blobs"]["pixel_aupro"] == pytest.approx(expected, abs=1e-9)
    cflow = json.loads((full_run[0] / "results.json").read_text())["per_class"]["blobs"]["pixel_aupro"]
    assert abs(cflow - expected) > 1e-5  # the flag changed the computation (4.6e-4 apart here)


def test_default_metrics_follow_the_dataset(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    source = synthetic_datasets[1]
    no_masks = tmp_path / "no_masks"
    meta = _rewrite_meta(source, no_masks, keep=lambda item: True)
    for items in meta["test"].values():
        for item in items:
            item["mask_path"] = ""
    (no_masks / "meta.json").write_text(json.dumps(meta))
    assert _evaluate(no_masks, tmp_path / "r1", trained_checkpoint, design_args) == 0
    assert json.loads((tmp_path / "r1" / "results.json").read_text())["metric_set"] == "image-level"
    assert run_cli(evaluation.main, ["--data_path", str(no_masks), "--save_path", str(tmp_path / "r2"),
                                     "--checkpoint_path", str(trained_checkpoint), "--metrics", "pixel-level",
                                     "--num_workers", "0", *design_args]) == 2
    assert "needs masks" in capsys.readouterr().err

    only_anomalous = tmp_path / "only_anomalous"
    _rewrite_meta(source, only_anomalous, keep=lambda item: item["anomaly"] == 1)
    assert _evaluate(only_anomalous, tmp_path / "r3", trained_checkpoint, design_args) == 0
    assert json.loads((tmp_path / "r3" / "results.json").read_text())["metric_set"] == "pixel-level"


def test_user_errors_are_one_line(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    assert run_cli(evaluation.main, ["--data_path", str(synthetic_datasets[1]), "--save_path", str(tmp_path),
                                     "--checkpoint_path", str(tmp_path / "absent.pth"), *design_args]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert run_cli(evaluation.main, ["--data_path", str(tmp_path / "nowhere"), "--save_path", str(tmp_path),
                                     "--checkpoint_path", str(trained_checkpoint), *design_args]) == 2
    assert "meta.json" in capsys.readouterr().err
    assert run_cli(evaluation.main, ["--data_path", str(synthetic_datasets[1]), "--save_path", str(tmp_path),
                                     "--checkpoint_path", str(trained_checkpoint), "--classes", "nope",
                                     *design_args]) == 2
    assert ("error: class(es) nope not in the 'test' split of" in (err := capsys.readouterr().err)
            and "(it has: blobs, weave); fix --classes" in err)


# --------------------------------------------------------------------------------------------
# Decision metrics, per defect type, thresholds (issue 9), against sklearn and numpy on the dump
# --------------------------------------------------------------------------------------------


def _class_arrays(dump, name):
    chosen = dump["cls_names"] == name
    return dump["labels"][chosen], dump["scores"][chosen], dump["masks"][chosen], dump["maps"][chosen]


def _sklearn_f1_max(truth, values):
    """(F1-max, threshold) over sklearn's precision-recall curve; flagged when value >= threshold."""
    precision, recall, thresholds = precision_recall_curve(truth, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = int(np.argmax(f1))
    return f1[best], thresholds[best]


def _normal_fpr_reference(normal_values, target_fpr):
    """By hand: just above the (floor(fpr * n) + 1)-th largest normal value (float32)."""
    ordered = np.sort(np.asarray(normal_values, dtype=np.float32).ravel())[::-1]
    kept_unflagged = ordered[math.floor(target_fpr * ordered.size + 1e-9)]
    return float(np.nextafter(kept_unflagged, np.float32(np.inf)))


def _types(data_root, name):
    meta = json.loads((data_root / "meta.json").read_text())
    return [item["specie_name"] or "unspecified" for item in meta["test"][name]]


def _check_defect_types(per_type, types, labels, scores, masks, maps):
    """Each defect type's AUROCs equal sklearn's on the class's normal images plus that type's images."""
    types = np.array(types)
    assert sorted(per_type) == sorted(set(types[labels == 1]))
    for kind, got in per_type.items():
        subset = (labels == 0) | (types == kind)
        assert got["image_auroc"] == pytest.approx(roc_auc_score(labels[subset], scores[subset]), abs=1e-12)
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks[subset].ravel(), maps[subset].ravel()),
                                                   abs=1e-12)


def test_decision_metrics_and_defect_types_equal_sklearn(full_run, synthetic_datasets):
    save_path, dump_path = full_run
    dump = np.load(dump_path)
    summary = json.loads((save_path / "results.json").read_text())
    assert summary["extra_columns"] == ["image_f1_max", "pixel_ap", "pixel_f1_max"]
    assert "image_f1_max" not in summary["table"]  # the printed table stays the original's
    for name in ("blobs", "weave"):
        labels, scores, masks, maps = _class_arrays(dump, name)
        values = summary["per_class"][name]
        image_f1, image_threshold = _sklearn_f1_max(labels, scores)
        pixel_f1, pixel_threshold = _sklearn_f1_max(masks.ravel(), maps.ravel())
        assert values["image_f1_max"] == pytest.approx(image_f1, abs=1e-12)
        assert values["image_f1_threshold"] == pytest.approx(float(image_threshold), abs=0)
        assert values["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
        assert values["pixel_f1_max"] == pytest.approx(pixel_f1, abs=1e-12)
        assert values["pixel_f1_threshold"] == pytest.approx(float(pixel_threshold), abs=0)
        _check_defect_types(summary["per_defect_type"][name], _types(synthetic_datasets[1], name), labels, scores,
                            masks, maps)
    for key in summary["extra_columns"]:
        per_class = [summary["per_class"][name][key] for name in ("blobs", "weave")]
        assert summary["mean"][key] == pytest.approx(np.mean(per_class))


def test_f1_thresholds_equal_sklearn(full_run):
    save_path, dump_path = full_run
    dump = np.load(dump_path)
    document = json.loads((save_path / "thresholds.json").read_text())
    assert document["requested_method"] == "f1" and document["image_size"] == E2E_IMAGE_SIZE
    assert thresholds.load_thresholds(save_path / "thresholds.json") == document["classes"]
    for name in ("blobs", "weave"):
        labels, scores, masks, maps = _class_arrays(dump, name)
        entry = document["classes"][name]
        image_f1, image_threshold = _sklearn_f1_max(labels, scores)
        pixel_f1, pixel_threshold = _sklearn_f1_max(masks.ravel(), maps.ravel())
        assert entry["method"] == entry["pixel_method"] == "f1" and entry["warning"] is None
        assert entry["image_threshold"] == float(image_threshold)
        assert entry["pixel_threshold"] == float(pixel_threshold)
        assert entry["image_f1"] == pytest.approx(image_f1, abs=1e-12)
        assert entry["pixel_f1"] == pytest.approx(pixel_f1, abs=1e-12)
        normal = labels == 0
        assert (entry["n_normal_images"], entry["n_anomalous_images"]) == (normal.sum(), (~normal).sum())
        assert entry["n_normal_pixels"] == maps[normal].size
        assert entry["normal_image_fpr"] == pytest.approx(np.mean(scores[normal] >= image_threshold))
        assert entry["normal_pixel_fpr"] == pytest.approx(np.mean(maps[normal] >= pixel_threshold))


def test_normal_fpr_thresholds_extra_columns_and_named_defect_types(synthetic_datasets, trained_checkpoint,
                                                                    design_args, tmp_path):
    target_fpr = 0.05
    mvtec_like = synthetic_datasets[0]  # its items name their defect types (blob, hole, scratch)
    assert _evaluate(mvtec_like, tmp_path, trained_checkpoint, design_args, "--threshold_method",
                     "normal_fpr", "--target_fpr", str(target_fpr), "--dump", str(tmp_path / "d.npz"),
                     "--extra_metrics", "--classes", "stripes") == 0
    dump = np.load(tmp_path / "d.npz")
    labels, scores, masks, maps = _class_arrays(dump, "stripes")
    entry = json.loads((tmp_path / "thresholds.json").read_text())["classes"]["stripes"]
    normal = labels == 0
    assert entry["method"] == entry["pixel_method"] == "normal_fpr" and entry["target_fpr"] == target_fpr
    assert entry["image_threshold"] == _normal_fpr_reference(scores[normal], target_fpr)
    assert entry["pixel_threshold"] == _normal_fpr_reference(maps[normal], target_fpr)
    assert np.mean(maps[normal] >= entry["pixel_threshold"]) <= target_fpr
    assert entry["normal_pixel_fpr"] == pytest.approx(np.mean(maps[normal] >= entry["pixel_threshold"]))
    summary = json.loads((tmp_path / "results.json").read_text())
    assert len(summary["per_defect_type"]["stripes"]) == 3
    _check_defect_types(summary["per_defect_type"]["stripes"], _types(mvtec_like, "stripes"), labels, scores, masks,
                        maps)
    header = summary["table"].splitlines()[0]
    assert [cell.strip() for cell in header.split("|")[-4:-1]] == ["image_f1_max", "pixel_ap", "pixel_f1_max"]


def test_f1_falls_back_to_normal_fpr_without_anomalous_images(synthetic_datasets, trained_checkpoint, design_args,
                                                              tmp_path):
    source = synthetic_datasets[1]
    normal_weave = tmp_path / "normal_weave"
    _rewrite_meta(source, normal_weave, keep=lambda item: item["cls_name"] == "blobs" or item["anomaly"] == 0)
    save_path = tmp_path / "out"
    assert _evaluate(normal_weave, save_path, trained_checkpoint, design_args, "--dump", str(tmp_path / "d.npz")) == 0
    dump = np.load(tmp_path / "d.npz")
    _, scores, _, maps = _class_arrays(dump, "weave")
    classes = json.loads((save_path / "thresholds.json").read_text())["classes"]
    assert classes["blobs"]["method"] == "f1"
    weave = classes["weave"]
    assert weave["method"] == weave["pixel_method"] == "normal_fpr" and "f1 needs" in weave["warning"]
    assert weave["image_threshold"] == _normal_fpr_reference(scores, 0.01)
    assert weave["pixel_threshold"] == _normal_fpr_reference(maps, 0.01)
    assert weave["image_f1"] is None and weave["n_anomalous_images"] == 0
    assert "thresholds of weave" in (save_path / "log.txt").read_text()
    summary = json.loads((save_path / "results.json").read_text())
    assert summary["per_class"]["weave"]["image_f1_max"] is None and summary["per_defect_type"]["weave"] == {}


def test_vis_names_keep_the_extension(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    """000.png and 000.jpg in one defect folder get two overlays (the original wrote one over the other)."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(synthetic_datasets[1], data)
    meta = json.loads((data / "meta.json").read_text())
    first_class = next(iter(meta["test"]))
    item = next(i for i in meta["test"][first_class] if i["anomaly"] == 0)
    twin = Path(item["img_path"]).with_suffix(".jpg").as_posix()
    Image.open(data / item["img_path"]).convert("RGB").save(data / twin)
    meta["test"][first_class].append(dict(item, img_path=twin))
    (data / "meta.json").write_text(json.dumps(meta))
    save_path = tmp_path / "out"
    assert _evaluate(data, save_path, trained_checkpoint, design_args, "--vis", "--classes", first_class) == 0
    folder = save_path / "imgs" / Path(item["img_path"]).parent
    names = {p.name for p in folder.iterdir()}
    assert {Path(item["img_path"]).name + ".overlay.png", Path(twin).name + ".overlay.png"} <= names


def test_error_inside_a_dataloader_worker_is_one_line(synthetic_datasets, trained_checkpoint, design_args, tmp_path,
                                                      capsys):
    import shutil

    from pipeline.cli import run_cli

    data = tmp_path / "data"
    shutil.copytree(synthetic_datasets[1], data)
    meta = json.loads((data / "meta.json").read_text())
    broken = next(iter(meta["test"].values()))[0]["img_path"]
    (data / broken).write_bytes(b"\x89PNG\r\n\x1a\n cut here")
    args = ["--data_path", str(data), "--save_path", str(tmp_path / "out"), "--checkpoint_path",
            str(trained_checkpoint),
            "--num_workers", "1", "--batch_size", "4", *design_args]
    assert run_cli(evaluation.main, args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot read image file") and Path(broken).name in error
    assert "DataLoader worker" not in error and "Traceback" not in error
