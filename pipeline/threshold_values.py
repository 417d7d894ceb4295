"""The values of a thresholds.json: what the method can produce (stdlib only, so the deploy runtime reads it).

Used by :func:`pipeline.thresholds.load_thresholds` (test_one_example.py, export.py) and by
:class:`deploy.runtime.ExportedModel` for the thresholds an export's manifest holds.
"""

from __future__ import annotations

import math

from AnomalyCLIP_lib.errors import AnomalyCLIPError

# Slack above a range's end: a normal_fpr threshold is the float32 just above the largest normal value,
# and float32 sums over layers may round a little past the exact bound.
_RANGE_SLACK = 1e-5


def check_classes(classes: dict[str, object], source: str, layers: int | None = None) -> None:
    """Refuse a ``classes`` mapping whose thresholds are not what the method can produce.

    Each entry needs ``image_threshold``; it and ``pixel_threshold`` are ``null`` (none chosen) or
    finite numbers (not booleans, not strings) within the range of their values: image scores are
    probabilities in [0, 1]; a pixel map is a sum over the layers used of values in [0, 1], so in
    [0, number of layers]: the entry's ``provenance`` gives it (``features_list`` from index
    ``feature_map_layer`` on), else ``layers`` when given, else only the lower bound is checked.
    A threshold out of range flags every image or none of them: a silent wrong answer.

    Args:
        classes: The ``classes`` of a thresholds.json (or of an export manifest's ``thresholds``).
        source: The file, for the message (``thresholds file X``, ``X/anomalyclip.json``).
        layers: The layers a pixel map sums where an entry records no provenance (an export's).

    Raises:
        AnomalyCLIPError: One line naming the source, the class, the field and the value.
    """
    for name, entry in classes.items():
        if not isinstance(entry, dict) or "image_threshold" not in entry:
            raise AnomalyCLIPError(f"{source}: class {name!r} has no image_threshold")
        for field, upper in (("image_threshold", 1.0), ("pixel_threshold", pixel_bound(entry, layers))):
            value = entry.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AnomalyCLIPError(f"{source}: class {name!r} has an invalid {field} {value!r} (a number is "
                                       "needed, or null for none): write it again with test.py or "
                                       "test_one_example.py --calibrate")
            if value < 0 or (upper is not None and value > upper * (1 + _RANGE_SLACK)):
                span = f"[0, {upper:g}]" if upper is not None else "[0, number of layers summed]"
                what = "image scores are probabilities" if field == "image_threshold" else \
                    "pixel maps sum one value in [0, 1] per layer used"
                raise AnomalyCLIPError(f"{source}: class {name!r} has {field} {value!r}, outside {span} where "
                                       f"{what}, so it would flag everything or nothing: write it again with "
                                       "test.py or test_one_example.py --calibrate")


def pixel_bound(entry: dict, layers: int | None) -> float | None:
    """The largest pixel value the maps ``entry``'s pixel threshold applies to can hold (``None``: unknown)."""
    recorded = summed_layers(entry.get("provenance"))
    count = recorded if recorded is not None else layers
    return float(count) if count else None


def summed_layers(provenance: object) -> int | None:
    """How many layers a pixel map sums, from a threshold's provenance (``None`` when it does not say)."""
    if not isinstance(provenance, dict):
        return None
    layers, first = provenance.get("features_list"), provenance.get("feature_map_layer", 0)
    if not isinstance(layers, list) or not layers or isinstance(first, bool) or not isinstance(first, int):
        return None
    count = len(set(map(str, layers))) - first
    return count if count > 0 else None
