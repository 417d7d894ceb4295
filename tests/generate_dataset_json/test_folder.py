"""folder.py on a user's own MVTec-style data, with and without masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from dataset import AnomalyDataset
from generate_dataset_json.folder import folder_layout
from generate_dataset_json.command import run
from generate_dataset_json.indexer import index_dataset
from tests.conftest import REPO_ROOT
from tests.generate_dataset_json.trees import SIZE, Tree, mvtec_class


def test_with_masks_custom_normal_name_and_suffix(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    mvtec_class(tree, "gear", normal="ok", mask_suffix="_gt", mask_ext=".bmp", anomalous={"dent": ["a1", "a2"]})
    mvtec_class(tree, "bolt", normal="ok", mask_suffix="_gt", train=False, anomalous={"rust": ["r1"]})
    index = index_dataset(folder_layout(normal_names=("ok",), mask_suffix="_gt"), tmp_path)
    assert list(index["test"]) == ["bolt", "gear"]  # sorted by name
    assert list(index["train"]) == ["gear"]
    assert index["test"]["gear"] == tree.expected["test"]["gear"]
    assert index["test"]["bolt"] == tree.expected["test"]["bolt"]
    assert index["train"]["gear"] == tree.expected["train"]["gear"]
    assert AnomalyDataset(str(tmp_path), image_size=SIZE).availability().metrics == "image-pixel-level"


def test_without_masks_is_image_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = Tree(tmp_path)
    for specie, stems in (("defect", ("2", "3")), ("good", ("0", "1"))):
        for stem in stems:
            tree.add("test", "widget", f"widget/test/{specie}/{stem}.jpg", "", specie, int(specie == "defect"))
    tree.file("widget/test/notes.txt")
    assert run(folder_layout(), ["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 anomalous test image(s) have no mask" in out and "widget" in out
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"train": {}, "test": tree.expected["test"]}
    data = AnomalyDataset(str(tmp_path), image_size=SIZE)
    assert data.availability().metrics == "image-level"
    assert all(float(data[i]["img_mask"].sum()) == 0 for i in range(len(data)))


def test_partial_masks_are_an_error(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    mvtec_class(tree, "gear", anomalous={"dent": ["0", "1"]})
    (tmp_path / "gear/ground_truth/dent/1_mask.png").unlink()
    with pytest.raises(AnomalyCLIPError, match=r"anomalous image without mask \(1\): gear/test/dent/1.png"):
        index_dataset(folder_layout(), tmp_path)


def test_same_stem_masks_single_class_root_and_class_filter(tmp_path: Path) -> None:
    tree = Tree(tmp_path / "my_part")
    tree.add("test", "my_part", "test/good/0.png", "", "good", 0)
    tree.add("test", "my_part", "test/bad/1.png", "ground_truth/bad/1.png", "bad", 1)
    index = index_dataset(folder_layout(mask_suffix=""), tmp_path / "my_part")
    assert index["test"]["my_part"] == sorted(tree.expected["test"]["my_part"], key=lambda i: i["img_path"])

    other = Tree(tmp_path / "many")
    for cls in ("a", "b", "c"):
        mvtec_class(other, cls, train=False)
    (tmp_path / "many/results").mkdir()
    index = index_dataset(folder_layout(classes=("c", "a")), tmp_path / "many")
    assert list(index["test"]) == ["c", "a"]
    with pytest.raises(AnomalyCLIPError, match="class.*zzz.*not found"):
        index_dataset(folder_layout(classes=("zzz",)), tmp_path / "many")


def _folder_cli(root: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "generate_dataset_json/folder.py"), "--root", str(root),
                           *flags], capture_output=True, text=True, timeout=120)


def test_misspelt_normal_name_is_refused_not_indexed_as_anomalous(tmp_path: Path) -> None:
    """--normal-names okk (the folder is ok) used to index every image as anomalous, with warnings only."""
    tree = Tree(tmp_path)
    mvtec_class(tree, "gear", normal="ok", anomalous={"dent": ["a1"]})
    done = _folder_cli(tmp_path, "--normal-names", "ok", "okk")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "normal type folder in no class (1): okk (type folders found: dent, ok)." in lines[0]
    assert "or --normal-names with no name when the dataset has none" in lines[0]
    assert not (tmp_path / "meta.json").exists()
    assert _folder_cli(tmp_path, "--normal-names", "ok").returncode == 0
    assert json.loads((tmp_path / "meta.json").read_text())["test"]["gear"] == tree.expected["test"]["gear"]


def test_normal_names_without_a_name_indexes_a_dataset_of_defects_only(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    tree.add("test", "polyp", "polyp/test/polyp/0.png", "polyp/ground_truth/polyp/0_mask.png", "polyp", 1)
    assert _folder_cli(tmp_path).returncode == 2  # the default, good, is no folder here
    done = _folder_cli(tmp_path, "--normal-names")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "meta.json").read_text())["test"] == tree.expected["test"]
