"""visualize.py: min-max normalisation, the JET overlay on hand-made maps, and the PNG it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.visualize import min_max_normalize, overlay, save_overlay

S = 20
COLOUR = (200, 40, 10)
LEVELS = (0, 63, 127, 191, 255)  # JET lookup indices of the five bands of ``band_map``


def jet(x: np.ndarray) -> np.ndarray:
    """The JET colour map written out (RGB in 0..255): r, g, b = clip(1.5 - |4x - 3|, |4x - 2|, |4x - 1|).

    OpenCV's COLORMAP_JET is a 256-entry table of this curve (entries within 0.5 of it); its end
    points are dark blue and dark red.
    """
    x = np.asarray(x, dtype=np.float64)[..., None]
    centres = np.array([3.0, 2.0, 1.0])
    return np.clip(1.5 - np.abs(4 * x - centres), 0.0, 1.0) * 255


@pytest.fixture()
def solid_image(tmp_path: Path) -> Path:
    """An S x S PNG of one colour, so every pixel of the overlay blends that colour."""
    path = tmp_path / "solid.png"
    Image.new("RGB", (S, S), COLOUR).save(path)
    return path


def band_map() -> np.ndarray:
    """An S x S map of five vertical bands (4 columns each) whose normalised values are LEVELS / 255."""
    columns = np.repeat(np.array(LEVELS, dtype=np.float64), S // len(LEVELS))
    # Offset and scale are normalised away; L / 4 - 10 is exact in float32, so the normalised values
    # times 255 are the integers LEVELS again.
    return (np.tile(columns, (S, 1)) / 4 - 10).astype(np.float32)


def test_min_max_normalize_hand_computed() -> None:
    values = np.array([[2, 4], [6, 10]])
    got = min_max_normalize(values)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(values, [[2, 4], [6, 10]])  # the input is left alone
    np.testing.assert_allclose(min_max_normalize(np.array([-3.0, -1.0, 1.0], np.float32)), [0.0, 0.5, 1.0])


def test_min_max_normalize_constant_is_zeros() -> None:
    got = min_max_normalize(np.full((3, 4), 7.5, np.float32))
    assert got.shape == (3, 4)
    np.testing.assert_array_equal(got, np.zeros((3, 4)))


def test_overlay_shape_dtype_and_jet_colours(solid_image: Path) -> None:
    """Each band is the image colour blended half and half with JET at the band's level."""
    got = overlay(solid_image, band_map())
    assert got.shape == (S, S, 3) and got.dtype == np.uint8
    width = S // len(LEVELS)
    for band, level in enumerate(LEVELS):
        pixels = got[:, band * width : (band + 1) * width].reshape(-1, 3)
        assert (pixels == pixels[0]).all(), band  # one colour per band
        expected = 0.5 * np.array(COLOUR) + 0.5 * jet(level / 255)
        assert np.abs(pixels[0].astype(int) - expected).max() <= 1, (band, pixels[0], expected)  # table, truncation
    # The end points by hand: JET(0) = (0, 0, 128), JET(1) = (128, 0, 0); the blend is truncated.
    assert got[0, 0].tolist() == [100, 20, 69]
    assert got[0, -1].tolist() == [164, 20, 5]
    assert got[0, 2 * width, 1] > 140  # the middle band is JET's green (255) blended with 40


def test_overlay_alpha_weights_image_against_heat(solid_image: Path) -> None:
    amap = band_map()
    np.testing.assert_array_equal(overlay(solid_image, amap, alpha=1.0), np.broadcast_to(COLOUR, (S, S, 3)))
    heat = overlay(solid_image, amap, alpha=0.0)
    assert heat[0, 0].tolist() == [0, 0, 128] and heat[0, -1].tolist() == [128, 0, 0]


def test_overlay_of_constant_map_is_the_lowest_colour(solid_image: Path) -> None:
    got = overlay(solid_image, np.full((S, S), 0.4, np.float32))
    np.testing.assert_array_equal(got, np.broadcast_to([100, 20, 69], (S, S, 3)))


def test_save_overlay_writes_a_readable_png_of_the_image_size(solid_image: Path, tmp_path: Path) -> None:
    amap = band_map()
    written = save_overlay(solid_image, amap, tmp_path / "out" / "solid")
    assert written == tmp_path / "out" / "solid.png"
    with Image.open(written) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (S, S)
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, overlay(solid_image, amap))  # lossless, and RGB (not BGR) order
    assert pixels[0, 0].tolist() == [100, 20, 69]
    assert save_overlay(solid_image, amap, tmp_path / "out" / "other.jpg") == tmp_path / "out" / "other.png"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other.png", "solid.png"]  # no temporary files
