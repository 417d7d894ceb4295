"""SPEC §2 preprocessing: parity with the original, thresholding, robust file reading."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.transform import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    binarize_mask,
    image_transform,
    load_image,
    load_mask,
    mask_transform,
)


def test_constants() -> None:
    assert OPENAI_DATASET_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_DATASET_STD == (0.26862954, 0.26130258, 0.27577711)


def test_reproduces_the_original_preprocessing(goldens_dir: Path) -> None:
    """goldens/upstream_preprocess.pt: images and raw masks to 1e-6, thresholded masks exactly."""
    folder = goldens_dir / "preprocess_images"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    reference = torch.load(goldens_dir / "upstream_preprocess.pt", weights_only=False)
    images, masks = image_transform(70), mask_transform(70)
    fractional = 0
    for position, rel in enumerate(reference["img_paths"]):
        image = images(load_image(folder / rel))
        assert image.dtype == torch.float32 and image.shape == (3, 70, 70)
        torch.testing.assert_close(image, reference["img"][position], atol=1e-6, rtol=0)
        if int(reference["anomaly"][position]):
            mask_file = folder / rel.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            raw = masks(load_mask(mask_file))
        else:
            raw = torch.zeros(1, 70, 70)
        assert raw.dtype == torch.float32 and raw.shape == (1, 70, 70)
        torch.testing.assert_close(raw, reference["img_mask_raw"][position], atol=1e-6, rtol=0)
        assert torch.equal(binarize_mask(raw), (reference["img_mask_raw"][position] > 0.5).float())
        fractional += int(((raw > 0) & (raw < 1)).sum())
    assert fractional > 0  # our masks reach the threshold unbinarised (bilinear), so it is exercised


def test_binarize_threshold_is_strictly_above_half() -> None:
    values = torch.tensor([[[0.0, 0.5, 0.5000001, 127 / 255, 128 / 255, 1.0]]])
    assert binarize_mask(values).tolist() == [[[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]]]
    assert binarize_mask(values).dtype == torch.float32


def test_transforms_resize_on_the_pil_side_ignoring_aspect(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png")
    got = image_transform(20)(image)
    want = np.asarray(image.resize((20, 20), Image.BICUBIC), np.float32) / 255.0
    want = (want - np.array(OPENAI_DATASET_MEAN, np.float32)) / np.array(OPENAI_DATASET_STD, np.float32)
    np.testing.assert_allclose(got.numpy(), want.transpose(2, 0, 1), atol=1e-6)
    transform = pickle.loads(pickle.dumps(image_transform(20)))  # usable in DataLoader workers
    assert torch.equal(transform(image), got)


def test_load_image_leaves_8bit_files_untouched(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(tmp_path / "g.png")
    for name in ("a.png", "g.png"):
        loaded, plain = load_image(tmp_path / name), Image.open(tmp_path / name)
        assert loaded.mode == plain.mode and loaded.tobytes() == plain.tobytes()


def test_16bit_images_are_stretched_and_16bit_masks_binarised(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 1000], [2000, 4095]], np.uint16)).save(tmp_path / "ct.png")
    Image.fromarray(np.full((2, 2), 700, np.uint16)).save(tmp_path / "flat.png")
    Image.fromarray(np.array([[0, 1], [0, 300]], np.uint16)).save(tmp_path / "mask16.png")
    assert Image.open(tmp_path / "ct.png").mode == "I;16"
    image = load_image(tmp_path / "ct.png")
    assert image.mode == "L" and np.asarray(image).tolist() == [[0, 62], [125, 255]]
    assert np.asarray(load_image(tmp_path / "flat.png")).tolist() == [[0, 0], [0, 0]]
    mask = load_mask(tmp_path / "mask16.png")
    assert mask.mode == "L" and np.asarray(mask).tolist() == [[0, 255], [0, 255]]


def test_masks_binarise_on_luma_above_zero(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (0, 0, 3)  # luma 0 after rounding: stays background, as in the original
    rgb[0, 1] = (0, 0, 10)
    rgb[1, 2] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert np.asarray(load_mask(tmp_path / "m.png")).tolist() == [[0, 255, 0], [0, 0, 255]]
    raw = mask_transform(3)(load_mask(tmp_path / "m.png"))
    assert raw.dtype == torch.float32 and raw.shape == (1, 3, 3)
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0 and 0.0 < float(raw[0, 1, 1]) < 1.0


def test_unreadable_files_raise_naming_them(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(AnomalyCLIPError, match=r"cannot read image file .*bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(AnomalyCLIPError, match=r"mask file .*gone.png does not exist"):
        load_mask(tmp_path / "gone.png")
