"""test.py end to end on the tiny backbone and synthetic data."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import test as evaluation
from dataset import AnomalyDataset
from tests.conftest import E2E_IMAGE_SIZE
from tests.metrics_reference import reference_cflow_aupro, reference_exact_aupro
from utils import run_cli


def _evaluate(data_root, save_path, checkpoint, design_args, *extra):
    return evaluation.main(["--data_path", str(data_root), "--save_path", str(save_path), "--checkpoint_path",
                            str(checkpoint), "--num_workers", "0", "--batch_size", "4", *design_args, *extra])


@pytest.fixture(scope="module")
def full_run(synthetic_datasets, trained_checkpoint, design_args, tmp_path_factory):
    save_path = tmp_path_factory.mktemp("evaluation")
    dump = save_path / "dump.npz"
    assert _evaluate(synthetic_datasets[1], save_path, trained_checkpoint, design_args, "--dump", str(dump), "--vis") == 0
    return save_path, dump


def _rewrite_meta(source_root, target_root, keep):
    """A copy of ``source_root``'s meta.json under ``target_root`` with images read from ``source_root``."""
    meta = json.loads((source_root / "meta.json").read_text())
    for split in meta.values():
        for name, items in split.items():
            split[name] = [dict(item, img_path=str(source_root / item["img_path"]),
                                mask_path=str(source_root / item["mask_path"]) if item["mask_path"] else "")
                           for item in items if keep(item)]
    target_root.mkdir()
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
    assert {"python", "torch", "numpy"} <= set(summary["versions"])
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
        assert summary["per_class"][name] == pytest.approx(independent, abs=1e-9), name
    assert not list(dump_path.parent.glob(".dump.npz.*"))


def test_vis_writes_one_overlay_per_image(full_run, synthetic_datasets):
    save_path, _ = full_run
    dataset = AnomalyDataset(str(synthetic_datasets[1]), image_size=E2E_IMAGE_SIZE)
    for item in dataset.items:
        relative = item["img_path"].split("/")
        overlay = save_path / "imgs" / item["cls_name"] / relative[-2] / (relative[-1].rsplit(".", 1)[0] + ".png")
        with Image.open(overlay) as image:
            assert image.size == (E2E_IMAGE_SIZE, E2E_IMAGE_SIZE) and image.mode == "RGB"


@pytest.mark.parametrize("metric_set, columns", [("image-level", ["image_auroc", "image_ap"]),
                                                 ("pixel-level", ["pixel_auroc", "pixel_aupro"])])
def test_metric_set_choice(synthetic_datasets, trained_checkpoint, design_args, tmp_path, full_run, metric_set, columns):
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
    assert "nope" in capsys.readouterr().err
