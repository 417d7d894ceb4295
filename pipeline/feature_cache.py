"""Frozen image features for training, computed once and reused by every epoch (and by later runs).

The image tower is frozen and training has no augmentation or dropout (method §2, §6), so an image's
embedding and patch tokens are the same in every epoch. :class:`FeatureCache` holds them per
dataset index, together with the ground-truth mask (uint8) and label of each image:

- in memory when the whole cache fits ``--cache_memory_gb``;
- else (or with ``--keep_cache``) in float32 ``.npy`` memory maps under ``--cache_dir``, reserved
  on disk up front (``posix_fallocate``) so a full disk fails at once with a clear line instead of
  killing the run later.

A disk cache is described by ``cache.json``, written last and atomically: a folder without it (a
run killed while caching) is never used. A later run reuses a kept cache only when the
:func:`cache_key` it was made with is the same (backbone SHA-256, image size, features list,
``meta.json`` SHA-256, the size and modification time of every image and mask it holds, DPAM
layer, arithmetic mode, format); otherwise it says why and rebuilds. A cache made before a field
was added lacks it, so it differs and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.pretrained import backbone_sha256, sha256_of
from pipeline.atomic import atomic_write_text, reserve_blocks

CACHE_FORMAT = 1
MANIFEST = "cache.json"
MARKER = ".anomalyclip_cache"  # written before our files: only a folder that has it (or our manifest) is cleaned
_FIXED_FILES = ("embeddings.npy", "masks.npy", "labels.npy")
_GB = 1024**3


def cache_key(backbone: str, data_root: str | os.PathLike, image_size: int, features_list: Sequence[int],
              dpam_layer: int, reference_arithmetic: bool, files: Iterable[str | os.PathLike]) -> dict[str, object]:
    """What a cache's contents depend on; a cache is reused only when every field is equal.

    Args:
        files: The images and masks the cached items are read from
            (:meth:`dataset.AnomalyDataset.read_files`): an image replaced in place under the same
            name changes :func:`files_digest`, where ``meta.json`` stays the same.
    """
    meta = Path(data_root) / "meta.json"
    return {
        "format": CACHE_FORMAT,
        "backbone_sha256": backbone_sha256(backbone),
        "meta_sha256": sha256_of(meta),
        "files_sha256": files_digest(files),
        "data_root": str(Path(data_root).resolve()),
        "image_size": int(image_size),
        "features_list": [int(layer) for layer in features_list],
        "dpam_layer": int(dpam_layer),
        "reference_arithmetic": bool(reference_arithmetic),
    }


def files_digest(files: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the sorted ``(absolute path, size, modification time in ns)`` of ``files``.

    The files are stat'ed, not read: hashing the contents of 10k images (several GB) would cost about
    as much as encoding them again, which is what the cache saves, while 10k ``stat`` calls take a
    fraction of a second. Replacing a file in place changes its modification time (and mostly its
    size), which is what this catches. The digest keeps ``cache.json`` small whatever the dataset.
    """
    entries = []
    for path in files:
        info = os.stat(path)
        entries.append((os.path.abspath(path), info.st_size, info.st_mtime_ns))
    digest = hashlib.sha256()
    for path, size, mtime_ns in sorted(entries):
        digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheShapes:
    """Array shapes of a cache of ``n_images`` images.

    Attributes:
        n_images: Images in the dataset (the cache is indexed by dataset index).
        embed_dim: Width of the image embedding.
        token_shapes: ``(tokens, width)`` of the patch tokens of each layer of ``features_list``.
        image_size: Side of the masks.
    """

    n_images: int
    embed_dim: int
    token_shapes: tuple[tuple[int, int], ...]
    image_size: int

    def nbytes(self) -> int:
        tokens = sum(t * w for t, w in self.token_shapes)
        return self.n_images * (4 * (self.embed_dim + tokens) + self.image_size**2 + 8)

    def to_json(self) -> dict[str, object]:
        return {"n_images": self.n_images, "embed_dim": self.embed_dim,
                "token_shapes": [list(shape) for shape in self.token_shapes], "image_size": self.image_size}

    @classmethod
    def from_json(cls, value: dict) -> CacheShapes:
        return cls(int(value["n_images"]), int(value["embed_dim"]),
                   tuple((int(t), int(w)) for t, w in value["token_shapes"]), int(value["image_size"]))


