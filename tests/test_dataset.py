"""dataset.AnomalyDataset: meta.json reading, file modes, masks, errors, workers, goldens."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.transform import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from dataset import AnomalyDataset

S = 12


def item(img: str, mask: str = "", cls: str = "part", anomaly: int = 0, specie: str = "") -> dict:
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


def write_meta(root: Path, meta: dict) -> None:
    (root / "meta.json").write_text(json.dumps(meta, indent=4))


def rgb_array(seed: int, shape: tuple[int, ...] = (20, 24, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reference_image(image: Image.Image, size: int = S) -> np.ndarray:
    """SPEC §2 written out with PIL and numpy: resize in the stored mode, RGB, /255, normalise."""
    array = np.asarray(image.resize((size, size), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    normalised = (array - np.array(OPENAI_DATASET_MEAN, np.float32)) / np.array(OPENAI_DATASET_STD, np.float32)
    return normalised.transpose(2, 0, 1)


@pytest.fixture()
def modes_root(tmp_path: Path) -> Path:
    """One file per mode real datasets contain, with masks in several modes."""
    files = {
        "rgb.png": Image.fromarray(rgb_array(1)),
        "gray.png": Image.fromarray(rgb_array(2, (20, 24))),
        "rgba.png": Image.fromarray(rgb_array(3, (20, 24, 4)), mode="RGBA"),
        "palette.png": Image.fromarray(rgb_array(4)).convert("P", palette=Image.ADAPTIVE, colors=16),
        "photo.jpg": Image.fromarray(rgb_array(5)),
        "scan.bmp": Image.fromarray(rgb_array(6)),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    depth16 = (np.arange(20 * 24).reshape(20, 24) * 8 + 100).astype(np.uint16)  # 100..3932: 12-bit data
    Image.fromarray(depth16).save(tmp_path / "ct16.png")
    box = np.zeros((20, 24), np.uint8)
    box[4:14, 6:18] = 1
    Image.fromarray(box, mode="L").convert("P").save(tmp_path / "mask_palette_values_1.png")  # VisA-style 0/1
    Image.fromarray(box.astype(np.uint16)).save(tmp_path / "mask16.png")
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[4:14, 6:18] = (255, 0, 0, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "mask_rgba.png")
    write_meta(tmp_path, {"train": {}, "test": {"part": [
        item("rgb.png", "mask_palette_values_1.png", anomaly=1),
        item("gray.png", "mask16.png", anomaly=1),
        item("rgba.png", "mask_rgba.png", anomaly=1),
        item("palette.png", "mask_rgba.png", anomaly=0),  # normal: its mask_path is ignored
        item("photo.jpg", "", anomaly=1),  # image-level anomaly
        item("scan.bmp"),
        item("ct16.png"),
    ]}})
    return tmp_path


def test_every_file_mode_loads_like_the_reference(modes_root: Path) -> None:
    data = AnomalyDataset(str(modes_root), image_size=S)
    for position in range(6):
        got = data[position]["img"]
        assert got.dtype == torch.float32 and got.shape == (3, S, S)
        want = reference_image(Image.open(modes_root / data.items[position]["img_path"]))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6, err_msg=data.items[position]["img_path"])
    # 16-bit: stretched from its own 100..3932 to 0..255 before the usual path
    stretched = np.rint((np.asarray(Image.open(modes_root / "ct16.png"), np.float64) - 100) * 255 / 3832)
    want = reference_image(Image.fromarray(stretched.astype(np.uint8), mode="L"))
    np.testing.assert_allclose(data[6]["img"].numpy(), want, atol=1e-6)


def test_masks_are_binary_and_follow_spec(modes_root: Path) -> None:
    data = AnomalyDataset(str(modes_root), image_size=S)
    box = np.zeros((20, 24), np.uint8)
    box[4:14, 6:18] = 255
    want = (np.asarray(Image.fromarray(box, mode="L").resize((S, S), Image.BILINEAR), np.float32) / 255 > 0.5)
    for position in range(3):
        mask = data[position]["img_mask"]
        assert mask.dtype == torch.float32 and mask.shape == (1, S, S)
        np.testing.assert_array_equal(mask[0].numpy(), want.astype(np.float32))
    for position in (3, 4, 5, 6):
        assert torch.equal(data[position]["img_mask"], torch.zeros(1, S, S))


def test_item_fields_class_ids_and_filter(tmp_path: Path) -> None:
    for name in ("a0.png", "a1.png", "b0.png"):
        Image.fromarray(rgb_array(len(name))).save(tmp_path / name)
    write_meta(tmp_path, {"train": {}, "test": {"zeta": [item("a0.png", cls="zeta"), item("a1.png", cls="zeta")],
                                              "alpha": [item("b0.png", cls="alpha", anomaly=1)]}})
    data = AnomalyDataset(str(tmp_path), image_size=S)
    assert data.class_names == ["zeta", "alpha"]  # meta.json order, not sorted
    assert len(data) == 3
    got = data[2]
    fields = (got["cls_name"], got["cls_id"], got["anomaly"], got["img_path"])
    assert fields == ("alpha", 1, 1, str(tmp_path / "b0.png"))
    assert set(got) == {"img", "img_mask", "anomaly", "cls_name", "img_path", "cls_id", "index"}
    assert got["index"] == 2 and data[0]["index"] == 0  # results are keyed by it, whatever batches the items

    only = AnomalyDataset(str(tmp_path), image_size=S, class_names=["alpha", "zeta"])
    assert only.class_names == ["zeta", "alpha"]
    alpha = AnomalyDataset(str(tmp_path), image_size=S, class_names=["alpha"])
    assert alpha.class_names == ["alpha"] and alpha[0]["cls_id"] == 0
    assert alpha.items == [item("b0.png", cls="alpha", anomaly=1)]
    assert alpha.availability().metrics == "none"
    assert data.availability("zeta").n_normal == 2 and data.availability().metrics == "image-level"
    assert data.any_normal and data.any_anomalous and not data.any_mask


def test_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AnomalyCLIPError, match=r"meta.json does not exist.*generate_dataset_json/"):
        AnomalyDataset(str(tmp_path))
    Image.fromarray(rgb_array(0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_meta(tmp_path, {"test": {"part": [item("ok.png", "gt/missing_mask.png", anomaly=1), item("broken.png")]}})
    with pytest.raises(AnomalyCLIPError, match=r"no 'train' split \(it has: test\)"):
        AnomalyDataset(str(tmp_path), split="train")
    with pytest.raises(AnomalyCLIPError, match=r"class\(es\) screw not in the 'test' split.*it has: part"):
        AnomalyDataset(str(tmp_path), class_names=["screw"])
    # Missing files are found when the dataset is built, all at once, before any model loads.
    write_meta(tmp_path, {"test": {"part": [item("ok.png", "gt/missing_mask.png", anomaly=1), item("gone.png"),
                                            item("ok.png", "gt/unused_for_normal.png"), item("broken.png")]}})
    with pytest.raises(AnomalyCLIPError, match=r"lists 2 file\(s\) that do not exist: gt/missing_mask.png, gone.png;"):
        AnomalyDataset(str(tmp_path))
    write_meta(tmp_path, {"test": {"part": [item("ok.png", "gt/unused_for_normal.png"), item("broken.png")]}})
    data = AnomalyDataset(str(tmp_path), image_size=S)
    assert data[0]["img_mask"].sum() == 0  # a normal item's mask path is not read
    with pytest.raises(AnomalyCLIPError, match=r"cannot read image file .*broken.png"):
        data[1]
    write_meta(tmp_path, {"test": {"part": [{"img_path": "ok.png"}]}})
    with pytest.raises(AnomalyCLIPError, match="without the keys"):
        AnomalyDataset(str(tmp_path))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(AnomalyCLIPError, match="cannot read .*meta.json"):
        AnomalyDataset(str(tmp_path))


def test_original_indexer_meta_loads(tmp_path: Path) -> None:
    """DAGM's original meta.json: keys Train/Test, absolute paths written on another machine."""
    root = tmp_path / "DAGM_KaggleUpload"
    (root / "Class1/Test/Label").mkdir(parents=True)
    Image.fromarray(rgb_array(0, (20, 24))).save(root / "Class1/Test/0576.PNG")
    Image.fromarray(rgb_array(1, (20, 24))).save(root / "Class1/Test/0577.PNG")
    Image.fromarray(rgb_array(2, (20, 24))).save(root / "Class1/Test/0578.PNG")
    mask = np.zeros((20, 24), np.uint8)
    mask[:10] = 255
    Image.fromarray(mask).save(root / "Class1/Test/Label/0577_label.PNG")
    old = "/remote-home/someone/data/DAGM_KaggleUpload/Class1/Test"
    local = str(root / "Class1/Test")
    write_meta(root, {"Train": {"Class1": []}, "Test": {"Class1": [
        item(f"{old}/0576.PNG", "", "Class1"),
        item(f"{old}/0577.PNG", f"{old}/Label/0577_label.PNG", "Class1", 1),
        item(f"{local}/0578.PNG", "", "Class1"),  # absolute and valid here (0576 again would count twice)
    ]}})
    data = AnomalyDataset(str(root), image_size=S)
    assert [data[i]["img_path"] for i in range(3)] == [
        str(root / "Class1/Test/0576.PNG"), str(root / "Class1/Test/0577.PNG"), f"{local}/0578.PNG"]
    assert data[1]["img_mask"].sum() > 0 and data.any_mask


