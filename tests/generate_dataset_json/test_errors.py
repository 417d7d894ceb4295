"""Incomplete or broken downloads: one clear error naming the offending paths, and no meta.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from generate_dataset_json import DAGM, br35, btad, endoTect, isbi, kvasir, mvtec, visa
from generate_dataset_json.indexer import index_dataset
from tests.generate_dataset_json.test_layouts import CASES
from tests.generate_dataset_json.trees import Tree, mvtec_class


def index_error(layout, root: Path) -> str:
    with pytest.raises(AnomalyCLIPError) as caught:
        index_dataset(layout, root)
    message = str(caught.value)
    assert "\n" not in message
    assert not (root / "meta.json").exists()
    return message


def mvtec_tree(root: Path) -> Tree:
    tree = Tree(root)
    mvtec_class(tree, "bottle")
    return tree


def test_missing_root(tmp_path: Path) -> None:
    message = index_error(mvtec.LAYOUT, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "does not exist" in message


def test_root_without_any_class(tmp_path: Path) -> None:
    (tmp_path / "Bottle").mkdir()
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "none of the MVTec AD classes" in message and "carpet" in message


def test_missing_mask(tmp_path: Path) -> None:
    mvtec_tree(tmp_path)
    (tmp_path / "bottle/ground_truth/broken_large/001_mask.png").unlink()
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "anomalous image without mask (1): bottle/test/broken_large/001.png" in message
    assert "mask without image" not in message


def test_mask_with_a_different_name_is_not_paired_by_position(tmp_path: Path) -> None:
    """000.png with only 000_mask.png and 0001_mask.png: the second is no mask of 001.png."""
    tree = mvtec_tree(tmp_path)
    assert index_dataset(mvtec.LAYOUT, tmp_path, write=False) == tree.expected  # complete before the rename
    (tmp_path / "bottle/ground_truth/broken_large/001_mask.png").rename(
        tmp_path / "bottle/ground_truth/broken_large/0001_mask.png")
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "anomalous image without mask (1): bottle/test/broken_large/001.png" in message
    assert "mask without image (1): bottle/ground_truth/broken_large/0001_mask.png" in message


def test_orphan_masks(tmp_path: Path) -> None:
    tree = mvtec_tree(tmp_path)
    tree.mask("bottle/ground_truth/broken_large/007_mask.png")
    tree.mask("bottle/ground_truth/broken_small/000_mask.png")  # no test/broken_small folder
    tree.mask("bottle/ground_truth/broken_large/003.png")  # does not follow <stem>_mask.png
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "mask without image (3)" in message
    for path in ("bottle/ground_truth/broken_large/007_mask.png", "bottle/ground_truth/broken_small/000_mask.png",
                 "bottle/ground_truth/broken_large/003.png"):
        assert path in message


def test_missing_mask_folder(tmp_path: Path) -> None:
    tree = mvtec_tree(tmp_path)
    tree.image("bottle/test/scratch/000.png")
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "missing mask folder (1): bottle/ground_truth/scratch" in message


def test_corrupt_and_empty_image_files(tmp_path: Path) -> None:
    tree = mvtec_tree(tmp_path)
    tree.file("bottle/test/good/002.png", b"\x89PNG truncated")
    tree.file("bottle/train/good/005.png", b"")
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "unreadable image (2): bottle/test/good/002.png, bottle/train/good/005.png" in message


def test_empty_class(tmp_path: Path) -> None:
    mvtec_tree(tmp_path)
    (tmp_path / "carpet/test").mkdir(parents=True)
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "class without images (1): carpet (test split)" in message


def test_empty_type_folder_and_missing_test_folder(tmp_path: Path) -> None:
    mvtec_tree(tmp_path)
    (tmp_path / "bottle/test/good").joinpath("Thumbs.db").write_bytes(b"x")
    for image in (tmp_path / "bottle/test/good").glob("*.png"):
        image.unlink()
    (tmp_path / "carpet/train/good").mkdir(parents=True)
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "folder without images (2): carpet/train/good, bottle/test/good" in message
    assert "missing folder (1): carpet/test" in message


def test_long_lists_are_cut_at_ten(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    mvtec_class(tree, "bottle", anomalous={"crack": [f"{n:03d}" for n in range(15)]})
    for mask in (tmp_path / "bottle/ground_truth/crack").iterdir():
        mask.unlink()
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert "anomalous image without mask (15)" in message
    assert "bottle/test/crack/009.png ... and 5 more" in message
    assert "bottle/test/crack/010.png" not in message


@pytest.mark.parametrize("name, layout, mask", [
    ("btad", btad.LAYOUT, "01/ground_truth/ko/0003.png"),
    ("isbi", isbi.LAYOUT, "skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000012_Segmentation.png"),
    ("kvasir", kvasir.LAYOUT, "masks/cju0qoxqj9q6s0835b43399p4.jpg"),
    ("endoTect", endoTect.LAYOUT, "masks/1b7d8a3c-4f2e-41d8.jpg"),
    ("visa", visa.LAYOUT, "candle/Data/Masks/Anomaly/000.png"),
])
def test_missing_mask_in_other_layouts(name: str, layout, mask: str, tmp_path: Path) -> None:
    CASES[name](Tree(tmp_path))
    (tmp_path / mask).unlink()
    assert "anomalous image without mask (1)" in index_error(layout, tmp_path)


def test_dagm_orphan_label(tmp_path: Path) -> None:
    CASES["DAGM"](Tree(tmp_path))
    (tmp_path / "Class2/Test/1043.PNG").unlink()
    message = index_error(DAGM.LAYOUT, tmp_path)
    assert "mask without image (1): Class2/Test/Label/1043_label.PNG" in message


def test_br35_missing_type_folder(tmp_path: Path) -> None:
    Tree(tmp_path).image("no/no0.jpg")
    message = index_error(br35.LAYOUT, tmp_path)
    assert "missing folder (1): yes" in message


def test_visa_missing_split_file_and_bad_rows(tmp_path: Path) -> None:
    CASES["visa"](Tree(tmp_path))
    csv_path = tmp_path / "split_csv/1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("candle,test,normal", "candle,val,normal"))
    assert "bad row" in index_error(visa.LAYOUT, tmp_path)
    csv_path.unlink()
    message = index_error(visa.LAYOUT, tmp_path)
    assert "split_csv/1cls.csv does not exist" in message


def test_visa_split_file_that_is_not_text(tmp_path: Path) -> None:
    CASES["visa"](Tree(tmp_path))
    csv_path = tmp_path / "split_csv/1cls.csv"
    csv_path.write_bytes(b"object,split,label,image,mask\n\x80\x81\xff binary\n")
    message = index_error(visa.LAYOUT, tmp_path)
    assert message.startswith(f"{csv_path} is not a readable CSV text file ('utf-8' codec can't decode byte 0x80")
    assert message.endswith("restore the original split_csv/1cls.csv")
