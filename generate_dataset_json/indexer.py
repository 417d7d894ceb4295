"""The shared machinery of the dataset indexers: walking, pairing, validation and writing.

Each ``generate_dataset_json/<name>.py`` script is a thin description of one download's layout
(a :class:`FolderLayout`, or :class:`DagmLayout` / :class:`VisaLayout` for the two layouts that
are not folders of images per type) handed to :func:`generate_dataset_json.command.run` (the
command line). :func:`index_dataset` is the library entry point.

``meta.json`` (method §8) is described in :mod:`generate_dataset_json.schema`; ``specie_name`` is
the type folder's name, or a fixed name where the layout says so. The file
is written as ``json.dumps(index, indent=4)`` plus a newline, like the original, through a
temporary file in the root and ``os.replace`` (:mod:`atomic`).

Choices made here (the README can quote them):

* Both ``train`` and ``test`` keys are always written. A class whose download has no train
  folder has no entry in ``train``; test-only datasets therefore write ``"train": {}``.
* Class order: the dataset's list in the method §8 table (for MVTec AD the original result-table
  order of method §7). Classes of the list missing from the download are skipped with one
  warning, so a partial download indexes what it has; when none is present the indexer fails.
  Folders that are not classes of the dataset are ignored with a warning (index your own
  data with ``folder.py``).
* Item order within a class: type folders sorted by name, files sorted by name within each
  (plain code-point order: ``ko`` before ``ok``, ``broken_large`` before ``good``). VisA keeps
  the row order of its CSV.
* Files: only images (``.png .jpg .jpeg .bmp .tif .tiff .webp``, any case) are indexed; hidden
  files and anything else (``Labels.txt``, ``meta.json``, spreadsheets) are ignored. Every
  indexed image and mask is fully decoded (PIL ``load()``, a progress bar in ``img`` on a
  terminal's stderr) so that an empty, truncated or non-image file is reported at indexing
  time rather than in the middle of training or evaluation.
* Masks are paired with images by name with a per-layout :class:`MaskRule`, never by position,
  and must have their image's width and height (a mask of another size belongs to another image,
  or was resized: resizing it to the image's would shift the defect it marks).
* Errors: every problem of a run is collected first, then one :class:`AnomalyCLIPError` lists
  them by kind (missing folder, anomalous image without mask, mask without image, folder
  without images, class without images, unreadable image, mask of another size, ...), naming at most 10 paths
  relative to the root and counting the rest, and ending with the expected layout.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from AnomalyCLIP_lib.errors import AnomalyCLIPError, write_error_line
from AnomalyCLIP_lib.images import IMAGE_EXTENSIONS, UnreadableImageError, read_image
from generate_dataset_json.schema import (INTEGRITY_FIXES, OUTSIDE_ROOT, SPLITS, Item, MetaIndex, duplicate_entries,
                                          escapes_root, is_absolute, make_item)
from pipeline.atomic import atomic_write_text

logger = logging.getLogger(__name__)

MAX_LISTED = 10
MAX_DECODE_THREADS = 8
UNREADABLE = "unreadable image"
MASK_SIZE = "mask of another size than its image"
NORMAL_TYPE_ABSENT = "normal type folder in no class"
FIXES = {
    UNREADABLE: "Unreadable images are empty, cut short or not images: re-download or re-extract "
                "the listed file(s), or delete them",
    MASK_SIZE: "A mask must have its image's width and height (it marks that image's pixels): re-download the "
               "masks, or re-make them at their image's size",
    NORMAL_TYPE_ABSENT: "Give --normal-names the folder name(s) of the normal images (else every image would be "
                        "indexed as anomalous), or --normal-names with no name when the dataset has none",
    **INTEGRITY_FIXES,
}

def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a visible file with an image extension."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def list_folders(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def listed(paths: list[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` with at most ``limit`` entries, then ``... and N more``."""
    shown = ", ".join(paths[:limit])
    return shown if len(paths) <= limit else f"{shown} ... and {len(paths) - limit} more"


