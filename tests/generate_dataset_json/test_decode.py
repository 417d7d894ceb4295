"""Every indexed image and mask is fully decoded: files cut short stop indexing with one line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from generate_dataset_json import mvtec
from generate_dataset_json.indexer import MAX_LISTED, index_dataset, unreadable_images
from tests.conftest import REPO_ROOT
from tests.generate_dataset_json.test_errors import index_error
from tests.generate_dataset_json.trees import Tree, mvtec_class


BODY_MARKERS = {".png": b"IDAT", ".jpg": b"\xff\xda"}  # first pixel-data chunk / start of scan


def cut(path: Path) -> None:
    """Cut ``path`` halfway through its pixel data: the header stays valid, the body does not."""
    data = path.read_bytes()
    start = data.index(BODY_MARKERS[path.suffix])
    path.write_bytes(data[: start + (len(data) - start) // 2])


def mvtec_jpeg_and_png(root: Path) -> Tree:
    """An MVTec tree with a PNG class and a JPEG class."""
    tree = Tree(root)
    mvtec_class(tree, "bottle")
    mvtec_class(tree, "carpet", image_ext=".jpg")
    return tree


def run_mvtec(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "generate_dataset_json/mvtec.py"), "--root", str(root)],
                          capture_output=True, text=True, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cut_files_keep_a_valid_header(tmp_path: Path) -> None:
    """The fixture's premise: PIL opens the cut files (header fine) but cannot decode them."""
    from PIL import Image

    mvtec_jpeg_and_png(tmp_path)
    for rel in ("bottle/test/good/000.png", "carpet/test/good/000.jpg"):
        cut(tmp_path / rel)
        with Image.open(tmp_path / rel) as image:
            assert image.size == (16, 16)
    assert unreadable_images(tmp_path, ["bottle/test/good/000.png", "bottle/test/good/001.png",
                                        "carpet/test/good/000.jpg"]) == [
        "bottle/test/good/000.png", "carpet/test/good/000.jpg"]


def test_cli_stops_on_truncated_png_and_jpeg(tmp_path: Path) -> None:
    mvtec_jpeg_and_png(tmp_path)
    cut(tmp_path / "bottle/test/broken_large/001.png")
    cut(tmp_path / "carpet/train/good/000.jpg")
    cut(tmp_path / "bottle/ground_truth/contamination/000_mask.png")
    done = run_mvtec(tmp_path)
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1
    assert ("unreadable image (3): bottle/ground_truth/contamination/000_mask.png, "
            "bottle/test/broken_large/001.png, carpet/train/good/000.jpg. ") in lines[0]
    assert "re-download or re-extract the listed file(s), or delete them" in lines[0]
    assert not (tmp_path / "meta.json").exists()


def test_many_unreadable_files_are_listed_once_and_counted(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    mvtec_class(tree, "bottle", normals=tuple(f"{n:03d}" for n in range(MAX_LISTED + 5)))
    for image in sorted((tmp_path / "bottle/train/good").iterdir()):
        cut(image)
    message = index_error(mvtec.LAYOUT, tmp_path)
    assert f"unreadable image ({MAX_LISTED + 5}): bottle/train/good/000.png" in message
    assert "bottle/train/good/009.png ... and 5 more" in message
    assert message.count("Unreadable images are") == 1


def test_good_tree_indexes_as_before(tmp_path: Path) -> None:
    tree = mvtec_jpeg_and_png(tmp_path)
    done = run_mvtec(tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "meta.json").read_text()
    expected = {"train": {c: tree.expected["train"][c] for c in ("carpet", "bottle")},
                "test": {c: tree.expected["test"][c] for c in ("carpet", "bottle")}}
    assert text == json.dumps(expected, indent=4) + "\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_images_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mvtec_class(Tree(tmp_path), "bottle")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    index_dataset(mvtec.LAYOUT, tmp_path, write=False)
    assert "decoding images" in terminal.getvalue() and "img" in terminal.getvalue()


def test_help_shows_defaults() -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "generate_dataset_json/folder.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "(default: _mask)" in text and "(default: ['good'])" in text
    assert "(default: all, sorted)" in text and "None" not in text


def test_masks_of_another_size_than_their_image_stop_indexing(tmp_path: Path) -> None:
    """A mask must mark its own image's pixels: 16x16 images with a 16x12 and a 32x32 mask are refused."""
    from PIL import Image

    mvtec_class(Tree(tmp_path), "bottle")
    masks = sorted((tmp_path / "bottle/ground_truth").rglob("*_mask.png"))
    Image.new("L", (16, 12), 255).save(masks[0])
    Image.new("L", (32, 32), 255).save(masks[1])
    done = run_mvtec(tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1
    first, second = (mask.relative_to(tmp_path).as_posix() for mask in masks[:2])
    assert (f"mask of another size than its image (2): {first} (16x12) for "
            f"{first.replace('ground_truth', 'test').replace('_mask', '')} (16x16), {second} (32x32) for ") in lines[0]
    assert "re-make them at their image's size" in lines[0]
    assert not (tmp_path / "meta.json").exists()
