"""The high-resolution synthetic set: large images, defects 10-30 pixels across, exact masks."""

import json

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline import synthetic


def test_highres_defects_are_small_and_masks_exact(tmp_path):
    root = tmp_path / "hr"
    synthetic.make_highres_like(root, n_train=1, n_test_good=1, n_test_defect=8, image_size=(300, 260), seed=3)
    meta = json.loads((root / "meta.json").read_text())
    items = meta["test"]["fabric"]
    assert sum(item["anomaly"] for item in items) == 8 and len(meta["train"]["fabric"]) == 1
    good = np.asarray(Image.open(root / "fabric" / "test" / "good" / "000.png"), np.int64)
    for item in items:
        with Image.open(root / item["img_path"]) as image:
            assert image.size == (300, 260)
        if not item["anomaly"]:
            continue
        mask = np.asarray(Image.open(root / item["mask_path"])) > 0
        labels, count = ndimage.label(mask)
        assert count == 1, item["mask_path"]  # one defect per image
        rows, columns = np.nonzero(mask)
        extent = max(rows.max() - rows.min(), columns.max() - columns.min()) + 1
        assert 9 <= extent <= 33, (item["mask_path"], extent)  # 10-30 px across (+ a scratch's width, rasterised)
        image = np.asarray(Image.open(root / item["img_path"]), np.int64)
        # Outside the mask the image is a normal texture (values within the texture's range).
        assert image[~mask].min() >= good.min() - 1 and image[~mask].max() <= good.max() + 1


def test_highres_command_line(tmp_path, capsys):
    assert synthetic.main(["--layout", "highres", "--root", str(tmp_path / "hr"), "--size", "200", "--n-train", "0",
                           "--n-test-good", "1", "--n-test-defect", "1"]) == 0
    with Image.open(tmp_path / "hr" / "fabric" / "test" / "scratch" / "000.png") as image:
        assert image.size == (200, 200)


def test_other_layouts_unchanged_by_the_footprint_argument(tmp_path):
    """add_defect without a footprint draws as before: same seed, same files (the default shapes' sizes)."""
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    image = np.full((64, 64, 3), 120, np.uint8)
    a = synthetic.add_defect(image, "blob", rng_a)
    b = synthetic.add_defect(image, "blob", rng_b, None)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.count_nonzero(a[1]) > 30  # sized to the image, not a small defect