class Problems:
    """Collects the problems of one indexing run so that they are reported together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_kind: dict[str, list[str]] = {}

    def add(self, kind: str, path: Path | str) -> None:
        """Record one problem of ``kind`` about ``path`` (shown relative to the root)."""
        if isinstance(path, Path):
            try:
                path = path.relative_to(self.root).as_posix() or "."
            except ValueError:
                path = str(path)
        self._by_kind.setdefault(kind, []).append(str(path))

    def __bool__(self) -> bool:
        return bool(self._by_kind)

    def raise_if_any(self, dataset: str, hint: str) -> None:
        """Raise one :class:`AnomalyCLIPError` describing every recorded problem, if any."""
        if not self._by_kind:
            return
        budget = MAX_LISTED
        parts = []
        for kind, paths in self._by_kind.items():
            shown = max(budget, 1)
            parts.append(f"{kind} ({len(paths)}): {listed(paths, shown)}")
            budget -= min(len(paths), shown)
        total = sum(len(paths) for paths in self._by_kind.values())
        fixes = "".join(f"{FIXES[kind]}. " for kind in self._by_kind if kind in FIXES)
        raise AnomalyCLIPError(
            f"{dataset} at {self.root}: {total} problem(s): {'; '.join(parts)}. {fixes}"
            f"Expected layout: {hint}; check that the download is complete and unpacked there"
        )


@dataclass(frozen=True)
class MaskRule:
    """How a mask file is named after its image.

    Attributes:
        suffix: Appended to the image's stem (``"_mask"``: ``000.png`` -> ``000_mask.png``).
        extensions: Allowed mask extensions, lower case with the dot; ``None`` allows any image
            extension (the image's own is preferred when several exist).
    """

    suffix: str = ""
    extensions: tuple[str, ...] | None = None

    def key(self, mask_name: str) -> str | None:
        """The image stem a mask file name belongs to, or ``None`` if it does not follow the rule."""
        path = Path(mask_name)
        if self.extensions is not None and path.suffix.lower() not in self.extensions:
            return None
        if not path.stem.endswith(self.suffix) or len(path.stem) == len(self.suffix):
            return None
        return path.stem[: len(path.stem) - len(self.suffix)]


class MaskFolder:
    """The mask files of one folder, indexed by the image stem they belong to."""

    def __init__(self, folder: Path, rule: MaskRule) -> None:
        self.folder = folder
        self._by_key: dict[str, list[Path]] = {}
        self._unmatched: list[Path] = []
        self._used: set[Path] = set()
        for path in list_images(folder):
            key = rule.key(path.name)
            if key is None:
                self._unmatched.append(path)
            else:
                self._by_key.setdefault(key, []).append(path)

    def find(self, image: Path, problems: Problems) -> Path | None:
        """The mask of ``image`` (by stem), or ``None``; several candidates are a problem."""
        candidates = self._by_key.get(image.stem, [])
        if len(candidates) > 1:
            same_ext = [p for p in candidates if p.suffix.lower() == image.suffix.lower()]
            if len(same_ext) != 1:
                problems.add("image with several masks", image)
            candidates = same_ext or candidates
        if not candidates:
            return None
        self._used.add(candidates[0])
        return candidates[0]

    def unused(self) -> list[Path]:
        """Mask files that no image claimed, and files that do not follow the naming rule."""
        unused = [p for paths in self._by_key.values() for p in paths if p not in self._used]
        return sorted(unused + self._unmatched)


class Layout(Protocol):
    """What :func:`index_dataset` needs from a layout description."""

    name: str
    hint: str

    def collect(self, root: Path, problems: Problems) -> MetaIndex:
        """Walk ``root`` and return the index; record (do not raise) problems."""
        ...


def relative(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (what meta.json stores)."""
    return path.relative_to(root).as_posix()


def known_classes(root: Path, name: str, hint: str, classes: tuple[str, ...]) -> list[str]:
    """The dataset's classes that are folders under ``root``, in the dataset's order.

    Missing ones are skipped with a warning, other folders ignored with a warning; none present
    is an error.
    """
    present = [c for c in classes if (root / c).is_dir()]
    if not present:
        raise AnomalyCLIPError(
            f"none of the {name} classes ({listed(list(classes))}) is a folder under {root}; "
            f"expected layout: {hint}"
        )
    missing = [c for c in classes if c not in present]
    if missing:
        logger.warning("%s: %d class(es) missing under %s, indexing the %d present: missing %s",
                       name, len(missing), root, len(present), listed(missing))
    others = [p.name for p in list_folders(root) if p.name not in classes]
    if others:
        logger.warning("%s: ignoring folder(s) that are not %s classes: %s (index your own data with "
                       "generate_dataset_json/folder.py)", name, name, listed(others))
    return present


@dataclass(frozen=True)
class FolderLayout:
    """A layout of folders of images grouped by type (MVTec AD and most others).

    ``ROOT/<class dir>/<split dir>/<type>/<image>``, with the masks of anomalous types in
    ``<class dir>/<mask_dir>`` named by ``mask_rule``.

    Attributes:
        name: Dataset name for messages.
        hint: The expected layout, for error messages and ``--help``.
        classes: Known class names in the dataset's order; empty means discover (``folder.py``):
            every folder of the root holding a ``test`` folder, sorted by name, or the root
            itself (class named after it) when it holds ``test``.
        class_dir: For single-class datasets, the class folder relative to the root (``""`` is
            the root); ``None`` means the folder named after each class.
        splits: (split, folder relative to the class folder; ``""`` = the class folder).
        required_splits: Splits whose folder must exist; the others are indexed when present.
        types: Explicit type folders, each required; ``None`` means every visible folder.
        exclude_types: Folders that are never types (e.g. ``masks``).
        normal_types: Type folders holding normal images; every other type is anomalous.
        masks: ``"required"`` (every anomalous image must have a mask), ``"optional"`` (a type
            without a mask folder is image-level only; with one, every image needs its mask) or
            ``"none"`` (image-level dataset).
        mask_dir: Mask folder relative to the class folder; ``{type}`` is the type's name.
        mask_rule: How masks are named after images.
        specie_name: Fixed ``specie_name`` for every item; ``None`` uses the type folder name.
        nested_images: A sub-folder of a type folder that holds its images when the type
            folder itself holds none (COVID-19 Radiography v4: ``COVID/images/*``).
        class_filter: Only these classes, in this order (``folder.py --classes``).
        check_normal_types: Each of ``normal_types`` must name a type folder of some class
            (``folder.py --normal-names``: a misspelt name would index every image as anomalous).
    """

    name: str
    hint: str
    classes: tuple[str, ...] = ()
    class_dir: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    required_splits: tuple[str, ...] = ("test",)
    types: tuple[str, ...] | None = None
    exclude_types: tuple[str, ...] = ()
    normal_types: tuple[str, ...] = ("good",)
    masks: str = "required"
    mask_dir: str = "ground_truth/{type}"
    mask_rule: MaskRule = MaskRule("_mask", (".png",))
    specie_name: str | None = None
    nested_images: str | None = None
    class_filter: tuple[str, ...] | None = None
    check_normal_types: bool = False

    def collect(self, root: Path, problems: Problems) -> MetaIndex:
        """Walk every class; see :class:`Layout`."""
        index: MetaIndex = {split: {} for split in SPLITS}
        without: dict[str, list[str]] = {}
        types_seen: set[str] = set()
        for cls_name, cls_dir in self._classes(root):
            mask_folders: dict[Path, MaskFolder] = {}
            for split, sub in self.splits:
                split_dir = cls_dir / sub if sub else cls_dir
                if not split_dir.is_dir():
                    if split in self.required_splits:
                        problems.add("missing folder", split_dir)
                    else:
                        without.setdefault(split, []).append(cls_name)
                    continue
                index[split][cls_name] = self._collect_split(root, cls_name, cls_dir, split_dir, mask_folders, problems,
                                                             types_seen)
            self._report_orphans(cls_dir, mask_folders, problems)
        for split, names in without.items():
            logger.info("%s: no %s folder for class(es) %s; their %s split is left out",
                        self.name, split, listed(names), split)
        if self.check_normal_types:
            for name in self.normal_types:
                if name not in types_seen:
                    problems.add(NORMAL_TYPE_ABSENT, f"{name} (type folders found: {listed(sorted(types_seen))})")
        return index

    def _classes(self, root: Path) -> list[tuple[str, Path]]:
        if self.class_dir is not None:
            return [(self.classes[0], root / self.class_dir if self.class_dir else root)]
        if self.classes:
            return [(c, root / c) for c in known_classes(root, self.name, self.hint, self.classes)]
        return self._discovered_classes(root)

    def _discovered_classes(self, root: Path) -> list[tuple[str, Path]]:
        if (root / "test").is_dir():
            found = {root.resolve().name: root}
        else:
            found = {p.name: p for p in list_folders(root) if (p / "test").is_dir()}
            skipped = [p.name for p in list_folders(root) if p.name not in found]
            if skipped:
                logger.warning("%s: ignoring folder(s) without a test folder: %s", self.name, listed(skipped))
        if not found:
            raise AnomalyCLIPError(f"no class folder with a test folder under {root}; expected layout: {self.hint}")
        if self.class_filter is None:
            return sorted(found.items())
        unknown = [c for c in self.class_filter if c not in found]
        if unknown:
            raise AnomalyCLIPError(
                f"class(es) {listed(unknown)} not found under {root} (found: {listed(sorted(found))}); "
                "fix --classes"
            )
        return [(c, found[c]) for c in self.class_filter]

    def _types(self, split_dir: Path, problems: Problems) -> list[Path]:
        if self.types is None:
            return [p for p in list_folders(split_dir) if p.name not in self.exclude_types]
        missing = [split_dir / t for t in self.types if not (split_dir / t).is_dir()]
        for path in missing:
            problems.add("missing folder", path)
        return [split_dir / t for t in self.types if (split_dir / t).is_dir()]

    def _type_images(self, type_dir: Path) -> list[Path]:
        images = list_images(type_dir)
        nested = type_dir / self.nested_images if self.nested_images else None
        if not images and nested is not None and nested.is_dir():
            images = list_images(nested)
        return images

    def _collect_split(self, root: Path, cls_name: str, cls_dir: Path, split_dir: Path,
                       mask_folders: dict[Path, MaskFolder], problems: Problems, types_seen: set[str]) -> list[Item]:
        items: list[Item] = []
        for type_dir in self._types(split_dir, problems):
            types_seen.add(type_dir.name)
            images = self._type_images(type_dir)
            if not images:
                problems.add("folder without images", type_dir)
            anomalous = type_dir.name not in self.normal_types
            masks = self._mask_folder(cls_dir, type_dir.name, mask_folders, problems) if anomalous else None
            specie = type_dir.name if self.specie_name is None else self.specie_name
            for image in images:
                mask_path = ""
                if masks is not None:
                    mask = masks.find(image, problems)
                    if mask is None:
                        problems.add("anomalous image without mask", image)
                    else:
                        mask_path = relative(root, mask)
                items.append(make_item(relative(root, image), mask_path, cls_name, specie, int(anomalous)))
        return items

    def _mask_folder(self, cls_dir: Path, type_name: str, mask_folders: dict[Path, MaskFolder],
                     problems: Problems) -> MaskFolder | None:
        if self.masks == "none":
            return None
        folder = cls_dir / self.mask_dir.format(type=type_name)
        if folder not in mask_folders:
            if not folder.is_dir():
                if self.masks == "required":
                    problems.add("missing mask folder", folder)
                else:
                    logger.warning("%s: no mask folder %s: its images are indexed for image-level metrics only",
                                   self.name, folder)
                return None
            mask_folders[folder] = MaskFolder(folder, self.mask_rule)
        return mask_folders[folder]

    def _report_orphans(self, cls_dir: Path, mask_folders: dict[Path, MaskFolder], problems: Problems) -> None:
        for folder in mask_folders.values():
            for path in folder.unused():
                problems.add("mask without image", path)
        if self.masks == "none" or not self.mask_dir.endswith("/{type}"):
            return
        parent = cls_dir / self.mask_dir[: -len("/{type}")]
        if not parent.is_dir():
            return
        for folder in list_folders(parent):
            if folder not in mask_folders and folder.name not in self.normal_types:
                for path in list_images(folder):
                    problems.add("mask without image", path)


@dataclass(frozen=True)
class DagmLayout:
    """DAGM 2007: ``ClassK/{Train,Test}/*.PNG``; an image is anomalous iff it has a label.

    Labels live in ``ClassK/<split>/Label/<stem>_label.PNG``; ``specie_name`` is ``""``; items
    are sorted by file name (normal and anomalous mixed). ``Test`` is required, ``Train`` is
    indexed when present.
    """

    name: str
    hint: str
    classes: tuple[str, ...]
    splits: tuple[tuple[str, str], ...] = (("train", "Train"), ("test", "Test"))
    label_dir: str = "Label"
    mask_rule: MaskRule = MaskRule("_label", (".png",))

    def collect(self, root: Path, problems: Problems) -> MetaIndex:
        """Walk every class; see :class:`Layout`."""
        index: MetaIndex = {split: {} for split in SPLITS}
        for cls_name in known_classes(root, self.name, self.hint, self.classes):
            for split, sub in self.splits:
                split_dir = root / cls_name / sub
                if not split_dir.is_dir():
                    if split == "test":
                        problems.add("missing folder", split_dir)
                    continue
                if not (split_dir / self.label_dir).is_dir():
                    problems.add("missing mask folder", split_dir / self.label_dir)
                    continue
                labels = MaskFolder(split_dir / self.label_dir, self.mask_rule)
                items = []
                for image in list_images(split_dir):
                    label = labels.find(image, problems)
                    mask_path = relative(root, label) if label is not None else ""
                    items.append(make_item(relative(root, image), mask_path, cls_name, "", int(label is not None)))
                index[split][cls_name] = items
                for path in labels.unused():
                    problems.add("mask without image", path)
        return index


@dataclass(frozen=True)
class VisaLayout:
    """VisA: the split file ``split_csv/1cls.csv`` (columns object, split, label, image, mask).

    Items keep the CSV's row order within each class and split; ``specie_name`` is ``""``;
    paths are the CSV's (relative to the root). Classes: the known ones in VisA's order, then
    any other object of the CSV in order of first appearance (synthetic or extended sets).
    A known class whose folder is absent is skipped with a warning; a listed file that is
    absent is an error. Masks are taken from the CSV only, so there is no orphan-mask check.
    """

    name: str
    hint: str
    classes: tuple[str, ...]
    split_file: str = "split_csv/1cls.csv"
    columns: tuple[str, ...] = ("object", "split", "label", "image", "mask")
    labels: tuple[tuple[str, int], ...] = (("normal", 0), ("anomaly", 1))

    def collect(self, root: Path, problems: Problems) -> MetaIndex:
        """Read the split file; see :class:`Layout`."""
        rows = self._read_rows(root)
        labels = dict(self.labels)
        order = [c for c in self.classes if any(r["object"] == c for _, r in rows)]
        order += list(dict.fromkeys(r["object"] for _, r in rows if r["object"] not in self.classes))
        absent = [c for c in order if not any((root / r["image"]).is_file() for _, r in rows if r["object"] == c)]
        if absent and len(absent) < len(order):
            logger.warning("%s: no image of class(es) %s under %s; indexing the others",
                           self.name, listed(absent), root)
        else:
            absent = []
        index: MetaIndex = {split: {} for split in SPLITS}
        for line, row in rows:
            cls_name, split = row["object"], row["split"]
            if cls_name in absent:
                continue
            if split not in SPLITS or row["label"] not in labels:
                problems.add("bad row (split must be train/test, label normal/anomaly)",
                             f"{self.split_file} line {line}")
                continue
            anomaly = labels[row["label"]]
            image = row["image"]
            mask = row["mask"] if anomaly else ""
            if not (root / image).is_file():
                problems.add("listed image missing", image)
            if anomaly and not (mask and (root / mask).is_file()):
                problems.add("anomalous image without mask", image)
            index[split].setdefault(cls_name, []).append(make_item(image, mask, cls_name, "", anomaly))
        for split in SPLITS:
            index[split] = {c: index[split][c] for c in order if c in index[split]}
        return index

    def _read_rows(self, root: Path) -> list[tuple[int, dict[str, str]]]:
        path = root / self.split_file
        if not path.is_file():
            raise AnomalyCLIPError(f"{self.name} split file {path} does not exist; expected layout: {self.hint}")
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                missing = [c for c in self.columns if c not in (reader.fieldnames or [])]
                if missing:
                    raise AnomalyCLIPError(
                        f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(reader.fieldnames or [])}); "
                        f"restore the original {self.split_file}"
                    )
                rows = [(reader.line_num, {k: (row[k] or "").strip().removeprefix("./") for k in self.columns})
                        for row in reader]
        except (UnicodeDecodeError, csv.Error) as error:
            raise AnomalyCLIPError(f"{path} is not a readable CSV text file ({error}); restore the original "
                                   f"{self.split_file}") from None
        if not rows:
            raise AnomalyCLIPError(f"{path} lists no images; restore the original {self.split_file}")
        return rows


