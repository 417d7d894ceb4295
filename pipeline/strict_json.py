"""JSON reading that refuses a key given twice in one object (stdlib only; the deploy runtime uses it).

``json.loads`` keeps the last of two equal keys and drops the first without a word: a meta.json
listing a class twice would lose that class's first list of images, a thresholds.json or an export
manifest listing a class twice would use whichever came last. Every file a user may edit by hand is
read with :func:`loads`.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object holds the same key twice.

    Attributes:
        key: The repeated key.
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} appears twice in one object (JSON keeps only the last)")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def loads(text: str) -> Any:
    """``json.loads(text)``, refusing duplicate keys.

    Raises:
        json.JSONDecodeError: Not JSON.
        DuplicateKeyError: A key appears twice in one object.
    """
    return json.loads(text, object_pairs_hook=_unique)
