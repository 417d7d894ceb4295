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