def decode(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """The size of the image at ``path`` once fully decoded, or why PIL cannot decode it.

    Returns:
        ``(size, None)``, or ``(None, reason)``; a missing file gives ``(None, None)`` (the layouts
        report missing files themselves).
    """
    try:
        return read_image(path).size, None
    except UnreadableImageError as error:
        if error.not_content:  # a permission or disk error: one line with its fix, not a list of "unreadable" files
            raise
        return None, None if error.missing else error.reason


def decoded_sizes(root: Path, paths: list[str]) -> dict[str, tuple[int, int] | None]:
    """The size of every entry of ``paths`` (relative to ``root``) once decoded; ``None`` where it does not decode.

    Decodes in a few threads (PIL releases the GIL while decoding) with a tqdm bar on stderr,
    shown only when stderr is a terminal.
    """
    workers = max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda rel: decode(root / rel), paths), total=len(paths),
                            desc="decoding images", unit="img", file=sys.stderr, leave=False, disable=None))
    for rel, (_, why) in zip(paths, results):
        if why is not None:
            logger.debug("unreadable image %s (%s)", rel, why)
    return {rel: size for rel, (size, why) in zip(paths, results) if why is None}


def unreadable_images(root: Path, paths: list[str]) -> list[str]:
    """The entries of ``paths`` (relative to ``root``) that do not decode, in the given order."""
    sizes = decoded_sizes(root, paths)
    return [rel for rel in paths if rel not in sizes]


