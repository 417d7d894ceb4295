"""``test.py --dump FILE.npz``: every image's path, class, label, score, map and mask, in dataset order.

The maps of a whole dataset can exceed memory (MVTec AD at 518 px: 1.85 GB), so they are
spilled to temporary ``.npy`` files beside the target while evaluation runs, then streamed into
the ``.npz`` (a zip of ``.npy`` members, readable by ``numpy.load``), which is renamed into
place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.atomic import atomic_write, naming_errors, reserve_blocks


class _Result(Protocol):
    index: int
    img_path: str
    cls_name: str
    label: int
    score: float
    anomaly_map: np.ndarray
    mask: np.ndarray


class DumpWriter:
    """Collects per-image results and writes them as one ``.npz``.

    Args:
        path: Target file (``.npz`` is appended if missing).
        count: Number of images.
        image_size: Side S of the maps and masks.

    The archive holds ``img_paths`` and ``cls_names`` (str), ``labels`` (int64), ``scores``
    (float32, N), ``maps`` (float32, N x S x S) and ``masks`` (uint8, N x S x S).
    """

    def __init__(self, path: str | os.PathLike, count: int, image_size: int) -> None:
        self.path = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
        shape = (count, image_size, image_size)
        try:
            with naming_errors(self.path):  # a full disk or a refused folder names the dump, not its spill files
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._spill = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
                self._maps = np.lib.format.open_memmap(self._spill / "maps.npy", mode="w+", dtype=np.float32,
                                                       shape=shape)
                self._masks = np.lib.format.open_memmap(self._spill / "masks.npy", mode="w+", dtype=np.uint8,
                                                        shape=shape)
                for spill in ("maps.npy", "masks.npy"):  # blocks now: a full disk later would kill the run (SIGBUS)
                    reserve_blocks(self._spill / spill)
        except OSError:
            if hasattr(self, "_spill"):
                shutil.rmtree(self._spill, ignore_errors=True)
            raise
        self._img_paths = [""] * count
        self._cls_names = [""] * count
        self._labels = np.zeros(count, dtype=np.int64)
        self._scores = np.zeros(count, dtype=np.float32)
        self._filled = np.zeros(count, dtype=bool)

    def add(self, result: _Result) -> None:
        """Store one image's result at its dataset index."""
        i = result.index
        self._img_paths[i], self._cls_names[i] = result.img_path, result.cls_name
        self._labels[i], self._scores[i] = result.label, result.score
        self._maps[i], self._masks[i] = result.anomaly_map, result.mask
        self._filled[i] = True

    def close(self) -> Path:
        """Write the ``.npz`` atomically; returns its path."""
        if not self._filled.all():
            raise RuntimeError(f"dump incomplete: {int((~self._filled).sum())} images have no result")
        self._maps.flush()
        self._masks.flush()
        small = {
            "img_paths": np.array(self._img_paths),
            "cls_names": np.array(self._cls_names),
            "labels": self._labels,
            "scores": self._scores,
        }
        atomic_write(self.path, lambda tmp: self._write_npz(tmp, small))
        return self.path

    def _write_npz(self, target: str, small: dict[str, np.ndarray]) -> None:
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in [*small.items(), ("maps", self._maps), ("masks", self._masks)]:
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    def discard(self) -> None:
        """Remove the temporary spill files (after :meth:`close`, or on failure)."""
        for array in (self._maps, self._masks):
            mmap = getattr(array, "_mmap", None)
            if mmap is not None:
                mmap.close()
        for file in self._spill.glob("*"):
            file.unlink()
        self._spill.rmdir()