def _token_file(position: int) -> str:
    return f"tokens_{position}.npy"


def _file_names(shapes: CacheShapes) -> list[str]:
    return [*_FIXED_FILES, *(_token_file(i) for i in range(len(shapes.token_shapes)))]


def _array_specs(shapes: CacheShapes) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    n = shapes.n_images
    specs = [("embeddings.npy", (n, shapes.embed_dim), np.dtype(np.float32)),
             ("masks.npy", (n, shapes.image_size, shapes.image_size), np.dtype(np.uint8)),
             ("labels.npy", (n,), np.dtype(np.int64))]
    specs += [(_token_file(i), (n, t, w), np.dtype(np.float32)) for i, (t, w) in enumerate(shapes.token_shapes)]
    return specs


class FeatureCache:
    """Per-image frozen features, masks and labels, indexed by dataset index.

    Build one with :meth:`in_memory` or :meth:`on_disk`, fill it with :meth:`put`, seal a disk
    cache with :meth:`seal`; :meth:`open` reuses a sealed one.
    """

    def __init__(self, shapes: CacheShapes, arrays: dict[str, np.ndarray], folder: Path | None) -> None:
        self.shapes = shapes
        self.folder = folder
        self.embeddings = arrays["embeddings.npy"]
        self.masks = arrays["masks.npy"]
        self.labels = arrays["labels.npy"]
        self.tokens = [arrays[_token_file(i)] for i in range(len(shapes.token_shapes))]

    @classmethod
    def in_memory(cls, shapes: CacheShapes) -> FeatureCache:
        arrays = {name: np.empty(shape, dtype) for name, shape, dtype in _array_specs(shapes)}
        return cls(shapes, arrays, None)

    @classmethod
    def on_disk(cls, shapes: CacheShapes, folder: Path) -> FeatureCache:
        """New memory-mapped files under ``folder``, their space reserved on disk."""
        _check_free_space(folder, shapes.nbytes())
        (folder / MARKER).write_text("feature cache files of train.py; deleted with them\n", encoding="utf-8")
        arrays = {}
        for name, shape, dtype in _array_specs(shapes):
            array = np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=shape)
            _reserve(folder / name)
            arrays[name] = array
        return cls(shapes, arrays, folder)

    @classmethod
    def open(cls, folder: Path, manifest: dict) -> FeatureCache:
        """A sealed cache, mapped read-only."""
        shapes = CacheShapes.from_json(manifest["shapes"])
        arrays = {}
        for name, shape, dtype in _array_specs(shapes):
            array = np.load(folder / name, mmap_mode="r")
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(f"{folder / name} holds {array.dtype}{array.shape}, expected {dtype}{shape}")
            arrays[name] = array
        return cls(shapes, arrays, folder)

    def put(self, indices: Sequence[int], embedding: np.ndarray, patch_tokens: Sequence[np.ndarray],
            masks: np.ndarray, labels: np.ndarray) -> None:
        """Store one encoded batch (float32 features, uint8 masks, int64 labels) at the dataset ``indices``."""
        rows = np.asarray(indices, dtype=np.int64)
        self.embeddings[rows] = embedding
        for stored, tokens in zip(self.tokens, patch_tokens, strict=True):
            stored[rows] = tokens
        self.masks[rows] = masks
        self.labels[rows] = labels

    def batch(self, indices: Sequence[int], device: torch.device
              ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(image_embedding, patch_tokens, labels, masks)`` of ``indices``, as a training step takes them."""
        rows = np.asarray(indices, dtype=np.int64)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array[rows])).to(device)

        return (tensor(self.embeddings), [tensor(tokens) for tokens in self.tokens], tensor(self.labels),
                tensor(self.masks).float())

    def seal(self, key: dict[str, object]) -> None:
        """Flush a disk cache and write its manifest, which makes it usable by later runs."""
        if self.folder is None:
            return
        for array in (self.embeddings, self.masks, self.labels, *self.tokens):
            array.flush()
        manifest = {"key": key, "shapes": self.shapes.to_json(), "files": _file_names(self.shapes)}
        atomic_write_text(json.dumps(manifest, indent=2) + "\n", self.folder / MANIFEST)


def _check_free_space(folder: Path, needed: int) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise AnomalyCLIPError(f"cannot create the feature cache folder {folder} ({exc.strerror}): "
                               "give a writable --cache_dir") from None
    if free < needed:
        raise AnomalyCLIPError(f"the feature cache needs {format_bytes(needed)} but {folder} has {format_bytes(free)} "
                               "free: give --cache_dir on a larger disk, or --no_cache")


def format_bytes(size: int) -> str:
    """``size`` in the largest binary unit that keeps it at least 1 (``"3.20 MiB"``)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} bytes"


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now, so writing the memory map cannot hit a full disk (SIGBUS)."""
    try:
        reserve_blocks(path)
    except OSError as exc:
        raise AnomalyCLIPError(f"cannot reserve {format_bytes(path.stat().st_size)} for the feature cache in "
                               f"{path.parent} ({exc.strerror}): give --cache_dir on a larger disk, or --no_cache"
                               ) from None


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a sealed cache in ``folder``, or ``None`` (absent or unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and "key" in manifest and "shapes" in manifest else None


def differences(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """Human-readable fields in which two cache keys differ."""
    return [_difference(name, old, new) for name in new if old.get(name) != new.get(name)]


def _difference(name: str, old: dict[str, object], new: dict[str, object]) -> str:
    if name not in old:
        return f"{name} not recorded (a cache of an earlier version)"
    if name == "files_sha256":
        return "files_sha256 changed (an image or mask has another size or modification time, or the files differ)"
    return f"{name} {old[name]!r} -> {new[name]!r}"


def reusable(folder: Path, key: dict[str, object]) -> tuple[FeatureCache | None, str | None]:
    """``(the sealed cache in folder, None)`` if it was made with ``key``, else ``(None, why not)``.

    The reason is ``None`` too when there is simply no cache in ``folder``.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        if (folder / "embeddings.npy").exists():
            return None, f"the feature cache in {folder} is incomplete (no {MANIFEST}: a run stopped while caching)"
        return None, None
    changed = differences(manifest["key"], key)
    if changed:
        return None, f"the feature cache in {folder} was made with other settings ({'; '.join(changed)})"
    try:
        return FeatureCache.open(folder, manifest), None
    except (OSError, ValueError) as exc:
        return None, f"the feature cache in {folder} is unreadable ({exc})"


def _cache_files(folder: Path) -> list[Path]:
    """The array files a cache in ``folder`` can have (whether or not they exist)."""
    return [*(folder / name for name in _FIXED_FILES), *folder.glob("tokens_*.npy")]


def check_folder(folder: Path) -> None:
    """Refuse a cache folder that holds files with our names which this tool did not write (they would be deleted)."""
    if not folder.is_dir():
        return
    present = [path.name for path in _cache_files(folder) if path.exists()]
    if present and not (folder / MARKER).exists() and not (folder / MANIFEST).exists():
        raise AnomalyCLIPError(f"--cache_dir {folder} holds {', '.join(present[:3])} that train.py did not write "
                               f"(no {MARKER} there); choose an empty or new --cache_dir")


def remove(folder: Path) -> None:
    """Delete our cache files in ``folder`` (the manifest first), then the folder if it is empty.

    Raises:
        AnomalyCLIPError: ``folder`` holds files with our names that this tool did not write.
    """
    if not folder.is_dir():
        return
    check_folder(folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    for path in _cache_files(folder):
        path.unlink(missing_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # absent, or holds files that are not ours


def fits_in_memory(shapes: CacheShapes, budget_gb: float) -> bool:
    return shapes.nbytes() <= budget_gb * _GB