def _save_images(root: Path, *names: str) -> None:
    for number, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb_array(number, (20, 24))).save(root / name)


def test_a_path_from_another_machine_never_binds_above_its_class_folder(tmp_path: Path) -> None:
    """``carpet/test/good/000.png`` is gone here; an unrelated ``000.png`` in the root is not it."""
    root = tmp_path / "mvtec"
    _save_images(root, "000.png", "carpet/test/good/001.png", "images/002.png")
    write_meta(root, {"test": {"carpet": [item("/old/machine/carpet/test/good/001.png", cls="carpet"),
                                          item("/old/machine/carpet/test/good/000.png", cls="carpet")]}})
    with pytest.raises(AnomalyCLIPError, match=r"lists 1 file\(s\) that do not exist: "
                                               r"/old/machine/carpet/test/good/000.png; restore them"):
        AnomalyDataset(str(root), image_size=S)
    # A class that is not a folder of its paths (CVC-ColonDB's "colon"): the file's folder is kept.
    write_meta(root, {"test": {"colon": [item("/old/CVC-ColonDB/images/002.png", cls="colon"),
                                         item("/old/CVC-ColonDB/000.png", cls="colon")]}})
    with pytest.raises(AnomalyCLIPError, match=r"lists 1 file\(s\) that do not exist: /old/CVC-ColonDB/000.png;"):
        AnomalyDataset(str(root), image_size=S)


