"""Helpers that write small fake dataset trees and remember the meta.json items they expect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16  # images and masks are SIZE x SIZE, so a load at image_size SIZE resizes nothing


class Tree:
    """A fake dataset root: writes files and records the expected meta.json index.

    Every image gets distinct content and every mask a distinct rectangle, so an item paired
    with the wrong file shows up when it is loaded.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.expected: dict[str, dict[str, list[dict]]] = {"train": {}, "test": {}}
        self._count = 0

    def image(self, rel: str, mode: str = "RGB") -> Path:
        """Write a SIZE x SIZE image at ``rel`` (format from the extension)."""
        self._count += 1
        rng = np.random.default_rng(self._count)
        shape = (SIZE, SIZE, 3) if mode == "RGB" else (SIZE, SIZE)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        return self._save(Image.fromarray(array).convert(mode), rel)

    def mask(self, rel: str) -> Path:
        """Write a 0/255 mask at ``rel`` holding a rectangle unique to this tree."""
        self._count += 1
        array = np.zeros((SIZE, SIZE), dtype=np.uint8)
        top, left = self._count % 11, (self._count // 11) % 13
        array[top:top + 5, left:left + 3] = 255
        return self._save(Image.fromarray(array, mode="L"), rel)

    def file(self, rel: str, content: bytes = b"not an image\n") -> Path:
        """Write a non-image (or corrupt) file."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def add(self, split: str, cls: str, img: str, mask: str = "", specie: str = "", anomaly: int = 0,
            write_mask: bool = True, mode: str = "RGB") -> None:
        """Write an image (and its mask) and expect the matching meta.json item."""
        self.image(img, mode)
        if mask and write_mask:
            self.mask(mask)
        self.expected[split].setdefault(cls, []).append(
            {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}
        )

    def _save(self, image: Image.Image, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {"quality": 100} if path.suffix.lower() in (".jpg", ".jpeg") else {}
        image.save(path, **options)
        return path


def mvtec_class(tree: Tree, cls: str, normal: str = "good", mask_suffix: str = "_mask", mask_ext: str = ".png",
                image_ext: str = ".png", train: bool = True, anomalous: dict[str, list[str]] | None = None,
                normals: tuple[str, ...] = ("000", "001")) -> None:
    """Write one class in the MVTec layout; items are added in the expected (sorted) order."""
    anomalous = anomalous if anomalous is not None else {"broken_large": ["000", "001"], "contamination": ["000"]}
    if train:
        for stem in normals:
            tree.add("train", cls, f"{cls}/train/{normal}/{stem}{image_ext}", specie=normal)
    entries = [(t, s, True) for t, stems in anomalous.items() for s in stems] + [(normal, s, False) for s in normals]
    for specie, stem, is_anomalous in sorted(entries):
        img = f"{cls}/test/{specie}/{stem}{image_ext}"
        mask = f"{cls}/ground_truth/{specie}/{stem}{mask_suffix}{mask_ext}" if is_anomalous else ""
        tree.add("test", cls, img, mask, specie, int(is_anomalous))
