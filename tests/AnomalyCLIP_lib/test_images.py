"""One way to fail on an unreadable image: ``images.read_image`` and its ``UnreadableImageError``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from AnomalyCLIP_lib.errors import AnomalyCLIPError, one_line
from AnomalyCLIP_lib.images import UnreadableImageError, load_mask, read_image, unreadable_headers
from generate_dataset_json.indexer import decode

REPLACE = "replace it, or remove it (and re-run the dataset indexer if a meta.json lists it)"


def _png(path: Path, size: int = 32) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _cut(path: Path) -> Path:
    """Cut inside the pixel data: the header stays readable."""
    data = path.read_bytes()
    start = data.index(b"IDAT")
    path.write_bytes(data[: start + (len(data) - start) // 2])
    return path


def test_a_cut_file_passes_the_header_check_and_fails_decoding(tmp_path):
    cut = _cut(_png(tmp_path / "cut.png"))
    assert read_image(cut, decode=False).size == (32, 32)
    assert unreadable_headers([cut]) == []
    with pytest.raises(UnreadableImageError) as caught:
        read_image(cut)
    error = caught.value
    assert isinstance(error, AnomalyCLIPError) and error.path == cut and not error.missing
    assert str(error) == (f"cannot read image file {cut} ({error.reason}); the file is corrupt or not an image: "
                          + REPLACE)
    assert error.reason.startswith("image file is truncated")
    assert decode(cut) == (None, error.reason)  # the indexer's check reads it the same way


def test_missing_and_non_image_files(tmp_path):
    missing, text = tmp_path / "missing.png", tmp_path / "text.png"
    text.write_text("<html>not found</html>")
    with pytest.raises(UnreadableImageError, match=rf"^mask file {missing} does not exist; restore it"):
        load_mask(missing)
    assert decode(missing) == (None, None)  # the layouts report missing files themselves
    assert [path for path, _ in unreadable_headers([missing, text])] == [missing, text]
    with pytest.raises(UnreadableImageError) as caught:
        read_image(text, "mask file")
    assert str(caught.value).startswith(f"cannot read mask file {text} (cannot identify image file")


def test_too_many_pixels_is_its_own_line_and_not_a_bad_header(tmp_path, monkeypatch):
    big = _png(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is over twice that: Pillow refuses it
    assert unreadable_headers([big]) == []  # decoding refuses it with its own line
    with pytest.raises(UnreadableImageError, match=rf"^cannot read image file {big}: its header claims more pixels"):
        read_image(big)
    assert decode(big)[0] is None


def test_the_error_crosses_process_boundaries(tmp_path):
    """A DataLoader worker re-raises ``type(error)(message)`` in the main process, which prints its last line."""
    with pytest.raises(UnreadableImageError) as caught:
        read_image(tmp_path / "absent.png")
    error = caught.value
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.missing) == (str(error), error.path, True)
    wrapped = (f"Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
               f"last):\n  File \"x.py\", line 1\nAnomalyCLIP_lib.images.UnreadableImageError: {error}\n")
    assert one_line(type(error)(wrapped)) == str(error)


def test_a_readable_file_is_returned_decoded_with_its_file_closed(tmp_path):
    path = _png(tmp_path / "ok.png")
    image = read_image(path)
    assert image.size == (32, 32) and image.mode == "RGB"
    path.unlink()  # the pixels were decoded before the file closed
    assert np.array_equal(np.asarray(image), np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_a_large_image_is_one_warning_line_naming_it(tmp_path):
    """Pillow's DecompressionBombWarning (two raw lines, no file name) becomes one line naming the file."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    path = tmp_path / "big.png"
    Image.new("RGB", (13, 12)).save(path)  # 156 pixels, over a limit of 100 and under twice it
    code = ("import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 100\n"
            "from AnomalyCLIP_lib.images import load_image, unreadable_headers\n"
            "unreadable_headers([sys.argv[1]]); load_image(sys.argv[1])")
    completed = subprocess.run([sys.executable, "-W", "default", "-c", code, str(path)], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.splitlines() == [
        f"warning: image file {path} has 156 pixels, over Pillow's decompression-bomb limit of 100; decoded anyway: "
        "check it is the image you meant"]
