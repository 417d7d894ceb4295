"""synthetic_dataset: exact masks, determinism, both layouts indexed and loadable, CLI.

Its speed is measured by ``benchmarks/bench_synthetic_dataset.py``, not asserted here.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import synthetic as synth
from pipeline.cli import run_cli
from dataset import AnomalyDataset


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("texture", synth.TEXTURES)
@pytest.mark.parametrize("kind", synth.DEFECTS)
def test_defect_mask_is_exactly_the_changed_pixels(texture: str, kind: str) -> None:
    rng = np.random.default_rng(3)
    style = synth.class_style(texture, rng, (64, 48))
    clean = synth.render_normal(style, rng, (64, 48))
    assert clean.shape == (48, 64, 3) and clean.dtype == np.uint8
    assert 67 <= clean.min() and clean.max() <= 193 and clean.std() > 5  # a visible texture
    defective, mask = synth.add_defect(clean, kind, rng)
    changed = (defective != clean).any(-1)
    assert set(np.unique(mask).tolist()) == {0, 255}
    np.testing.assert_array_equal(mask > 0, changed)
    assert changed.sum() >= 20
    # visibly distinct: every changed pixel moved by at least 40 in some channel
    delta = np.abs(defective.astype(int) - clean.astype(int)).max(-1)
    assert delta[changed].min() >= 40


def test_mvtec_like_layout_meta_and_loading(tmp_path: Path) -> None:
    index = synth.make_mvtec_like(tmp_path, class_names=["rings", "fabric"], n_train=2, n_test_good=3,
                                  n_test_defect=5, image_size=(40, 32), seed=7)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == index and list(meta["test"]) == ["rings", "fabric"]
    items = meta["test"]["rings"]
    assert [i["specie_name"] for i in items] == ["blob", "color_spot", "good", "good", "good", "hole",
                                                 "scratch", "scratch"]
    assert items[-1] == {"img_path": "rings/test/scratch/001.png",
                         "mask_path": "rings/ground_truth/scratch/001_mask.png",
                         "cls_name": "rings", "specie_name": "scratch", "anomaly": 1}
    train = [i["img_path"] for i in meta["train"]["fabric"]]
    assert train == ["fabric/train/good/000.png", "fabric/train/good/001.png"]
    data = AnomalyDataset(str(tmp_path), image_size=32)
    assert len(data) == 16 and data.availability().metrics == "image-pixel-level"
    for position, entry in enumerate(data.items):
        assert (float(data[position]["img_mask"].sum()) > 0) == bool(entry["anomaly"])


def test_visa_like_layout_csv_meta_and_loading(tmp_path: Path) -> None:
    synth.make_visa_like(tmp_path, n_train=2, n_test_good=1, n_test_defect=2, image_size=(32, 32), seed=1)
    with open(tmp_path / "split_csv/1cls.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0] == {"object": "blobs", "split": "train", "label": "normal",
                       "image": "blobs/Data/Images/Normal/0000.JPG", "mask": ""}
    assert rows[3] == {"object": "blobs", "split": "test", "label": "anomaly",
                       "image": "blobs/Data/Images/Anomaly/000.JPG", "mask": "blobs/Data/Masks/Anomaly/000.png"}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert list(meta["test"]) == list(synth.VISA_CLASSES)
    assert set(synth.VISA_CLASSES).isdisjoint(synth.MVTEC_CLASSES)
    data = AnomalyDataset(str(tmp_path), image_size=32)
    assert [data[p]["anomaly"] for p in range(3)] == [0, 1, 1]
    assert float(data[1]["img_mask"].sum()) > 0


def test_deterministic_per_seed(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synth.make_mvtec_like(tmp_path / name, n_train=1, n_test_good=1, n_test_defect=4, image_size=(32, 32), seed=5)
        synth.make_visa_like(tmp_path / f"v{name}", n_train=1, n_test_good=1, n_test_defect=2,
                             image_size=(32, 32), seed=5)
    synth.make_mvtec_like(tmp_path / "c", n_train=1, n_test_good=1, n_test_defect=4, image_size=(32, 32), seed=6)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert files_of(tmp_path / "va") == files_of(tmp_path / "vb")
    a, c = files_of(tmp_path / "a"), files_of(tmp_path / "c")
    assert a.keys() == c.keys() and a["stripes/test/good/000.png"] != c["stripes/test/good/000.png"]


def test_cli_and_existing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--layout", "mvtec", "--root", str(tmp_path), "--size", "24", "--classes", "checker",
            "--n-train", "1", "--n-test-good", "1", "--n-test-defect", "2"]
    assert run_cli(synth.main, argv) == 0
    out = capsys.readouterr().out
    assert "| test    | checker |        1 |           2 |           2 |" in out
    assert run_cli(synth.main, argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "already holds checker" in err[0]
    assert run_cli(synth.main, [*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("flags, expected", [
    (["--n-train", "-1"], "error: --n-train -1 must be >= 0; see "),
    (["--classes", "a/b"], "error: --classes 'a/b' is not a folder name: use names without / or \\"),
    (["--classes", ".."], "error: --classes '..' is not a folder name"),
    (["--classes", "a", "a"], "error: --classes a a repeats a class"),
    (["--size", "4"], "error: --size takes SIDE or WIDTH HEIGHT, each at least 8"),
    (["--layout", "nope"], "error: argument --layout: invalid choice: 'nope'"),
], ids=["negative_count", "class_with_a_slash", "class_dot_dot", "repeated_class", "size_too_small", "layout"])
def test_cli_mistakes_are_one_line_and_write_nothing(flags, expected, tmp_path: Path, capsys) -> None:
    """A negative count or a class with a slash made a dataset silently (nested folders); argparse printed its usage."""
    root = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        synth.main(["--layout", "mvtec", "--root", str(root), "--size", "24", *flags])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not root.exists()