def _indexed_files(index: MetaIndex, problems: Problems) -> list[str]:
    """Every image and mask path of the index, sorted and without repeats; records empty classes."""
    paths: set[str] = set()
    for split, classes in index.items():
        for cls_name, items in classes.items():
            if not items:
                problems.add("class without images", f"{cls_name} ({split} split)")
            paths.update(str(item[key]) for item in items for key in ("img_path", "mask_path") if item[key])
    return sorted(paths)


def _check_integrity(index: MetaIndex, problems: Problems) -> None:
    """Record paths that leave the root and images listed twice or with both labels (a split file can hold them)."""
    for split, classes in index.items():
        entries = []
        for item in (item for items in classes.values() for item in items):
            for path in (str(item["img_path"]), str(item["mask_path"])):
                if path and (escapes_root(path) or is_absolute(path)):
                    problems.add(OUTSIDE_ROOT, path)
            image = str(item["img_path"])
            entries.append((posixpath.normpath(image.replace("\\", "/")), f"{image} ({split})", int(item["anomaly"])))
        for kind, shown in duplicate_entries(entries).items():
            for entry in shown:
                problems.add(kind, entry)


def _check_contents(index: MetaIndex, root: Path, problems: Problems) -> None:
    """Record empty classes, every image or mask that PIL cannot fully decode, and masks of another size."""
    paths = _indexed_files(index, problems)
    sizes = decoded_sizes(root, paths)
    for path in paths:
        if path not in sizes:
            problems.add(UNREADABLE, path)
    for item in (item for classes in index.values() for items in classes.values() for item in items):
        image_size, mask_size = sizes.get(str(item["img_path"])), sizes.get(str(item["mask_path"]))
        if item["mask_path"] and image_size and mask_size and image_size != mask_size:
            problems.add(MASK_SIZE, f"{item['mask_path']} ({size_text(mask_size)}) for {item['img_path']} "
                                    f"({size_text(image_size)})")


