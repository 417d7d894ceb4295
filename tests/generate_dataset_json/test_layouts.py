"""Each public layout: a fake tree in that layout, its meta.json item by item, then every item loaded."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from dataset import AnomalyDataset
from tests.conftest import writable_copy
from generate_dataset_json.indexer import index_dataset
from tests.generate_dataset_json.trees import SIZE, Tree, mvtec_class


def build_mvtec(tree: Tree) -> None:
    # MVTec AD's order puts carpet before bottle
    mvtec_class(tree, "carpet", anomalous={"color": ["000"], "cut": ["000", "001"], "hole": ["002"]})
    mvtec_class(tree, "bottle")
    tree.file("bottle/test/readme.txt")
    tree.file("bottle/train/.DS_Store")
    tree.file("bottle/test/good/Thumbs.db")  # non-images among the images and masks are skipped
    tree.file("carpet/ground_truth/cut/notes.txt")
    tree.file("license.txt")


def build_visa(tree: Tree) -> None:
    rows = [("capsules", "train", "normal", "capsules/Data/Images/Normal/0001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/001.JPG", "candle/Data/Masks/Anomaly/001.png"),
            ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
            ("capsules", "test", "anomaly", "capsules/Data/Images/Anomaly/000.JPG",
             "capsules/Data/Masks/Anomaly/000.png"),
            ("capsules", "test", "normal", "capsules/Data/Images/Normal/0000.JPG", "")]
    # expected: candle before capsules (VisA order), CSV row order within class and split
    for cls in ("candle", "capsules"):
        for obj, split, label, img, mask in rows:
            if obj == cls:
                tree.add(split, cls, img, mask, "", int(label == "anomaly"))
    lines = ["object,split,label,image,mask"] + [",".join(row) for row in rows]
    tree.file("split_csv/1cls.csv", ("\n".join(lines) + "\n").encode())
    tree.file("split_csv/2cls_fewshot.csv", b"object,split\n")


def build_mpdd(tree: Tree) -> None:
    mvtec_class(tree, "bracket_black", anomalous={"hole": ["000"], "scratches": ["000"]})
    mvtec_class(tree, "tubes", anomalous={"anomalous": ["000", "001"]})


def build_btad(tree: Tree) -> None:
    mvtec_class(tree, "01", normal="ok", mask_suffix="", image_ext=".bmp", anomalous={"ko": ["0000", "0003"]},
                normals=("0000", "0001"))
    mvtec_class(tree, "02", normal="ok", mask_suffix="", anomalous={"ko": ["0040"]}, normals=("0000",))
    mvtec_class(tree, "03", normal="ok", mask_suffix="", mask_ext=".bmp", image_ext=".bmp",
                anomalous={"ko": ["0002", "0015", "0107"]}, normals=("0000",))


def build_sdd(tree: Tree) -> None:
    mvtec_class(tree, "electrical commutators", train=False, anomalous={"bad": ["kos01_Part5", "kos10_Part3"]},
                normals=("kos01_Part0", "kos02_Part1"))


def build_dagm(tree: Tree) -> None:
    for cls in ("Class2", "Class10"):  # Class2 comes first, although "Class10" < "Class2" as strings
        for split, folder in (("train", "Train"), ("test", "Test")):
            for stem, anomalous in (("0576", False), ("0577", True), ("0578", False), ("1043", True)):
                img = f"{cls}/{folder}/{stem}.PNG"
                mask = f"{cls}/{folder}/Label/{stem}_label.PNG" if anomalous else ""
                tree.add(split, cls, img, mask, "", int(anomalous), mode="L")
            tree.file(f"{cls}/{folder}/Label/Labels.txt", b"1\n0577 1 0577_label.PNG\n")


def build_dtd(tree: Tree) -> None:
    mvtec_class(tree, "Woven_001", anomalous={"bad": ["000", "001"]})
    mvtec_class(tree, "Blotchy_099", anomalous={"bad": ["000"]})


def build_head_ct(tree: Tree) -> None:
    for specie, stems in (("good", ("000", "001")), ("hemorrhage", ("100", "101"))):
        for stem in stems:
            tree.add("test", "brain", f"brain/test/{specie}/{stem}.png", "", specie, int(specie != "good"))


def build_brainmri(tree: Tree) -> None:
    for specie, names in (("no", ("1 no.jpeg", "No12.jpg")), ("yes", ("Y1.jpg", "Y10.jpg"))):
        for name in names:
            tree.add("test", "brain", f"brain_tumor_dataset/{specie}/{name}", "", specie, int(specie == "yes"))
    tree.file("README.md")


def build_br35(tree: Tree) -> None:
    for specie, names in (("no", ("no0.jpg", "no1.jpg")), ("yes", ("y0.jpg", "y1.jpg"))):
        for name in names:
            tree.add("test", "brain", f"{specie}/{name}", "", specie, int(specie == "yes"))
    tree.image("pred/pred0.jpg")
    tree.image("pred/pred1.jpg")


def build_covid(tree: Tree) -> None:
    for specie in ("COVID", "Lung_Opacity", "NORMAL", "Viral Pneumonia"):
        for number in (1, 2):
            tree.add("test", "chest", f"{specie}/{specie}-{number}.png", "", specie, int(specie != "NORMAL"), mode="L")
    tree.file("COVID.metadata.xlsx", b"PK\x03\x04")
    tree.file("README.md.txt")


def build_isbi(tree: Tree) -> None:
    data, gt = "skin/test/ISBI2016_ISIC_Part1_Test_Data", "skin/ISBI2016_ISIC_Part1_Test_GroundTruth"
    for stem in ("ISIC_0000003", "ISIC_0000012", "ISIC_0000013"):
        tree.add("test", "skin", f"{data}/{stem}.jpg", f"{gt}/{stem}_Segmentation.png",
                 "ISBI2016_ISIC_Part1_Test_Data", 1)


def _images_masks(tree: Tree, cls: str, image_dir: str, mask_dir: str, names: tuple[str, ...],
                  specie: str = "") -> None:
    for name in names:
        tree.add("test", cls, f"{image_dir}/{name}", f"{mask_dir}/{name}", specie, 1)


def build_clinicdb(tree: Tree) -> None:
    _images_masks(tree, "colon", "images", "masks", ("1.png", "10.png", "2.png"))


def build_colondb(tree: Tree) -> None:
    _images_masks(tree, "colon", "images", "masks", ("1.png", "101.png", "33.png"))


def build_kvasir(tree: Tree) -> None:
    _images_masks(tree, "colon", "images", "masks", ("cju0qkwl35piu0993l0dewei2.jpg", "cju0qoxqj9q6s0835b43399p4.jpg"))


def build_endotect(tree: Tree) -> None:
    _images_masks(tree, "colon", "images", "masks", ("0a4e9c5b-3e18-4ef2.jpg", "1b7d8a3c-4f2e-41d8.jpg"), "images")
    tree.file("bounding-boxes.json", b"{}")


def build_tn3k(tree: Tree) -> None:
    _images_masks(tree, "thyroid", "test-image", "test-mask", ("0000.jpg", "0001.jpg", "0010.jpg"))
    tree.image("trainval-image/0002.jpg")
    tree.mask("trainval-mask/0002.jpg")


CASES: dict[str, Callable[[Tree], None]] = {
    "mvtec": build_mvtec, "visa": build_visa, "mpdd": build_mpdd, "btad": build_btad, "SDD": build_sdd,
    "DAGM": build_dagm, "DTD": build_dtd, "head_ct": build_head_ct, "brainmri": build_brainmri,
    "br35": build_br35, "covid": build_covid, "isbi": build_isbi, "clinicDB": build_clinicdb,
    "colonDB": build_colondb, "kvasir": build_kvasir, "endoTect": build_endotect, "tn3k": build_tn3k,
}


def expected_mask(root: Path, item: dict) -> np.ndarray:
    """The mask as SPEC §2 defines it at the file's own size (luma > 0; zero for normal/unmasked)."""
    if not item["anomaly"] or not item["mask_path"]:
        return np.zeros((SIZE, SIZE), dtype=np.float32)
    return (np.asarray(Image.open(root / item["mask_path"]).convert("L")) > 0).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_index_and_load(name: str, tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    CASES[name](tree)
    layout = importlib.import_module(f"generate_dataset_json.{name}").LAYOUT

    index = index_dataset(layout, tmp_path)

    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == index
    assert list(meta) == ["train", "test"]
    for split in ("train", "test"):
        assert list(meta[split]) == list(tree.expected[split]), f"class order of {split}"
        for cls, items in tree.expected[split].items():
            assert len(meta[split][cls]) == len(items)
            for got, want in zip(meta[split][cls], items):
                assert got == want
                assert list(got) == ["img_path", "mask_path", "cls_name", "specie_name", "anomaly"]

    for split, classes in tree.expected.items():
        if not classes:
            continue
        data = AnomalyDataset(str(tmp_path), image_size=SIZE, split=split)
        assert data.class_names == list(classes)
        assert data.items == [item for items in classes.values() for item in items]
        for position, want in enumerate(data.items):
            got = data[position]
            assert got["anomaly"] == want["anomaly"]
            assert got["cls_name"] == want["cls_name"]
            assert got["cls_id"] == data.class_names.index(want["cls_name"])
            assert got["img_path"] == str(tmp_path / want["img_path"])
            assert got["img"].shape == (3, SIZE, SIZE)
            np.testing.assert_array_equal(got["img_mask"][0].numpy(), expected_mask(tmp_path, want))


@pytest.mark.parametrize("name", ["br35", "covid", "endoTect", "mvtec"])
def test_second_run_gives_the_same_index(name: str, tmp_path: Path) -> None:
    """A meta.json already in the root (or among the type folders) changes nothing."""
    CASES[name](Tree(tmp_path))
    layout = importlib.import_module(f"generate_dataset_json.{name}").LAYOUT
    first = (index_dataset(layout, tmp_path), (tmp_path / "meta.json").read_bytes())
    second = (index_dataset(layout, tmp_path), (tmp_path / "meta.json").read_bytes())
    assert first == second
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_covid_kaggle_v4_nested_images(tmp_path: Path) -> None:
    """Later COVID-19 Radiography releases keep images in <type>/images and lung masks in <type>/masks."""
    tree = Tree(tmp_path)
    for specie in ("COVID", "Normal"):
        tree.add("test", "chest", f"{specie}/images/{specie}-1.png", "", specie, int(specie != "Normal"), mode="L")
        tree.mask(f"{specie}/masks/{specie}-1.png")
    from generate_dataset_json import covid

    assert index_dataset(covid.LAYOUT, tmp_path, write=False) == tree.expected


def test_btad_matches_the_original_indexer(goldens_dir: Path, tmp_path: Path) -> None:
    """On a copy of goldens/synth_btad, btad.py writes the items the original BtadSolver wrote."""
    root = writable_copy(goldens_dir / "synth_btad", tmp_path / "synth_btad")
    original = json.loads((root / "meta.json").read_text())
    (root / "meta.json").unlink()
    from generate_dataset_json import btad

    index = index_dataset(btad.LAYOUT, root)

    def normalised(meta: dict) -> dict:
        # the original may write root-prefixed paths; keep what follows the root
        def rel(path: str) -> str:
            return path.split("synth_btad/", 1)[-1] if path else path

        return {split: {cls: [{**item, "img_path": rel(item["img_path"]), "mask_path": rel(item["mask_path"])}
                              for item in items] for cls, items in meta[split].items()} for split in ("train", "test")}

    assert normalised(original) == index
    assert [len(index["test"][c]) for c in ("01", "02", "03")] == [8, 8, 8]
    assert [i["specie_name"] for i in index["test"]["01"]] == ["ko"] * 4 + ["ok"] * 4
