"""The dataset of training and evaluation: items of a ``meta.json`` (method §8), preprocessed (method §2).

Typical use::

    from dataset import AnomalyDataset
    data = AnomalyDataset("data/mvtec", image_size=518, split="test")
    item = data[0]   # {"img", "img_mask", "anomaly", "cls_name", "img_path", "cls_id"}
    data.availability().metrics   # "image-pixel-level", "image-level" or "pixel-level"

Class names and their order come from ``meta.json`` (optionally filtered); nothing is
hard-coded per dataset. A ``meta.json`` written by the original indexers also loads: split keys
are matched case-insensitively (DAGM's ``Train``/``Test``), and a path that does not exist as
written (an absolute path from another machine, or a path carrying the old root's name) is
looked up under ``root`` by its longest trailing part that exists there and still starts at the
item's class folder (see :func:`resolve_path`).

Masks: a normal item always gets an all-zero mask; an anomalous item with ``mask_path`` ``""``
(or, as in the original, a path that is a folder) gets an all-zero mask; a mask file that does
not exist, or whose size is not its image's, raises :class:`AnomalyCLIPError` when the item is
loaded (the original resized such a mask onto the image, shifting the defect it marks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.transform import binarize_mask, image_transform, load_image, load_mask, mask_transform
from generate_dataset_json.schema import (INTEGRITY_FIXES, ITEM_KEYS, OUTSIDE_ROOT, duplicate_entries,
                                          escapes_root, is_absolute)
from pipeline import strict_json

INDEX_FIX = ("index the dataset first: python generate_dataset_json/<dataset>.py --root {root} "
             "(generate_dataset_json/folder.py for your own images)")


@dataclass(frozen=True)
class Availability:
    """What a set of items allows to measure.

    Attributes:
        n_normal: Normal images.
        n_anomalous: Anomalous images.
        n_masked: Anomalous images with a mask file.
    """

    n_normal: int
    n_anomalous: int
    n_masked: int

    @property
    def image_level(self) -> bool:
        """Image AUROC/AP need both normal and anomalous images."""
        return self.n_normal > 0 and self.n_anomalous > 0

    @property
    def pixel_level(self) -> bool:
        """Pixel AUROC/AUPRO need at least one mask."""
        return self.n_masked > 0

    @property
    def metrics(self) -> str:
        """The ``--metrics`` value of test.py that fits: ``image-pixel-level``, ``image-level``,
        ``pixel-level``, or ``none`` when neither applies."""
        if self.image_level and self.pixel_level:
            return "image-pixel-level"
        if self.image_level:
            return "image-level"
        return "pixel-level" if self.pixel_level else "none"


def check_dataset_root(root: str | Path) -> None:
    """A dataset root is a folder that exists (it holds meta.json, or its indexer writes one there)."""
    root = Path(root)
    if root.is_file():
        fix = f"give the folder that holds it, {root.parent}" if root.name == "meta.json" else \
            "give the dataset's root folder (where its meta.json is)"
        raise AnomalyCLIPError(f"dataset root {root} is a file, not a folder: {fix}")
    if not root.exists():
        raise AnomalyCLIPError(f"dataset root {root} does not exist: check the path (the folder that holds the "
                               "dataset and its meta.json)")


def read_meta(root: str | Path) -> dict[str, Any]:
    """Load ``root/meta.json``, or raise an error that says how to create it."""
    check_dataset_root(root)
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise AnomalyCLIPError(f"{path} does not exist; {INDEX_FIX.format(root=root)}")
    fix = INDEX_FIX.format(root=root)
    # Permissions or a failing disk get their own line: the file is fine, re-creating it would not help.
    meta = strict_json.read_file(
        path, twice=lambda key: (f"{path} lists {key!r} twice in one object, and only the last would be read "
                                 f"(the first silently dropped): merge them, or re-create it: {fix}"),
        unreadable=lambda error: f"cannot read {path} ({error}); re-create it: {fix}")
    if not isinstance(meta, dict):
        raise AnomalyCLIPError(
            f"{path} is not a meta.json index (a JSON object of splits); {INDEX_FIX.format(root=root)}"
        )
    return meta


def resolve_path(root: str, path: str, cls_name: str) -> str:
    """``path`` of meta.json as a file name to open: ``root`` joined with it, re-rooted if needed.

    When ``os.path.join(root, path)`` does not exist (an absolute path written on another
    machine, or one carrying the old root's name), the longest trailing part of ``path`` that
    exists under ``root`` is used, but never one shorter than the item's class folder: the part
    must begin at or before the last ``cls_name`` component of ``path`` (or just after it when
    ``root`` itself is named ``cls_name``, a one-class dataset indexed from its class folder), so
    that ``/old/machine/carpet/test/good/000.png`` never binds to an unrelated ``root/000.png``.

    The layouts whose class is not a folder of their paths (CVC-ColonDB, CVC-ClinicDB, Kvasir,
    TN3K and EndoTect: class ``colon``/``thyroid``, paths ``images/…``, ``masks/…``; COVID-19:
    ``chest``, paths ``<type>/…``; Br35H and BrainMRI: ``brain``, paths ``{no,yes}/…`` and
    ``brain_tumor_dataset/{no,yes}/…``) keep at least the file's own folder, where their paths as
    written relative to the root begin (or which they pass through); no layout lists a file lying
    directly in the root. When no part qualifies, the joined path is returned: the file is
    reported missing. An absolute path that exists outside ``root`` is re-rooted too (else it
    is returned and refused as outside the root); a relative path that leaves the root
    (``../x.png``) is never re-rooted.
    """
    joined = os.path.join(root, path)
    if escapes_root(path) and not is_absolute(path):
        return joined  # relative to the root by definition: never re-rooted (refused as outside the root)
    if os.path.exists(joined) and (not is_absolute(path) or inside_root(root, joined)):
        return joined
    parts = [p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("/", "")]
    for start in _reroot_starts(root, parts, cls_name):
        candidate = os.path.join(root, *parts[start:])
        if os.path.exists(candidate):
            return candidate
    return joined


def inside_root(root: str, path: str) -> bool:
    """Whether ``path`` lies under ``root``, by name (a dataset may hold links to folders elsewhere)."""
    root_abs = os.path.abspath(root)
    return os.path.commonpath([root_abs, os.path.abspath(path)]) == root_abs


def _reroot_starts(root: str, parts: list[str], cls_name: str) -> range:
    """Where a re-rooted ``parts`` may begin, longest first (see :func:`resolve_path`)."""
    if cls_name not in parts:
        return range(1, len(parts) - 1)  # the file and at least its folder
    last = len(parts) - 1 - parts[::-1].index(cls_name)
    root_is_class = Path(root).resolve().name == cls_name
    return range(1, min(last + 2 if root_is_class else last + 1, len(parts)))


class AnomalyDataset(Dataset):
    """Items of one split of a dataset indexed by ``generate_dataset_json``.

    Args:
        root: Dataset root holding ``meta.json``.
        image_size: S; the default transforms produce (3, S, S) images and (1, S, S) masks.
        split: ``"test"`` (zero-shot evaluation, and training on an auxiliary dataset) or
            ``"train"``.
        class_names: Keep only these classes (kept in meta.json order); ``None`` keeps all.
        exclude: meta.json paths (``img_path``) of items to leave out (few-shot references drawn
            from the test split are never evaluated).
        transform: PIL image -> tensor; default :func:`AnomalyCLIP_lib.transform.image_transform`.
        target_transform: 0/255 ``'L'`` mask -> tensor before the threshold; default
            :func:`AnomalyCLIP_lib.transform.mask_transform`. Its output is always thresholded
            at 0.5.

    Attributes:
        class_names: Classes in meta.json order, filtered.
        items: The meta.json entries of those classes, in meta.json order.

    Each item is a dict: ``img`` float32 (3, S, S); ``img_mask`` float32 (1, S, S) of exact
    0/1 values; ``anomaly`` int; ``cls_name`` str; ``img_path`` str (``root`` joined with the
    entry's path); ``cls_id`` int (index of the class in ``class_names``); ``index`` int (the item's own
    index, so that results stay keyed by item whatever sampler or subset batches them).

    Raises:
        AnomalyCLIPError: meta.json is missing or malformed, lacks the split, or lacks a class
            of ``class_names``.
    """

    def __init__(self, root: str, image_size: int = 518, split: str = "test", class_names: list[str] | None = None,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 target_transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 exclude: Collection[str] = ()) -> None:
        self.root = str(root)
        self.image_size = image_size
        self.split = split
        self.transform = transform if transform is not None else image_transform(image_size)
        self.target_transform = target_transform if target_transform is not None else mask_transform(image_size)
        classes = self._split_classes(read_meta(self.root), split)
        self.class_names = self._filtered(list(classes), class_names)
        self.items: list[dict[str, Any]] = []
        self._cls_ids: list[int] = []
        for cls_id, cls_name in enumerate(self.class_names):
            if not isinstance(classes[cls_name], list):
                self._malformed(f"its class '{cls_name}' is not a list of entries")
            for entry in classes[cls_name]:
                item = self._checked(entry, cls_name)
                if item["img_path"] in exclude:
                    continue
                self.items.append(item)
                self._cls_ids.append(cls_id)
        self._files = [self._resolve(item) for item in self.items]
        self._check_files_exist()
        self._check_integrity()

    def _check_files_exist(self, shown: int = 5) -> None:
        """Fail before any model loads when files of the index are gone or empty, naming all of them at once.

        A file cut short but not empty is found when it is decoded (one line naming it).
        """
        paths = self.read_files()
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise AnomalyCLIPError(f"{self._meta_path()} lists {len(missing)} file(s) that do not exist: "
                                   f"{self._listed(missing, shown)}; restore them, or re-create the index: "
                                   f"{INDEX_FIX.format(root=self.root)}")
        empty = [path for path in paths if os.path.getsize(path) == 0]
        if empty:
            raise AnomalyCLIPError(f"{self._meta_path()} lists {len(empty)} empty file(s): "
                                   f"{self._listed(empty, shown)}; replace them (re-download or re-extract), "
                                   "or remove them and re-create the index: "
                                   f"{INDEX_FIX.format(root=self.root)}")

    def _check_integrity(self, shown: int = 5) -> None:
        """Refuse what would change the results silently: a file outside the root, an image listed twice
        (counted twice) or as both normal and anomalous; every case at once, a few entries each, then a count."""
        outside = [self._shown_path(path) for path in self.read_files() if not inside_root(self.root, path)]
        found = {OUTSIDE_ROOT: outside} if outside else {}
        entries = [(os.path.normcase(os.path.abspath(image)), f"{self._shown_path(image)} ({item['cls_name']})",
                    item["anomaly"]) for item, (image, _) in zip(self.items, self._files)]
        found.update(duplicate_entries(entries))
        if not found:
            return
        parts = [f"{kind} ({len(paths)}): {', '.join(paths[:shown])}"
                 + (f" and {len(paths) - shown} more" if len(paths) > shown else "") for kind, paths in found.items()]
        fixes = "; ".join(INTEGRITY_FIXES[kind] for kind in found)
        raise AnomalyCLIPError(f"{self._meta_path()} would give wrong results: {'; '.join(parts)}. {fixes}; "
                               f"fix it, or re-create it: {INDEX_FIX.format(root=self.root)}")

    def read_files(self) -> list[str]:
        """The files the items are read from, in item order: each image, then its mask if it is anomalous."""
        wanted = [(image, mask if item["anomaly"] else "") for item, (image, mask) in zip(self.items, self._files)]
        return [path for image, mask in wanted for path in (image, mask) if path]

    def _listed(self, paths: list[str], shown: int) -> str:
        listed = ", ".join(self._shown_path(path) for path in paths[:shown])
        return listed + (f" and {len(paths) - shown} more" if len(paths) > shown else "")

    def _shown_path(self, path: str) -> str:
        """``path`` relative to the root, or as it is when it lies outside (an absolute path of meta.json)."""
        relative = os.path.relpath(path, self.root)
        outside = relative == os.pardir or relative.startswith(os.pardir + os.sep)
        return os.path.normpath(path) if outside else relative

    def _meta_path(self) -> str:
        return os.path.join(self.root, "meta.json")

    def _split_classes(self, meta: dict[str, Any], split: str) -> dict[str, list[dict[str, Any]]]:
        matching = [k for k in meta if isinstance(k, str) and k.lower() == split.lower()]
        if len(matching) > 1:  # "test" and "Test": one would be read and the other ignored
            raise AnomalyCLIPError(f"{self._meta_path()} has {len(matching)} '{split}' splits "
                                   f"({', '.join(matching)}), and only one would be read: merge them, or re-create "
                                   f"it: {INDEX_FIX.format(root=self.root)}")
        key = matching[0] if matching else None
        if key is None:
            raise AnomalyCLIPError(
                f"{self._meta_path()} has no '{split}' split (it has: {', '.join(map(str, meta)) or 'nothing'}); "
                f"use one of those, or re-create it: {INDEX_FIX.format(root=self.root)}"
            )
        classes = meta[key]
        if not isinstance(classes, dict) or not classes:
            raise AnomalyCLIPError(
                f"{self._meta_path()} lists no classes in its '{split}' split (the dataset has no {split} "
                "images); use split 'test' or index a dataset that has them"
            )
        return classes

    def _filtered(self, available: list[str], wanted: list[str] | None) -> list[str]:
        if wanted is None:
            return available
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise AnomalyCLIPError(
                f"class(es) {', '.join(unknown)} not in the '{self.split}' split of {self._meta_path()} "
                f"(it has: {', '.join(available)}); fix --classes"
            )
        return [c for c in available if c in wanted]

    def _checked(self, entry: Any, cls_name: str) -> dict[str, Any]:
        """``entry`` of class ``cls_name`` if it has the indexers' keys and types (``anomaly`` as an int)."""
        shown = str(entry)[:200]
        if not isinstance(entry, dict) or any(k not in entry for k in ITEM_KEYS):
            self._malformed(f"it has an entry without the keys {', '.join(ITEM_KEYS)}: {shown}")
        if not isinstance(entry["img_path"], str) or not entry["img_path"]:
            self._malformed(f"its entry {shown} has no image path (img_path must be a file name)")
        if entry["mask_path"] is not None and not isinstance(entry["mask_path"], str):
            self._malformed(f"its entry {shown} has a mask_path that is not a file name")
        if entry["anomaly"] not in (0, 1) or isinstance(entry["anomaly"], str):
            self._malformed(f"its entry {shown} has anomaly {entry['anomaly']!r} (0 = normal, 1 = anomalous)")
        if entry["cls_name"] != cls_name:
            self._malformed(f"its entry {shown} is listed under class '{cls_name}' but says cls_name "
                            f"{entry['cls_name']!r}")
        return dict(entry, anomaly=int(entry["anomaly"]))

    def _malformed(self, what: str) -> NoReturn:
        raise AnomalyCLIPError(f"{self._meta_path()} is malformed: {what}; re-create it: "
                               f"{INDEX_FIX.format(root=self.root)}")

    def _resolve(self, item: dict[str, Any]) -> tuple[str, str]:
        image = resolve_path(self.root, item["img_path"], item["cls_name"])
        mask = resolve_path(self.root, item["mask_path"], item["cls_name"]) if item["mask_path"] else ""
        if mask and os.path.isdir(mask):
            mask = ""  # the original's "classification only" convention
        return image, mask

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image_file, mask_file = self._files[index]
        image = load_image(image_file)
        anomaly = item["anomaly"]
        mask = load_mask(mask_file) if anomaly and mask_file else Image.new("L", image.size, 0)
        if mask.size != image.size:
            raise AnomalyCLIPError(
                f"mask {mask_file} is {mask.size[0]}x{mask.size[1]} but its image {image_file} is "
                f"{image.size[0]}x{image.size[1]}: a mask marks its own image's pixels; re-make it at the image's "
                "size (or re-download the dataset) and re-run its indexer")
        return {
            "img": self.transform(image),
            "img_mask": binarize_mask(self.target_transform(mask)),
            "anomaly": anomaly,
            "cls_name": item["cls_name"],
            "img_path": image_file,
            "cls_id": self._cls_ids[index],
            "index": index,
        }

    def image_file(self, index: int) -> str:
        """The file item ``index``'s image is read from (``root`` joined with its path, re-rooted if needed)."""
        return self._files[index][0]

    def availability(self, class_name: str | None = None) -> Availability:
        """Counts of normal, anomalous and masked images, for all classes or one of them."""
        chosen = [(item, files) for item, files, cls_id in zip(self.items, self._files, self._cls_ids)
                  if class_name is None or self.class_names[cls_id] == class_name]
        return Availability(
            n_normal=sum(1 for item, _ in chosen if not item["anomaly"]),
            n_anomalous=sum(1 for item, _ in chosen if item["anomaly"]),
            n_masked=sum(1 for item, (_, mask) in chosen if item["anomaly"] and mask),
        )

    @property
    def any_normal(self) -> bool:
        """Whether any item is normal."""
        return self.availability().n_normal > 0

    @property
    def any_anomalous(self) -> bool:
        """Whether any item is anomalous."""
        return self.availability().n_anomalous > 0

    @property
    def any_mask(self) -> bool:
        """Whether any anomalous item has a mask file (pixel metrics are possible)."""
        return self.availability().n_masked > 0


@contextlib.contextmanager
def loader_batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """The batches of ``loader``; its worker processes are stopped when the block ends, also on an error.

    Left to the garbage collector after an error (whose traceback keeps the iterator), the
    workers would be stopped at interpreter exit, where torch waits 5 s for each of them.
    """
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        stop_workers = getattr(iterator, "_shutdown_workers", None)  # the multi-process iterator's own clean-up
        if stop_workers is not None:
            stop_workers()