def size_text(size: tuple[int, int]) -> str:
    """``"640x480"``: width x height, as image viewers show it."""
    return f"{size[0]}x{size[1]}"


def write_meta(root: Path, index: MetaIndex) -> Path:
    """Write ``root/meta.json`` atomically (temporary file in the root, then ``os.replace``)."""
    target = root / "meta.json"
    try:
        return atomic_write_text(json.dumps(index, indent=4) + "\n", target)
    except OSError as error:
        raise AnomalyCLIPError(write_error_line(error, target) or f"cannot write {target} ({error})") from error


def index_dataset(layout: Layout, root: str | Path, write: bool = True) -> MetaIndex:
    """Index a dataset and (by default) write ``root/meta.json``.

    Args:
        layout: The layout description (the ``LAYOUT`` of a script, or any :class:`Layout`).
        root: The dataset root.
        write: Write ``meta.json``; ``False`` only returns the index.

    Returns:
        The index as written: ``{"train": {cls: [item]}, "test": {cls: [item]}}``.

    Raises:
        AnomalyCLIPError: The root is missing, or any problem was found (all listed at once).
    """
    root = Path(root)
    if not root.is_dir():
        raise AnomalyCLIPError(f"dataset root {root} does not exist or is not a folder; expected layout: {layout.hint}")
    problems = Problems(root)
    index = layout.collect(root, problems)
    _check_integrity(index, problems)
    _check_contents(index, root, problems)
    if not problems and not any(index["test"].values()):
        problems.add("no test images found", root)
    problems.raise_if_any(layout.name, layout.hint)
    if write:
        path = write_meta(root, index)
        logger.debug("%s: wrote %s", layout.name, path)
    return index


