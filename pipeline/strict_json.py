"""JSON reading that refuses a key given twice in one object (stdlib only; the deploy runtime uses it).

``json.loads`` keeps the last of two equal keys and drops the first without a word: a meta.json
listing a class twice would lose that class's first list of images, a thresholds.json or an export
manifest listing a class twice would use whichever came last. Every file a user may edit by hand is
read with :func:`loads`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from AnomalyCLIP_lib.errors import AnomalyCLIPError, read_error_line


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


def read_file(path: str | os.PathLike, twice: Callable[[str], str], unreadable: Callable[[Exception], str],
              what: str = "") -> Any:
    """The content of a JSON file a user may edit, through :func:`loads`; every failure is one line.

    Args:
        path: The file.
        twice: The line for a key given twice (called with the key).
        unreadable: The line for a file that is not JSON (called with the error).
        what: How :func:`AnomalyCLIP_lib.errors.read_error_line` names the file when the cause is
            not its content (permissions, a folder, a failing disk).

    Raises:
        AnomalyCLIPError: The file cannot be read, is not JSON, or repeats a key.
    """
    try:
        return loads(Path(path).read_text(encoding="utf-8"))
    except DuplicateKeyError as error:
        raise AnomalyCLIPError(twice(error.key)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        not_content = read_error_line(error, path, what) if isinstance(error, OSError) else None
        raise AnomalyCLIPError(not_content or unreadable(error)) from None
