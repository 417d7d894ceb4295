"""Single-image inference: scores, verdicts and overlays, equal to test.py's per-image scores."""

import numpy as np
import pytest
from PIL import Image

import test_one_example
from tests.conftest import E2E_IMAGE_SIZE
from utils import run_cli


def test_folder_and_single_image(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    """A folder is scored image by image in name order; non-image files and sub-folders are skipped."""
    source = synthetic_datasets[1] / "blobs" / "Data" / "Images" / "Anomaly"
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["b.JPG", "a.jpg", "c.png"]  # upper- and lower-case suffixes
    for name, image in zip(names, sorted(source.iterdir())):
        Image.open(image).convert("RGB").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\x00\x01")
    (folder / "nested.png").mkdir()  # a folder with an image suffix is no image
    results = test_one_example.score_images(test_one_example.parse_args(
        ["--image_path", str(folder), "--checkpoint_path", str(trained_checkpoint),
         "--save_path", str(tmp_path / "out"), "--threshold", "0.5", "--batch_size", "2", *design_args]))
    files = [folder / name for name in ("a.jpg", "b.JPG", "c.png")]
    assert [r[0] for r in results] == files
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(files)
    for line, (file, score, overlay) in zip(lines, results):
        path, printed, verdict, written = line.split("\t")
        assert path == str(file) and float(printed) == pytest.approx(score, abs=1e-4)
        assert verdict == ("anomalous" if score >= 0.5 else "normal")
        with Image.open(written) as image:
            assert image.size == (E2E_IMAGE_SIZE, E2E_IMAGE_SIZE)

    single = test_one_example.score_images(test_one_example.parse_args(
        ["--image_path", str(files[1]), "--checkpoint_path", str(trained_checkpoint), "--save_path", str(tmp_path / "one"),
         *design_args]))
    assert single[0][1] == pytest.approx(results[1][1], abs=1e-6)  # batching does not change a score
    path, printed, written = capsys.readouterr().out.strip().split("\t")  # no verdict without --threshold
    assert path == str(files[1]) and printed == f"{single[0][1]:.4f}" and written == str(tmp_path / "one" / "b.png")


def test_scores_equal_test_py(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    import test as evaluation

    dump = tmp_path / "dump.npz"
    evaluation.main(["--data_path", str(synthetic_datasets[1]), "--save_path", str(tmp_path / "eval"),
                     "--checkpoint_path", str(trained_checkpoint), "--num_workers", "0", "--dump", str(dump),
                     "--classes", "weave", *design_args])
    stored = np.load(dump)
    first = synthetic_datasets[1] / stored["img_paths"][0]
    result = test_one_example.score_images(test_one_example.parse_args(
        ["--image_path", str(first), "--checkpoint_path", str(trained_checkpoint), "--save_path", str(tmp_path / "o"),
         *design_args]))
    assert result[0][1] == pytest.approx(float(stored["scores"][0]), abs=1e-6)


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
