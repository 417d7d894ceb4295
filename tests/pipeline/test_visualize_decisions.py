"""visualize.py: the colour scales, defect masks at the image's size and their contours on the overlay.

Expected pixels are written out or computed with plain numpy arithmetic: OpenCV's JET colours
at the levels used (``JET``), the 0.5 blend truncated to uint8, PIL's bilinear resize on maps
whose resized values are worked out by hand.
"""

import numpy as np
import pytest
from PIL import Image

from pipeline import visualize

# RGB of OpenCV's COLORMAP_JET at a few levels (MATLAB's jet: blue from 128 rising 4 a level, then
# green, then red, ending at dark red 128).
JET = {0: (0, 0, 128), 2: (0, 0, 136), 63: (0, 124, 255), 127: (126, 255, 130), 255: (128, 0, 0)}
# A 2 x 2 image with distinct colours, row by row.
TINY_RGB = np.array([[(200, 100, 50), (10, 20, 30)], [(255, 255, 255), (0, 0, 0)]], dtype=np.uint8)


def blend(image: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``uint8(0.5 image + 0.5 JET(level))``, truncated (the original's blend), pixel by pixel."""
    heat = np.array([[JET[int(level)] for level in row] for row in levels], dtype=np.float64)
    return np.floor(0.5 * image.astype(np.float64) + 0.5 * heat).astype(np.uint8)


@pytest.fixture()
def black_image(tmp_path):
    path = tmp_path / "black.png"
    Image.new("RGB", (60, 40)).save(path)
    return path


@pytest.fixture()
def tiny_image(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(TINY_RGB).save(path)
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


def test_overlay_pixels_by_hand(tiny_image):
    anomaly_map = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    # per image: (v - 0) / 1 -> levels uint8(255 v) = 0, 63, 127, 255
    np.testing.assert_array_equal(visualize.overlay(tiny_image, anomaly_map),
                                  blend(TINY_RGB, np.array([[0, 63], [127, 255]])))
    assert visualize.overlay(tiny_image, anomaly_map)[0, 0].tolist() == [100, 50, 89]  # (200, 100, 50) on (0, 0, 128)
    # fixed, threshold 0.25: clip(v / 0.5, 0, 1) -> 0, 0.5, 1, 1 -> levels 0, 127, 255, 255
    np.testing.assert_array_equal(visualize.overlay(tiny_image, anomaly_map, scale="fixed", pixel_threshold=0.25),
                                  blend(TINY_RGB, np.array([[0, 127], [255, 255]])))


def test_overlay_colours_follow_the_scale(black_image):
    calm = np.full((30, 30), 0.2, dtype=np.float32)
    # Per image, a constant map is the bottom of JET; on the fixed scale, a map at the threshold is mid-scale.
    per_image = visualize.overlay(black_image, calm)
    at_threshold = visualize.overlay(black_image, calm, scale="fixed", pixel_threshold=0.2)
    far_below = visualize.overlay(black_image, calm, scale="fixed", pixel_threshold=10.0)
    assert per_image.shape == (30, 30, 3)
    assert np.all(per_image == (0, 0, 64))  # half of JET 0 (0, 0, 128) on black
    assert np.all(at_threshold == (63, 127, 65))  # half of JET 127 (126, 255, 130)
    assert np.all(far_below == (0, 0, 68))  # 0.2 / 20 * 255 = 2.55 -> JET 2 (0, 0, 136)


def test_resize_and_mask_at_the_image_size():
    # Bilinear with pixel centres: 2 columns -> 4 sample at x = -0.25, 0.25, 0.75, 1.25 (edges clamped).
    columns = np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(visualize.resize_map(columns, (4, 2)), [[0, 0.25, 0.75, 1]] * 2)
    # 2 x 2 -> 3 x 3 samples at -1/6, 1/2, 7/6 on both axes: the corners, and the midpoints between them.
    square = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(visualize.resize_map(square, (3, 3)), [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]])
    np.testing.assert_array_equal(visualize.resize_map(square, (2, 2)), square)
    mask = visualize.defect_mask(columns, 0.5, (4, 2))
    assert mask.shape == (2, 4) and mask.dtype == bool
    np.testing.assert_array_equal(mask, [[False, False, True, True]] * 2)
    # A value equal to the threshold is a defect (>=).
    np.testing.assert_array_equal(visualize.defect_mask(columns, 0.25, (4, 2)), [[False, True, True, True]] * 2)
    # (width, height) order: 3 wide, 1 high, from the square map's rows averaged.
    np.testing.assert_array_equal(visualize.defect_mask(square, 1.5, (3, 1)), [[False, True, True]])
    np.testing.assert_array_equal(visualize.resize_map(square, (3, 1)), [[1, 1.5, 2]])


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
    np.testing.assert_array_equal(drawn[~expected], np.broadcast_to((0, 0, 64), (int((~expected).sum()), 3)))
    empty = visualize.overlay(black_image, anomaly_map, mask=np.zeros_like(mask))
    assert np.all(empty == (0, 0, 64))  # no contour: half of JET 0 everywhere


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
    assert np.all(np.asarray(Image.open(overlay).convert("RGB")) == (0, 0, 64))  # RGB order kept in the PNG
