"""dump.py: what ``DumpWriter`` writes loads back with numpy as exactly the arrays it was given."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.dump import DumpWriter
from pipeline.evaluation import ImageResult  # what evaluation hands the writer

S = 6


def results(count: int = 5, seed: int = 0) -> list[ImageResult]:
    """Distinct per-image results: random float32 maps, 0/1 masks, mixed labels, non-ASCII paths."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        label = index % 2
        mask = (rng.random((S, S)) < 0.3).astype(np.uint8) * label
        out.append(ImageResult(index=index, img_path=f"bottle/test/typ_{index}/{index:03d}_ü.png", image_file="",
                          cls_name="bottle" if index < 3 else "cable", label=label,
                          score=float(rng.random(dtype=np.float32)), anomaly_map=rng.random((S, S), dtype=np.float32),
                          mask=mask))
    return out


def test_round_trip_in_dataset_order(tmp_path: Path) -> None:
    given = results()
    writer = DumpWriter(tmp_path / "dump.npz", count=len(given), image_size=S)
    for result in reversed(given):  # results arrive in any order; each lands at its index
        writer.add(result)
    path = writer.close()
    writer.discard()
    assert path == tmp_path / "dump.npz"
    with np.load(path, allow_pickle=False) as dump:
        assert sorted(dump.files) == ["cls_names", "img_paths", "labels", "maps", "masks", "scores"]
        assert dump["img_paths"].tolist() == [r.img_path for r in given]
        assert dump["cls_names"].tolist() == ["bottle", "bottle", "bottle", "cable", "cable"]
        assert dump["labels"].dtype == np.int64 and dump["labels"].tolist() == [0, 1, 0, 1, 0]
        assert dump["scores"].dtype == np.float32
        np.testing.assert_array_equal(dump["scores"], np.array([r.score for r in given], np.float32))
        assert dump["maps"].dtype == np.float32 and dump["maps"].shape == (5, S, S)
        np.testing.assert_array_equal(dump["maps"], np.stack([r.anomaly_map for r in given]))
        assert dump["masks"].dtype == np.uint8 and dump["masks"].shape == (5, S, S)
        np.testing.assert_array_equal(dump["masks"], np.stack([r.mask for r in given]))
    assert [p.name for p in tmp_path.iterdir()] == ["dump.npz"]  # spill folder and temporary file gone


def test_suffix_appended_and_members_stored_uncompressed(tmp_path: Path) -> None:
    given = results(2)
    writer = DumpWriter(tmp_path / "sub" / "scores", count=2, image_size=S)
    for result in given:
        writer.add(result)
    path = writer.close()
    writer.discard()
    assert path == tmp_path / "sub" / "scores.npz"
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(archive.namelist()) == ["cls_names.npy", "img_paths.npy", "labels.npy", "maps.npy", "masks.npy",
                                              "scores.npy"]


def test_values_are_cast_to_the_stored_dtypes(tmp_path: Path) -> None:
    """float64 maps are stored as float32 (rounded), boolean masks as 0/1 uint8."""
    rng = np.random.default_rng(1)
    amap = rng.random((S, S)) * 1e3  # float64
    mask = rng.random((S, S)) < 0.5
    writer = DumpWriter(tmp_path / "d.npz", count=1, image_size=S)
    writer.add(ImageResult(0, "a.png", "", "a", 1, 0.25, amap, mask))
    writer.close()
    writer.discard()
    with np.load(tmp_path / "d.npz") as dump:
        np.testing.assert_array_equal(dump["maps"][0], amap.astype(np.float32))
        np.testing.assert_array_equal(dump["masks"][0], mask.astype(np.uint8))
        assert dump["scores"].tolist() == [0.25]


def test_incomplete_dump_is_refused_and_discard_cleans_up(tmp_path: Path) -> None:
    given = results(3)
    writer = DumpWriter(tmp_path / "dump.npz", count=3, image_size=S)
    writer.add(given[0])
    writer.add(given[2])
    with pytest.raises(RuntimeError, match="dump incomplete: 1 images have no result"):
        writer.close()
    assert not (tmp_path / "dump.npz").exists()
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_second_close_replaces_the_first(tmp_path: Path) -> None:
    first, second = results(2, seed=0), results(2, seed=1)
    for given in (first, second):
        writer = DumpWriter(tmp_path / "dump.npz", count=2, image_size=S)
        for result in given:
            writer.add(result)
        writer.close()
        writer.discard()
    with np.load(tmp_path / "dump.npz") as dump:
        np.testing.assert_array_equal(dump["maps"], np.stack([r.anomaly_map for r in second]))
    assert [p.name for p in tmp_path.iterdir()] == ["dump.npz"]