def mvtec_style_layout(name: str, classes: tuple[str, ...]) -> FolderLayout:
    """The MVTec AD layout (also MPDD, SDD, DTD-Synthetic): normal type ``good``, ``_mask.png`` masks."""
    return FolderLayout(
        name=name,
        hint="ROOT/<class>/{train,test}/<type>/*.png with masks ROOT/<class>/ground_truth/<type>/<stem>_mask.png "
        "(normal type: good)",
        classes=classes,
    )


def images_masks_layout(name: str, cls_name: str, image_dir: str, mask_dir: str) -> FolderLayout:
    """A test-only layout of anomalous images and same-named masks (CVC-ColonDB/ClinicDB, Kvasir, TN3K).

    ``specie_name`` is ``""``: the layout has no type folder.
    """
    return FolderLayout(
        name=name,
        hint=f"ROOT/{image_dir}/* with masks ROOT/{mask_dir}/<same file name>; every image is anomalous",
        classes=(cls_name,),
        class_dir="",
        splits=(("test", ""),),
        types=(image_dir,),
        normal_types=(),
        mask_dir=mask_dir,
        mask_rule=MaskRule(),
        specie_name="",
    )


def no_yes_layout(name: str, class_dir: str) -> FolderLayout:
    """A test-only brain layout of ``no`` (normal) and ``yes`` (anomalous) folders without masks
    (BrainMRI, Br35H); other folders there (Br35H's ``pred/``) are ignored."""
    where = f"ROOT/{class_dir}/" if class_dir else "ROOT/"
    return FolderLayout(
        name=name,
        hint=f"{where}{{no,yes}}/* (no masks; other folders are ignored)",
        classes=("brain",),
        class_dir=class_dir,
        splits=(("test", ""),),
        types=("no", "yes"),
        normal_types=("no",),
        masks="none",
    )
