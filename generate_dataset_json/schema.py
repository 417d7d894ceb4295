"""The ``meta.json`` schema (method §8), shared by the indexers and the dataset loader (no torch).

::

    {"train": {cls: [item, ...], ...}, "test": {cls: [item, ...], ...}}

Each item has exactly the keys :data:`ITEM_KEYS`: ``img_path`` and ``mask_path`` (POSIX paths
relative to the dataset root; ``mask_path`` is ``""`` when there is no mask), ``cls_name``,
``specie_name`` and ``anomaly`` (0 or 1).
"""

from __future__ import annotations

SPLITS = ("train", "test")
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")

Item = dict[str, str | int]
MetaIndex = dict[str, dict[str, list[Item]]]


def make_item(img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int) -> Item:
    """One meta.json entry, keys in the original's order."""
    return dict(zip(ITEM_KEYS, (img_path, mask_path, cls_name, specie_name, int(anomaly))))


# The integrity problems of an index that would change results silently (each image counts once, with one label,
# from inside the dataset root), shared by the indexers (before writing) and the loader (before any model loads).
LISTED_TWICE = "image listed twice"
BOTH_LABELS = "image listed both as normal and anomalous"
OUTSIDE_ROOT = "path outside the dataset root"
INTEGRITY_FIXES = {
    LISTED_TWICE: "An image listed twice counts twice in every metric: list each image once",
    BOTH_LABELS: "An image is either normal or anomalous: keep the one right entry",
    OUTSIDE_ROOT: "Paths are relative to the dataset root and stay inside it (no '../', no absolute path elsewhere)",
}


def escapes_root(path: str) -> bool:
    """Whether a path of meta.json, relative to the dataset root, leaves it (``../x.png``, ``a/../../x.png``)."""
    parts: list[str] = []
    for part in path.replace("\\", "/").split("/"):
        if part == "..":
            if not parts:
                return True
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return False


def is_absolute(path: str) -> bool:
    """Whether a path of meta.json is absolute, on POSIX or Windows (``/data/x.png``, ``C:\\data\\x.png``)."""
    return path.startswith(("/", "\\")) or path[1:2] == ":"


def duplicate_entries(entries: list[tuple[str, str, int]]) -> dict[str, list[str]]:
    """The images listed more than once among ``entries``, by kind (:data:`LISTED_TWICE`, :data:`BOTH_LABELS`).

    Args:
        entries: ``(key, shown, anomaly)`` per entry: ``key`` identifies the image file (a normalised
            path), ``shown`` is how a message names the entry.

    Returns:
        ``{kind: [shown of each image's first entry, ...]}`` in entry order, only the kinds found.
    """
    labels: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for key, shown, anomaly in entries:
        labels.setdefault(key, set()).add(int(anomaly))
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, shown)
    found: dict[str, list[str]] = {}
    for key, count in counts.items():
        if len(labels[key]) > 1:
            found.setdefault(BOTH_LABELS, []).append(first[key])
        elif count > 1:
            found.setdefault(LISTED_TWICE, []).append(f"{first[key]} ({count} times)")
    return found
