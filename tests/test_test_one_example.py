"""Single-image inference: scores equal to test.py's, verdicts, defect masks, mirrored names, calibration."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import prediction as test_one_example
from tests.conftest import E2E_IMAGE_SIZE
from pipeline.cli import run_cli


def _visa_images(synthetic_datasets, kind):
    return synthetic_datasets[1] / "blobs" / "Data" / "Images" / kind


def _lines(capsys):
    return [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]


def _reference_maps(files, checkpoint, design_args):
    """Scores and maps of ``files`` scored as one batch straight through the inference module."""
    from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
    from AnomalyCLIP_lib.transform import image_transform, load_image
    from pipeline.loading import load_model_and_prompts
    from utils import setup_seed

    config = test_one_example.parse_args(["--image_path", str(files[0]), "--checkpoint_path", str(checkpoint),
                                          *design_args])
    setup_seed(config.model.seed)
    model, prompt_learner, _ = load_model_and_prompts(config.model, torch.device("cpu"), str(checkpoint))
    settings = ScoringConfig(image_size=config.model.image_size, features_list=config.model.features_list,
                             sigma=config.scoring.sigma)  # written out: the CLI's defaults, not its code
    inference = AnomalyCLIPInference.from_model(model, prompt_learner, settings)
    preprocess = image_transform(config.model.image_size)
    images = torch.stack([preprocess(load_image(f)) for f in files])
    prediction = inference.predict(images)
    return prediction.scores.numpy(), prediction.maps.numpy()


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_folder_and_single_image(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    """A folder is scored image by image in name order; non-image, hidden files and sub-folders are skipped."""
    source = _visa_images(synthetic_datasets, "Anomaly")
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["b.JPG", "a.jpg", "c.png"]  # upper- and lower-case suffixes
    for name, image in zip(names, sorted(source.iterdir())):
        Image.open(image).convert("RGB").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\x00\x01")
    (folder / ".hidden.png").write_bytes((folder / "a.jpg").read_bytes())
    (folder / "nested.png").mkdir()  # a folder with an image suffix is no image
    results = test_one_example.score_images(test_one_example.parse_args(
        ["--image_path", str(folder), "--checkpoint_path", str(trained_checkpoint),
         "--save_path", str(tmp_path / "out"), "--threshold", "0.5", "--batch_size", "2", *design_args]))
    files = [folder / name for name in ("a.jpg", "b.JPG", "c.png")]
    assert [r.path for r in results] == files
    lines = _lines(capsys)
    assert len(lines) == len(files)
    for (path, printed, verdict, written), result in zip(lines, results):
        assert path == str(result.path) and float(printed) == pytest.approx(result.score, abs=1e-4)
        assert verdict == ("anomalous" if result.score >= 0.5 else "normal")
        with Image.open(written) as image:
            assert image.size == (E2E_IMAGE_SIZE, E2E_IMAGE_SIZE)

    single = test_one_example.score_images(test_one_example.parse_args(
        ["--image_path", str(files[1]), "--checkpoint_path", str(trained_checkpoint), "--save_path",
         str(tmp_path / "one"),
         *design_args]))
    assert single[0].score == pytest.approx(results[1].score, abs=1e-6)  # batching does not change a score
    assert single[0].overlay == tmp_path / "one" / f"{files[1].name}.overlay.png"
    [(path, printed, written)] = _lines(capsys)  # path, score, overlay: no verdict without a threshold
    assert path == str(files[1]) and printed == f"{single[0].score:.4f}" and written == str(single[0].overlay)


def test_scores_equal_test_py(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    from pipeline import evaluation

    dump = tmp_path / "dump.npz"
    evaluation.main(["--data_path", str(synthetic_datasets[1]), "--save_path", str(tmp_path / "eval"),
                     "--checkpoint_path", str(trained_checkpoint), "--num_workers", "0", "--dump", str(dump),
                     "--classes", "weave", *design_args])
    stored = np.load(dump)
    first = synthetic_datasets[1] / stored["img_paths"][0]
    result = test_one_example.score_images(test_one_example.parse_args(
        ["--image_path", str(first), "--checkpoint_path", str(trained_checkpoint), "--save_path", str(tmp_path / "o"),
         *design_args]))
    assert result[0].score == pytest.approx(float(stored["scores"][0]), abs=1e-6)


def test_verdicts_masks_and_predictions_files(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    folder = tmp_path / "parts"
    for kind in ("Anomaly", "Normal"):
        shutil.copytree(_visa_images(synthetic_datasets, kind), folder / kind)
    files = sorted(folder.rglob("*.JPG"), key=lambda p: p.relative_to(folder).parts)
    scores, maps = _reference_maps(files, trained_checkpoint, design_args)
    ordered = np.sort(scores)
    image_threshold = float((ordered[3] + ordered[4]) / 2)  # between two scores: no rounding question
    pixel_threshold = float(np.quantile(maps, 0.8))
    out = tmp_path / "out"
    assert run_cli(test_one_example.main, ["--image_path", str(folder), "--checkpoint_path", str(trained_checkpoint),
                                           "--save_path", str(out), "--threshold", str(image_threshold),
                                           "--pixel_threshold", str(pixel_threshold), "--batch_size", "16",
                                           *design_args]) == 0
    lines = _lines(capsys)
    rows = _read_csv(out / "predictions.csv")
    assert list(rows[0]) == ["path", "score", "verdict", "defect_pixels", "overlay", "mask"]
    assert [row["path"] for row in rows] == [line[0] for line in lines] == [str(f) for f in files]
    document = json.loads((out / "predictions.json").read_text())
    assert document["thresholds"]["image_threshold"] == image_threshold
    assert document["thresholds"]["pixel_threshold"] == pixel_threshold
    assert document["thresholds"]["source"] == "--threshold" and document["vis_scale"] == "fixed"
    for row, line, file, score, anomaly_map, entry in zip(rows, lines, files, scores, maps, document["predictions"]):
        path, printed, verdict, defect_pixels, overlay = line
        assert float(printed) == pytest.approx(float(row["score"]), abs=5e-5)
        assert float(row["score"]) == pytest.approx(float(score), abs=1e-6)
        expected_verdict = "anomalous" if float(printed) >= image_threshold else "normal"
        assert row["verdict"] == verdict == expected_verdict
        relative = file.relative_to(folder)
        assert row["mask"] == f"{relative.as_posix()}.mask.png"
        assert row["overlay"] == f"{relative.as_posix()}.overlay.png" and overlay == str(out / row["overlay"])
        with Image.open(file) as image:
            width, height = image.size
        resized = np.asarray(Image.fromarray(anomaly_map.astype(np.float32)).resize((width, height), Image.BILINEAR))
        expected = np.where(resized >= np.float32(pixel_threshold), 255, 0)
        written = np.asarray(Image.open(out / row["mask"]))
        assert written.shape == (height, width) and set(np.unique(written)) <= {0, 255}
        np.testing.assert_array_equal(written, expected)
        assert int(row["defect_pixels"]) == int(defect_pixels) == int((expected == 255).sum())
        assert entry == {**row, "score": pytest.approx(float(row["score"])), "defect_pixels": int(row["defect_pixels"])}
    assert {row["verdict"] for row in rows} == {"anomalous", "normal"}
    assert any(int(row["defect_pixels"]) > 0 for row in rows)


def _image_tree(synthetic_datasets, root):
    source = sorted(_visa_images(synthetic_datasets, "Anomaly").iterdir())
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    (root / ".hidden").mkdir()
    Image.open(source[0]).save(root / "a.png")
    Image.open(source[1]).save(root / "a.jpg")
    Image.open(source[2]).save(root / "x" / "000.png")
    Image.open(source[0]).save(root / "y" / "000.png")
    Image.open(source[1]).save(root / ".hidden" / "b.png")
    (root / "notes.txt").write_text("not an image")


def test_output_names_mirror_the_tree(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    folder = tmp_path / "tree"
    _image_tree(synthetic_datasets, folder)
    out = folder / "results"  # inside the folder: a second run must not score its own outputs
    argv = ["--image_path", str(folder), "--checkpoint_path", str(trained_checkpoint), "--save_path", str(out),
            "--threshold", "0.5", "--pixel_threshold", "0.9", *design_args]
    for _ in range(2):
        assert run_cli(test_one_example.main, argv) == 0
        rows = _read_csv(out / "predictions.csv")
        assert [row["overlay"] for row in rows] == ["a.jpg.overlay.png", "a.png.overlay.png", "x/000.png.overlay.png",
                                                    "y/000.png.overlay.png"]
        assert [row["mask"] for row in rows] == [name.replace(".overlay.", ".mask.") for name in
                                                 (row["overlay"] for row in rows)]
        capsys.readouterr()
    overlays = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.overlay.png"))
    assert overlays == ["a.jpg.overlay.png", "a.png.overlay.png", "x/000.png.overlay.png", "y/000.png.overlay.png"]
    assert len({(out / name).read_bytes() for name in overlays[:2]}) == 2  # different images, different files


def test_calibration_from_good_images(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    good = tmp_path / "good"
    shutil.copytree(_visa_images(synthetic_datasets, "Normal"), good)
    files = sorted(good.iterdir())
    scores, maps = _reference_maps(files, trained_checkpoint, design_args)
    base = ["--image_path", str(good), "--checkpoint_path", str(trained_checkpoint), *design_args]
    for target in (0.25, 0.0):
        saved = tmp_path / f"thresholds_{target}.json"
        assert run_cli(test_one_example.main, [*base, "--calibrate", "--target_fpr", str(target),
                                               "--save_thresholds", str(saved)]) == 0
        output = capsys.readouterr().out
        document = json.loads(saved.read_text())
        assert list(document["classes"]) == ["good"]
        entry = document["classes"]["good"]
        assert entry["method"] == "normal_fpr" and entry["target_fpr"] == target and entry["n_images"] == len(files)
        image_threshold, pixel_threshold = entry["image_threshold"], entry["pixel_threshold"]
        assert repr(image_threshold) in output and repr(pixel_threshold) in output
        for values, threshold in ((scores, image_threshold), (maps.ravel(), pixel_threshold)):
            allowed = int(np.floor(target * values.size + 1e-9))
            assert (values >= threshold).sum() <= allowed <= target * values.size
            kept = np.sort(values)[::-1][allowed]  # the largest value that must stay unflagged
            assert threshold == float(np.nextafter(np.float32(kept), np.float32(np.inf)))
        if target == 0.0:
            assert image_threshold > scores.max() and pixel_threshold > maps.max()

    # Deployment: verdicts on the same good parts with the 25 % thresholds flag at most one of five.
    out = tmp_path / "out"
    assert run_cli(test_one_example.main, [*base, "--save_path", str(out), "--thresholds",
                                           str(tmp_path / "thresholds_0.25.json")]) == 0
    rows = _read_csv(out / "predictions.csv")
    assert sum(row["verdict"] == "anomalous" for row in rows) <= 1
    assert sum(int(row["defect_pixels"]) for row in rows) <= 0.25 * maps.size
    assert json.loads((out / "predictions.json").read_text())["thresholds"]["class_name"] == "good"


def test_bad_paths_are_one_line_errors(trained_checkpoint, design_args, tmp_path, capsys):
    assert run_cli(test_one_example.main, ["--image_path", str(tmp_path / "none.png"), "--checkpoint_path",
                                           str(trained_checkpoint), *design_args]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert run_cli(test_one_example.main, ["--image_path", str(broken), "--checkpoint_path", str(trained_checkpoint),
                                           "--save_path", str(tmp_path / "o"), *design_args]) == 2
    error = capsys.readouterr().err
    assert str(broken) in error and error.count("\n") == 1


def _write(path, text):
    path.write_text(text)
    return str(path)


BAD_FLAGS = {
    "calibrate without save": (["--calibrate"], "--save_thresholds"),
    "thresholds and threshold": (["--thresholds", "{two}", "--threshold", "0.5"], "drop --threshold"),
    "target_fpr 1": (["--calibrate", "--save_thresholds", "t.json", "--target_fpr", "1"], "[0, 1)"),
    "target_fpr negative": (["--calibrate", "--save_thresholds", "t.json", "--target_fpr", "-0.1"], "[0, 1)"),
    "target_fpr without calibrate": (["--target_fpr", "0.01"], "only with --calibrate"),
    "pixel without image threshold": (["--pixel_threshold", "0.5"], "--threshold"),
    "calibrate with threshold": (["--calibrate", "--save_thresholds", "t.json", "--threshold", "0.5"], "drop"),
    "missing thresholds file": (["--thresholds", "{missing}"], "does not exist"),
    "invalid thresholds file": (["--thresholds", "{invalid}"], "not readable JSON"),
    "several classes, none chosen": (["--thresholds", "{two}"], "--class_name"),
    "unknown class": (["--thresholds", "{two}", "--class_name", "nope"], "nope"),
    "fixed scale without pixel threshold": (["--threshold", "0.5", "--vis_scale", "fixed"], "pixel threshold"),
    "nan threshold": (["--threshold", "nan"], "finite"),
    "class_name without thresholds": (["--class_name", "a"], "--thresholds"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line_errors(case, trained_checkpoint, design_args, tmp_path, capsys):
    files = {"missing": str(tmp_path / "missing.json"), "invalid": _write(tmp_path / "bad.json", "{not json"),
             "two": _write(tmp_path / "two.json", json.dumps({"classes": {
                 "a": {"image_threshold": 0.5, "pixel_threshold": 0.5, "method": "f1"},
                 "b": {"image_threshold": 0.5, "pixel_threshold": 0.5, "method": "f1"}}}))}
    flags, message = BAD_FLAGS[case]
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = ["--image_path", str(image), "--checkpoint_path", str(trained_checkpoint), "--save_path",
            str(tmp_path / "out"), *design_args, *(flag.format(**files) for flag in flags)]
    assert run_cli(test_one_example.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_folder_report_lists_every_image_by_score(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    import re
    from html.parser import HTMLParser

    folder = _visa_images(synthetic_datasets, "Anomaly")
    save_path = tmp_path / "out"
    assert test_one_example.main(["--image_path", str(folder), "--checkpoint_path", str(trained_checkpoint),
                                  "--save_path", str(save_path), "--threshold", "0.1", "--report", *design_args]) == 0
    rows = _read_csv(save_path / "predictions.csv")

    class Images(HTMLParser):
        sources: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.sources.append(dict(attrs)["src"])

    page = (save_path / "report.html").read_text()
    parser = Images()
    parser.sources = []
    parser.feed(page)
    by_score = sorted(rows, key=lambda row: -float(row["score"]))
    assert parser.sources == [row["overlay"] for row in by_score]  # highest first, links relative to save_path
    assert all((save_path / source).is_file() for source in parser.sources)
    anomalous = sum(row["verdict"] == "anomalous" for row in rows)
    assert re.search(rf"{anomalous} anomalous, {len(rows) - anomalous} normal", page)
