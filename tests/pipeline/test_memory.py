"""Few-shot references end to end: test.py --k_shot, test_one_example.py --reference_path/--memory, their refusals."""

import csv
import json

import numpy as np
import pytest

from pipeline import evaluation, prediction
from pipeline.cli import run_cli
from pipeline.memory import Reference, draw
from tests.conftest import E2E_IMAGE_SIZE


def _evaluate(data_root, save_path, checkpoint, design_args, *extra):
    return evaluation.main(["--data_path", str(data_root), "--save_path", str(save_path), "--checkpoint_path",
                            str(checkpoint), "--num_workers", "0", "--batch_size", "4", *design_args, *extra])


def _scores(save_path):
    with open(save_path / "scores.csv", newline="") as handle:
        return {row["img_path"]: float(row["score"]) for row in csv.DictReader(handle)}


def _results(save_path):
    return json.loads((save_path / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(synthetic_datasets, trained_checkpoint, design_args, tmp_path_factory):
    """Zero-shot, --k_shot 0 and --k_shot 2 (twice, same seed) on the target dataset."""
    target = synthetic_datasets[1]
    folders = {name: tmp_path_factory.mktemp(name) for name in ("zero", "k0", "k2", "k2_again", "from_test")}
    assert _evaluate(target, folders["zero"], trained_checkpoint, design_args) == 0
    assert _evaluate(target, folders["k0"], trained_checkpoint, design_args, "--k_shot", "0") == 0
    for name in ("k2", "k2_again"):
        assert _evaluate(target, folders[name], trained_checkpoint, design_args, "--k_shot", "2", "--seed", "5") == 0
    assert _evaluate(target, folders["from_test"], trained_checkpoint, design_args, "--k_shot", "1",
                     "--references_from_test") == 0
    return folders


def test_k_shot_zero_is_the_zero_shot_run(runs):
    assert (runs["zero"] / "scores.csv").read_bytes() == (runs["k0"] / "scores.csv").read_bytes()
    assert (runs["zero"] / "thresholds.json").read_bytes() == (runs["k0"] / "thresholds.json").read_bytes()
    assert "few_shot" not in _results(runs["k0"])


def test_references_raise_image_auroc_and_aupro_well_above_zero_shot(runs):
    """The tiny random backbone's prompts score near chance; two good images per class make the defects stand out.

    Measured on this set (means over the two classes): image AUROC 0.28 -> 1.00, pixel AUPRO 0.09 -> 0.93,
    pixel AUROC 0.39 -> 0.98. The margins asserted are well below the gains, above any seed's noise.
    """
    zero, few = _results(runs["zero"])["mean"], _results(runs["k2"])["mean"]
    assert few["image_auroc"] >= zero["image_auroc"] + 0.5
    assert few["pixel_aupro"] >= zero["pixel_aupro"] + 0.5


def test_same_seed_same_references_and_scores_and_everything_is_recorded(runs, synthetic_datasets):
    first, again = _results(runs["k2"]), _results(runs["k2_again"])
    assert first["few_shot"]["references"] == again["few_shot"]["references"]
    assert (runs["k2"] / "scores.csv").read_bytes() == (runs["k2_again"] / "scores.csv").read_bytes()
    few_shot = first["few_shot"]
    assert few_shot["source"] == "train" and few_shot["references_per_class"] == {"blobs": 2, "weave": 2}
    assert few_shot["layers"] == [6, 12, 18, 24] and few_shot["weight"] == 0.5 and few_shot["seed"] == 5
    meta = json.loads((synthetic_datasets[1] / "meta.json").read_text())
    train_normals = {item["img_path"] for items in meta["train"].values() for item in items if not item["anomaly"]}
    for refs in few_shot["references"].values():
        assert {ref["path"] for ref in refs} <= train_normals and all(len(ref["sha256"]) == 64 for ref in refs)
    config = first["config"]
    assert (config["k_shot"], config["seed"], config["memory_layers"], config["memory_weight"]) == \
           (2, 5, [6, 12, 18, 24], 0.5)
    provenance = json.loads((runs["k2"] / "thresholds.json").read_text())["classes"]["blobs"]["provenance"]
    assert provenance["memory"]["k"] == 2 and len(provenance["memory"]["references_sha256"]) == 64


def test_references_drawn_from_the_test_split_are_never_evaluated(runs):
    summary = _results(runs["from_test"])
    drawn = {ref["path"] for refs in summary["few_shot"]["references"].values() for ref in refs}
    assert len(drawn) == 2 and summary["few_shot"]["references_left_out_of_evaluation"] == 2
    evaluated = set(_scores(runs["from_test"]))
    assert summary["n_images"] == len(_scores(runs["zero"])) - 2 == len(evaluated)
    assert not any(path.endswith(tuple(drawn)) for path in evaluated)


def test_draw_depends_on_seed_and_class_only():
    candidates = [Reference(f"/x/{n}.png", f"{n}.png", "0" * 64) for n in range(10)]
    one = draw(candidates, 3, seed=1, class_name="a")
    assert one == draw(list(reversed(candidates)), 3, seed=1, class_name="a")
    assert [ref.name for ref in one] == sorted(ref.name for ref in one) and len(set(one)) == 3
    assert {tuple(draw(candidates, 3, seed, "a")) for seed in range(6)} != {tuple(one)}
    with pytest.raises(Exception, match="fewer than --k_shot 11"):
        draw(candidates, 11, seed=1, class_name="a")


def _one_example(*args):
    return run_cli(prediction.main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def parts(synthetic_datasets, tmp_path_factory):
    """Good reference images and new parts (good and defective) of one class, copied out of the dataset."""
    import shutil

    root = tmp_path_factory.mktemp("parts")
    meta = json.loads((synthetic_datasets[1] / "meta.json").read_text())
    items = [item for split in meta.values() for item in split["blobs"]]
    good = [item["img_path"] for item in items if not item["anomaly"]]
    bad = [item["img_path"] for item in items if item["anomaly"]]
    for folder, paths in (("good", good[:3]), ("new", good[3:4] + bad[:2])):
        (root / folder).mkdir()
        for path in paths:
            shutil.copy(synthetic_datasets[1] / path, root / folder / path.replace("/", "_"))
    return root


def test_one_example_memory_file_reused_equals_built_and_is_refused_elsewhere(parts, trained_checkpoint,
                                                                             design_args, tmp_path, capsys):
    base = ["--checkpoint_path", trained_checkpoint, *design_args, "--image_path", parts / "new"]
    memory = tmp_path / "memory.npz"
    assert _one_example(*base, "--reference_path", parts / "good", "--save_memory", memory,
                        "--save_path", tmp_path / "built") == 0
    assert _one_example(*base, "--memory", memory, "--save_path", tmp_path / "reused") == 0
    built, reused = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("built", "reused"))
    assert [p["score"] for p in built["predictions"]] == [p["score"] for p in reused["predictions"]]
    assert built["memory"]["k"] == 3 and built["memory"] == reused["memory"]
    with np.load(memory, allow_pickle=False) as archive:
        assert {"bank_6", "bank_24", "scales", "header"} <= set(archive.files)
    capsys.readouterr()
    size = str(E2E_IMAGE_SIZE * 2)
    assert _one_example(*base[:-2], "--image_path", parts / "new", "--memory", memory, "--image_size", size,
                        "--save_path", tmp_path / "other") == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and f"built with --image_size {E2E_IMAGE_SIZE} where this run uses {size}" in line


def test_calibration_scores_references_leave_one_out(parts, trained_checkpoint, design_args, tmp_path):
    base = ["--checkpoint_path", trained_checkpoint, *design_args, "--reference_path", parts / "good"]
    thresholds = tmp_path / "thresholds.json"
    assert _one_example(*base, "--image_path", parts / "good", "--calibrate", "--save_thresholds", thresholds) == 0
    assert _one_example(*base, "--image_path", parts / "good", "--save_path", tmp_path / "scored") == 0
    entry = json.loads(thresholds.read_text())["classes"]["good"]
    in_memory = [p["score"] for p in json.loads((tmp_path / "scored" / "predictions.json").read_text())["predictions"]]
    # Scored against a memory holding itself, a reference's memory distance is 0: the calibration must not see that.
    assert entry["image_threshold"] > max(in_memory)
    assert entry["provenance"]["memory"]["k"] == 3
    # the thresholds are refused for zero-shot scores, and accepted with the same memory
    assert _one_example("--checkpoint_path", trained_checkpoint, *design_args, "--image_path", parts / "new",
                        "--thresholds", thresholds, "--save_path", tmp_path / "zs") == 2
    assert _one_example(*base, "--image_path", parts / "new", "--thresholds", thresholds,
                        "--save_path", tmp_path / "fs") == 0


@pytest.mark.parametrize("extra, message", [
    (["--k_shot", "-1"], "--k_shot -1 must be >= 0"),
    (["--references_from_test"], "--references_from_test draws --k_shot K test normals; add --k_shot K"),
    (["--memory_weight", "0.2"], "--memory_weight set(s) the few-shot memory, and this run has none"),
    (["--k_shot", "2", "--memory_weight", "1.5"], "--memory_weight 1.5 must be in [0, 1]"),
    (["--k_shot", "3"], "class 'blobs' has 2 normal reference candidate(s), fewer than --k_shot 3"),
    (["--reference_path", "nowhere"], "--reference_path nowhere is not a folder"),
])
def test_test_py_refusals_are_one_line(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys, extra,
                                       message):
    argv = ["--data_path", str(synthetic_datasets[1]), "--save_path", str(tmp_path / "out"), "--checkpoint_path",
            str(trained_checkpoint), "--num_workers", "0", *design_args, *extra]
    assert run_cli(evaluation.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_a_dataset_without_train_normals_names_the_two_ways_out(synthetic_datasets, trained_checkpoint, design_args,
                                                                tmp_path, capsys):
    import shutil

    root = tmp_path / "no_train"
    shutil.copytree(synthetic_datasets[1], root)
    meta = json.loads((root / "meta.json").read_text())
    del meta["train"]
    (root / "meta.json").write_text(json.dumps(meta))
    argv = ["--data_path", str(root), "--save_path", str(tmp_path / "out"), "--checkpoint_path",
            str(trained_checkpoint), "--num_workers", "0", *design_args, "--k_shot", "1"]
    assert run_cli(evaluation.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--reference_path DIR" in err and "--references_from_test" in err


def test_a_file_that_is_not_a_memory_is_one_line(parts, trained_checkpoint, design_args, tmp_path, capsys):
    fake = tmp_path / "memory.npz"
    np.savez(fake, something=np.zeros(3))
    assert _one_example("--checkpoint_path", trained_checkpoint, *design_args, "--image_path", parts / "new",
                        "--memory", fake, "--save_path", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a memory file" in err