@pytest.mark.parametrize("root_name, cls, listed, found", [
    ("mvtec", "carpet", "/home/someone/data/mvtec_ad/carpet/test/good/000.png", "carpet/test/good/000.png"),
    ("mvtec", "carpet", "mvtec_ad/carpet/test/good/000.png", "carpet/test/good/000.png"),  # the old root's name
    ("mvtec", "carpet", "/d/carpet/x/carpet/test/good/000.png", "carpet/test/good/000.png"),  # the last "carpet"
    ("carpet", "carpet", "/d/carpet/test/good/000.png", "test/good/000.png"),  # a root that is the class folder
    ("colon", "colon", "/remote-home/u/CVC-ColonDB/images/000.png", "images/000.png"),  # colon: not a folder
    ("br35", "brain", "/remote-home/u/br35//no/000.png", "no/000.png"),
    ("brainmri", "brain", "/remote-home/u/BrainMRI/brain_tumor_dataset/no/000.png", "brain_tumor_dataset/no/000.png"),
    ("visa", "candle", "C:\\data\\VisA\\candle\\Data\\Images\\Normal\\000.JPG", "candle/Data/Images/Normal/000.JPG"),
])
def test_paths_of_another_machine_are_re_rooted(tmp_path: Path, root_name: str, cls: str, listed: str,
                                                 found: str) -> None:
    root = tmp_path / root_name
    _save_images(root, found)
    write_meta(root, {"test": {cls: [item(listed, cls=cls)]}})
    assert AnomalyDataset(str(root), image_size=S)[0]["img_path"] == str(root / found)


def test_picklable_and_loads_in_worker_processes(tmp_path: Path) -> None:
    for number in range(4):
        Image.fromarray(rgb_array(number)).save(tmp_path / f"{number}.png")
    write_meta(tmp_path, {"train": {}, "test": {"part": [item(f"{n}.png", anomaly=n % 2) for n in range(4)]}})
    data = AnomalyDataset(str(tmp_path), image_size=S)
    copy = pickle.loads(pickle.dumps(data))
    assert torch.equal(copy[1]["img"], data[1]["img"])
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b["anomaly"].tolist() for b in batches] == [[0, 1], [0, 1]]
    assert batches[1]["img"].shape == (2, 3, S, S) and batches[0]["img_mask"].shape == (2, 1, S, S)
    assert torch.equal(batches[1]["img"][1], data[3]["img"])


@pytest.mark.parametrize("size, golden", [(84, "eval_btad_f24_s84.npz"), (56, "eval_btad_f6_12_18_24_s56_sigma2.npz")])
def test_synth_btad_masks_match_the_original(goldens_dir: Path, tmp_path: Path, size: int, golden: str) -> None:
    """Item order and thresholded masks of the original's evaluation on goldens/synth_btad."""
    reference = np.load(goldens_dir / golden)
    root = tmp_path / "synth_btad"
    shutil.copytree(goldens_dir / "synth_btad", root)
    data = AnomalyDataset(str(root), image_size=size)
    assert [i["img_path"] for i in data.items] == reference["img_paths"].tolist()
    assert [i["anomaly"] for i in data.items] == reference["img_anomaly"].tolist()
    for cls in data.class_names:
        positions = [p for p, i in enumerate(data.items) if i["cls_name"] == cls]
        masks = torch.stack([data[p]["img_mask"] for p in positions]).numpy()
        np.testing.assert_array_equal(masks, reference[f"{cls}__imgs_masks"])
