"""visualize.py: the colour scales, defect masks at the image's size and their contours on the overlay."""

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import visualize


def jet(level: int) -> np.ndarray:
    """RGB of JET at ``level`` in 0..255."""
    return cv2.cvtColor(cv2.applyColorMap(np.full((1, 1), level, np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[0, 0]


@pytest.fixture()
def black_image(tmp_path):
    path = tmp_path / "black.png"
    Image.new("RGB", (60, 40)).save(path)
    return path


def test_fixed_scale_puts_the_threshold_mid_scale():
    values = np.array([[0.0, 0.3, 0.6], [0.9, 1.2, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(visualize.colour_scale(values, "fixed", 0.6),
                               [[0.0, 0.25, 0.5], [0.75, 1.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(visualize.colour_scale(values, "per_image"), (values - 0) / 5.0, atol=1e-7)
    with pytest.raises(ValueError):
        visualize.colour_scale(values, "fixed", None)
    with pytest.raises(ValueError):
        visualize.colour_scale(values, "fixed", 0.0)


def test_overlay_colours_follow_the_scale(black_image):
    calm = np.full((30, 30), 0.2, dtype=np.float32)
    # Per image, a constant map is the bottom of JET; on the fixed scale, a map at the threshold is mid-scale.
    per_image = visualize.overlay(black_image, calm)
    at_threshold = visualize.overlay(black_image, calm, scale="fixed", pixel_threshold=0.2)
    far_below = visualize.overlay(black_image, calm, scale="fixed", pixel_threshold=10.0)
    assert per_image.shape == (30, 30, 3)
    np.testing.assert_array_equal(per_image[0, 0], (0.5 * jet(0)).astype(np.uint8))
    np.testing.assert_array_equal(at_threshold[5, 5], (0.5 * jet(127)).astype(np.uint8))
    np.testing.assert_array_equal(far_below[5, 5], (0.5 * jet(int(0.2 / 20 * 255))).astype(np.uint8))  # calm: JET 2


def test_resize_and_mask_at_the_image_size():
    rng = np.random.default_rng(0)
    anomaly_map = rng.random((8, 8), dtype=np.float32)
    by_hand = np.asarray(Image.fromarray(anomaly_map).resize((12, 6), Image.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(visualize.resize_map(anomaly_map, (12, 6)), by_hand)
    np.testing.assert_array_equal(visualize.resize_map(anomaly_map, (8, 8)), anomaly_map)
    mask = visualize.defect_mask(anomaly_map, 0.5, (12, 6))
    assert mask.shape == (6, 12) and mask.dtype == bool
    np.testing.assert_array_equal(mask, by_hand >= np.float32(0.5))


def test_contours_of_the_mask_on_the_overlay(black_image):
    mask = np.zeros((40, 60), dtype=bool)  # image-sized (height 40, width 60); overlay side 30
    mask[10:30, 15:45] = True
    anomaly_map = np.zeros((30, 30), dtype=np.float32)
    drawn = visualize.overlay(black_image, anomaly_map, mask=mask)
    white = np.all(drawn == 255, axis=-1)
    # Corners (15, 10) and (44, 29) scale by (0.5, 0.75) about pixel centres to (7, 7) and (22, 22).
    expected = np.zeros((30, 30), dtype=bool)
    expected[7, 7:23] = expected[22, 7:23] = expected[7:23, 7] = expected[7:23, 22] = True
    np.testing.assert_array_equal(white, expected)
    empty = visualize.overlay(black_image, anomaly_map, mask=np.zeros_like(mask))
    np.testing.assert_array_equal(empty, visualize.overlay(black_image, anomaly_map))


def test_saved_mask_and_overlay(black_image, tmp_path):
    mask = np.zeros((40, 60), dtype=bool)
    mask[3:9, 4:20] = True
    written = visualize.save_mask(mask, tmp_path / "sub" / "a.png.mask.png")
    pixels = np.asarray(Image.open(written))
    assert pixels.shape == (40, 60) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.where(mask, 255, 0))
    # test.py passes a path without suffix; the overlay gets '.png'.
    overlay = visualize.save_overlay(black_image, np.zeros((30, 30), np.float32), tmp_path / "imgs" / "000")
    assert overlay == tmp_path / "imgs" / "000.png" and Image.open(overlay).size == (30, 30)
