"""Tiled scoring of large images: tiles at native resolution, stitched into one map, plus a global view.

The model sees ``--image_size`` S pixels a side. A 4000-pixel image resized to 518 shrinks a
20-pixel scratch below one 14-pixel ViT patch; cut into tiles of ``--tile_size`` T pixels of
the original, each resized to S, the scratch keeps its size. The rules:

* **Grid** (:func:`tile_grid`). Along a side of L > T pixels: ``n = ceil((L - T) / (T (1 - F))) + 1``
  tiles of T pixels (F = ``--tile_overlap``), their starts spread evenly from 0 to L - T (rounded),
  so neighbours share at least F T pixels and the last tile ends on the border. Along a side of
  at most T pixels: one tile spanning it. An image with both sides at most T is **scored whole**,
  exactly as without tiling (one view, an S x S map).
* **Views**. A tiled image is scored as its global view (the whole image, the input an untiled
  run gives the model) and every tile, each preprocessed by the scorer's own ``preprocess``
  (resized to S x S), all through the model in batches of ``--batch_size`` views: G + 1 forwards
  for a grid of G tiles.
* **Stitching** (:class:`Stitcher`), at the image's native resolution. Each tile's S x S map is
  resized bilinearly to the tile's extent and weighted by a separable window: 1 inside the tile,
  falling linearly to 0 over the last ``r`` pixels before an edge that lies inside the image
  (``r`` = the smallest overlap of neighbouring tiles on that axis; edges on the image border
  keep weight 1). The stitched map is the weighted average. Why this blend: a map that is the same
  function of position in every tile comes back unchanged (any weighted average of equal values
  is that value); every tile's weight reaches 0 where its edge lies inside another tile, so the
  map is continuous across tile edges (no seams) even where tiles disagree, which a plain average
  or centre-keeping (a hard switch at the middle of the overlap) would not be; and the pixels near
  a tile's edge, which the ViT sees with the least context, count least. With ``--tile_overlap 0``
  the tiles only abut and the blend is plain tiling.
* **Combination**. Map: the pixel-wise maximum of the stitched tile map and the global map
  (resized bilinearly to the native size): defects smaller than a patch of the global view come
  from the tiles, defects larger than a tile from the global view. Image score: the maximum of the
  global view's score and every tile's score (a defect seen by one tile makes the image anomalous).

Thresholds follow the maps: the tiling settings are part of their provenance
(:func:`pipeline.thresholds.tiling_fields`). The whole module is torch-free at import (numpy and Pillow): the
runtime path (``test_one_example.py --runtime``) tiles around the exported graph with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.images import load_image, read_image
from pipeline.config import TilingSpec
from pipeline.engine import Batch, PerClassScorer, ScoredImage, Scorer, file_batches, score_batches

if TYPE_CHECKING:
    import torch

    from AnomalyCLIP_lib.inference import AnomalyCLIPInference
    from AnomalyCLIP_lib.memory import PatchMemory
    from AnomalyCLIP_lib.memory_config import MemorySettings
    from dataset import AnomalyDataset
    from pipeline.config import LoaderSpec
    from pipeline.memory import Reference

# The smallest tile: one patch of ViT-L/14, the backbones' layout (a loaded model's own patch size is checked too).
MIN_TILE_SIZE = 14
MAX_TILE_OVERLAP = 0.9  # beyond, the tiles grow without bound (stride 1 pixel at overlap 1)
MAP_RULE = "max(global view resized, tiles stitched with linear-ramp windows)"
SCORE_RULE = "max(global view, tiles)"

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


def check_tiling(spec: TilingSpec, patch_size: int = MIN_TILE_SIZE) -> None:
    """``--tile_size`` holds at least one patch; ``--tile_overlap`` is a fraction in [0, 0.9]. One-line errors."""
    overlap = spec.tile_overlap
    if not (isinstance(overlap, (int, float)) and math.isfinite(overlap) and 0 <= overlap <= MAX_TILE_OVERLAP):
        raise AnomalyCLIPError(f"--tile_overlap {overlap} must be a fraction in [0, {MAX_TILE_OVERLAP}] "
                               "(the share of a tile its neighbours overlap; default 0.25)")
    if spec.tile_size is not None and spec.tile_size < patch_size:
        raise AnomalyCLIPError(f"--tile_size {spec.tile_size} is smaller than the model's patch size ({patch_size} "
                               f"pixels): a tile must hold at least one patch; use at least {patch_size} "
                               "(e.g. 512), or leave --tile_size out to score images whole")


# --- the grid ------------------------------------------------------------------------------------


def axis_starts(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Where the tiles along one side of ``length`` pixels begin (see the module's grid rule)."""
    if length <= tile:
        return (0,)
    stride = max(1.0, tile * (1.0 - overlap))
    count = math.ceil((length - tile) / stride - 1e-9) + 1
    return tuple(round(i * (length - tile) / (count - 1)) for i in range(count))


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one image: a product grid of column and row starts.

    Attributes:
        width: The image's width in pixels.
        height: Its height.
        tile_width: Width of every tile (``--tile_size``, or the image's width when it is narrower).
        tile_height: Height of every tile.
        xs: Left edges of the columns.
        ys: Top edges of the rows.
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def count(self) -> int:
        """Number of tiles."""
        return len(self.xs) * len(self.ys)

    def boxes(self) -> list[Box]:
        """``(left, top, right, bottom)`` of every tile, row by row."""
        return [(x, y, x + self.tile_width, y + self.tile_height) for y in self.ys for x in self.xs]

    def record(self) -> dict[str, object]:
        """The grid as ``predictions.json`` records it."""
        return {"columns": len(self.xs), "rows": len(self.ys), "tile": [self.tile_width, self.tile_height],
                "x": list(self.xs), "y": list(self.ys)}


def tile_grid(size: tuple[int, int], spec: TilingSpec) -> TileGrid | None:
    """The grid of an image of ``size = (width, height)``; ``None`` when it is scored whole.

    An image is scored whole when tiling is off or when no side is larger than one tile.
    """
    width, height = size
    tile = spec.tile_size
    if tile is None or (width <= tile and height <= tile):
        return None
    return TileGrid(width, height, min(tile, width), min(tile, height), axis_starts(width, tile, spec.tile_overlap),
                    axis_starts(height, tile, spec.tile_overlap))


def image_views(image: Image.Image, spec: TilingSpec) -> list[Image.Image]:
    """The views scored for ``image``: the whole image first, then every tile (none when it is scored whole).

    The reference images of a few-shot memory are cut the same way, so the memory holds patches at
    the scale the tiles show them.
    """
    grid = tile_grid(image.size, spec)
    return [image] + ([] if grid is None else [image.crop(box) for box in grid.boxes()])


def preprocessed_views(image: Image.Image, scorer: Scorer, spec: TilingSpec) -> list[Any]:
    """:func:`image_views` preprocessed by ``scorer`` (rows of ``(3, S, S)``, global view first)."""
    return [scorer.preprocess(view) for view in image_views(image, spec)]


def map_pixels(size: tuple[int, int], spec: TilingSpec, image_size: int) -> int:
    """Pixels of an image's map: its native size when tiled, ``image_size`` squared when scored whole."""
    return size[0] * size[1] if tile_grid(size, spec) is not None else image_size**2


def total_map_pixels(files: Sequence[Path], spec: TilingSpec, image_size: int) -> int:
    """Pixels of the maps of ``files`` (their headers are read for the sizes), for a calibration's pixel count."""
    if not spec.enabled:
        return len(files) * image_size**2
    return sum(map_pixels(read_image(file, decode=False).size, spec, image_size) for file in files)


# --- stitching -----------------------------------------------------------------------------------


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 map resized bilinearly to ``size = (width, height)`` (Pillow); the array itself when it fits."""
    values = np.asarray(values, dtype=np.float32)
    if (values.shape[1], values.shape[0]) == tuple(size):
        return values
    return np.asarray(Image.fromarray(values).resize(tuple(size), Image.BILINEAR), dtype=np.float32)


def _ramp_weights(length: int, starts: Sequence[int], extent: int) -> list[np.ndarray]:
    """Each tile's window along one axis (``extent`` values): 1, falling linearly to 0 at inner edges."""
    overlaps = [a + extent - b for a, b in zip(starts, starts[1:])]
    ramp = min(overlaps) if overlaps else 0
    offsets = np.arange(extent, dtype=np.float64) + 0.5  # pixel centres from the tile's start
    windows = []
    for start in starts:
        window = np.ones(extent, dtype=np.float64)
        if ramp > 0 and start > 0:
            window = np.minimum(window, offsets / ramp)
        if ramp > 0 and start + extent < length:
            window = np.minimum(window, (extent - offsets) / ramp)
        windows.append(window.astype(np.float32))
    return windows


class Stitcher:
    """One tiled image's map, built tile by tile at native resolution (float32, one native array).

    Args:
        grid: The image's tiles.
    """

    def __init__(self, grid: TileGrid) -> None:
        self.grid = grid
        self._wx = _ramp_weights(grid.width, grid.xs, grid.tile_width)
        self._wy = _ramp_weights(grid.height, grid.ys, grid.tile_height)
        total_x = np.zeros(grid.width, dtype=np.float32)
        for start, window in zip(grid.xs, self._wx):
            total_x[start:start + grid.tile_width] += window
        total_y = np.zeros(grid.height, dtype=np.float32)
        for start, window in zip(grid.ys, self._wy):
            total_y[start:start + grid.tile_height] += window
        self._total_x, self._total_y = total_x, total_y  # the grid is a product: the weights' sum is separable
        self._sum = np.zeros((grid.height, grid.width), dtype=np.float32)
        self.added = 0

    def add(self, tile: int, tile_map: np.ndarray) -> None:
        """Blend tile number ``tile`` (row by row, as :meth:`TileGrid.boxes`) from its ``(S, S)`` map."""
        column, row = tile % len(self.grid.xs), tile // len(self.grid.xs)
        x, y = self.grid.xs[column], self.grid.ys[row]
        width, height = self.grid.tile_width, self.grid.tile_height
        weight = self._wy[row][:, None] * self._wx[column][None, :]
        self._sum[y:y + height, x:x + width] += resize_map(tile_map, (width, height)) * weight
        self.added += 1

    def result(self) -> np.ndarray:
        """The stitched ``(height, width)`` map (the weighted average); the stitcher's array, divided in place."""
        if self.added != self.grid.count:
            raise RuntimeError(f"stitched {self.added} of {self.grid.count} tiles")
        self._sum /= self._total_y[:, None]
        self._sum /= self._total_x[None, :]
        return self._sum


def combine(stitched: np.ndarray, global_map: np.ndarray) -> np.ndarray:
    """The module's map rule, in place on ``stitched``: the maximum with the global map resized to its size."""
    height, width = stitched.shape
    return np.maximum(stitched, resize_map(global_map, (width, height)), out=stitched)


# --- the scorer around a scorer ------------------------------------------------------------------


class _Pending:
    """One image of a batch while its views are scored."""

    def __init__(self, grid: TileGrid | None) -> None:
        self.grid = grid
        self.views = 1 + (grid.count if grid is not None else 0)
        self.stitcher = Stitcher(grid) if grid is not None else None
        self.score = -math.inf
        self.global_map: np.ndarray | None = None
        self.final: np.ndarray | None = None
        self.added = 0

    @property
    def complete(self) -> bool:
        """Every view scored, and not finished yet."""
        return self.added == self.views and self.final is None

    def finish(self, out_size: tuple[int, int] | None) -> None:
        """The image's map (:meth:`result`), kept in ``final``; the stitcher and the global map are let go."""
        self.final = self.result(out_size)
        self.stitcher = self.global_map = None

    def add(self, view: int, score: float, view_map: np.ndarray) -> None:
        self.added += 1
        self.score = max(self.score, float(score))
        if view == 0:
            self.global_map = np.array(view_map, dtype=np.float32)
        else:
            self.stitcher.add(view - 1, view_map)

    def result(self, out_size: tuple[int, int] | None) -> np.ndarray:
        if self.stitcher is None:  # scored whole: the global view's map, as an untiled run gives it
            return self.global_map if out_size is None else resize_map(self.global_map, out_size)
        native = combine(self.stitcher.result(), self.global_map)
        return native if out_size is None else resize_map(native, out_size)


class TiledScorer:
    """A :class:`~pipeline.engine.Scorer` that scores each image as its global view and tiles (module rules).

    Wraps any scorer (the torch module, an exported graph, one with a few-shot memory inside):
    ``preprocess`` keeps the decoded image, and ``predict`` cuts each image of the batch into its
    views, preprocesses them with the wrapped scorer, runs them through it in batches of
    ``batch_size`` views, and stitches each image's map.

    Args:
        scorer: The wrapped scorer.
        spec: The tiling settings (checked here against the scorer's patch size, where it has one).
        batch_size: Views per forward of the wrapped scorer.
        out_size: ``(width, height)`` every map is resized to (evaluation: S x S, the masks' grid);
            ``None``: native size for tiled images, S x S for images scored whole.
        progress: A bar counting the views (tiles) of each batch, on a terminal.
    """

    def __init__(self, scorer: Scorer, spec: TilingSpec, batch_size: int, out_size: tuple[int, int] | None = None,
                 progress: bool = True) -> None:
        check_tiling(spec, getattr(scorer, "patch_size", None) or MIN_TILE_SIZE)
        self.inner = scorer
        self.spec = spec
        self.batch_size = batch_size
        self.out_size = out_size
        self.progress = progress
        self.image_size = scorer.image_size

    def preprocess(self, image: Image.Image) -> Image.Image:
        """The decoded image itself: its views are cut and preprocessed in :meth:`predict`."""
        return image

    def stack(self, rows: Sequence[Image.Image]) -> np.ndarray:
        return image_array(rows)

    def predict(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
        """Scores ``(B,)`` and one map per image: a ``(B, H, W)`` array with ``out_size``, else a list."""
        pending = [_Pending(tile_grid(image.size, self.spec)) for image in images]
        total = sum(1 + (p.grid.count if p.grid is not None else 0) for p in pending)
        tiled = any(p.grid is not None for p in pending)
        with tqdm(total=total, desc="tiles", unit="tile", leave=False,
                  disable=None if self.progress and tiled else True) as bar:
            for keys, rows in self._chunks(images):
                scores, maps = self.inner.predict(self.inner.stack(rows))
                for (position, view), score, view_map in zip(keys, scores, maps):
                    pending[position].add(view, score, view_map)
                bar.update(len(keys))
                for position in {position for position, _ in keys}:
                    if pending[position].complete:  # finished now: its native sum is released (resized to out_size)
                        pending[position].finish(self.out_size)
        maps = [p.final for p in pending]
        scores = np.array([p.score for p in pending], dtype=np.float32)
        return scores, (np.stack(maps) if self.out_size is not None and maps else maps)

    def _chunks(self, images: Sequence[Image.Image]) -> Iterator[tuple[list[tuple[int, int]], list[Any]]]:
        """``((image position, view number), preprocessed view)`` in chunks of ``batch_size``, made lazily."""
        keys: list[tuple[int, int]] = []
        rows: list[Any] = []
        for position, image in enumerate(images):
            grid = tile_grid(image.size, self.spec)
            views = [None] + ([] if grid is None else grid.boxes())
            for number, box in enumerate(views):
                keys.append((position, number))
                rows.append(self.inner.preprocess(image if box is None else image.crop(box)))
                if len(rows) == self.batch_size:
                    yield keys, rows
                    keys, rows = [], []
        if rows:
            yield keys, rows


def image_array(images: Sequence[Image.Image]) -> np.ndarray:
    """Decoded images as a 1-d object array: a batch a :class:`~pipeline.engine.PerClassScorer` picks rows of."""
    stacked = np.empty(len(images), dtype=object)
    stacked[:] = list(images)
    return stacked


# --- the engine's batch sources ------------------------------------------------------------------


def scored_files(scorer: Scorer, files: Sequence[Path], batch_size: int, spec: TilingSpec,
                 progress: bool = True) -> Iterator[list[ScoredImage]]:
    """``files`` through the engine's loop, tiled when ``spec`` is on (maps at native size), else as they are."""
    if spec.enabled:
        scorer = TiledScorer(scorer, spec, batch_size, progress=progress)
    return score_batches(scorer, file_batches(files, scorer, batch_size, progress))


def keep_image(image: Image.Image) -> Image.Image:
    """The dataset transform of a tiled evaluation: the decoded image, unchanged (views are cut when scored)."""
    return image


def _as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def image_batches(dataset: AnomalyDataset, indices: Sequence[int], loader: LoaderSpec,
                  progress: bool = True) -> Iterator[Batch]:
    """The decoded images of ``dataset`` (made with ``transform=keep_image``) with their S x S masks.

    The tiled counterpart of :func:`pipeline.engine.dataset_batches`: images are decoded in the
    DataLoader's workers, each row keyed by its item's own index.
    """
    from torch.utils.data import DataLoader, Subset

    from dataset import loader_batches

    data_loader = DataLoader(Subset(dataset, list(indices)), batch_size=loader.batch_size, shuffle=False,
                             num_workers=loader.num_workers or 0, collate_fn=_as_list)
    with loader_batches(data_loader) as batches:
        for items in tqdm(batches, total=len(data_loader), desc="scoring", unit="batch", disable=not progress):
            images = image_array([item["img"] for item in items])
            yield Batch(indices=[int(item["index"]) for item in items], images=images,
                        sizes=[item["img"].size for item in items],
                        masks=np.stack([item["img_mask"][0].numpy().astype(np.uint8) for item in items]),
                        classes=[item["cls_name"] for item in items])


def dataset_stream(scorer: Scorer, dataset: AnomalyDataset, indices: Sequence[int], loader: LoaderSpec,
                   device: torch.device, spec: TilingSpec, progress: bool = True) -> tuple[Scorer, Iterator[Batch]]:
    """What scores a dataset shard and its batches: ``scorer`` and the engine's batches, or, tiled, a
    :class:`TiledScorer` whose maps are resized to the masks' grid (:func:`metrics_size`) and the decoded images."""
    if not spec.enabled:
        from pipeline.engine import dataset_batches

        return scorer, dataset_batches(dataset, indices, loader, device, progress)
    size = metrics_size(spec, scorer.image_size)

    def tiled(inner: Scorer) -> TiledScorer:
        return TiledScorer(inner, spec, loader.batch_size, out_size=(size, size), progress=progress)

    if isinstance(scorer, PerClassScorer):  # few-shot: each class's memory scores that class's tiles
        return PerClassScorer({name: tiled(inner) for name, inner in scorer.scorers.items()}), \
            image_batches(dataset, indices, loader, progress)
    return tiled(scorer), image_batches(dataset, indices, loader, progress)


# --- few-shot memory from tiles --------------------------------------------------------------------


def class_memory(inference: AnomalyCLIPInference, references: Sequence[Reference], settings: MemorySettings,
                 batch_size: int, info: dict[str, Any], spec: TilingSpec, progress: bool = True) -> PatchMemory:
    """A class's memory for a run with tiling ``spec``: :func:`build_tiled_memory`, or untiled the usual one."""
    if not spec.enabled:
        from pipeline.memory import build_class_memory

        return build_class_memory(inference, references, settings, batch_size, info, progress=progress)
    return build_tiled_memory(inference, references, settings, batch_size, info, spec, progress)


def build_tiled_memory(inference: AnomalyCLIPInference, references: Sequence[Reference], settings: MemorySettings,
                       batch_size: int, info: dict[str, Any], spec: TilingSpec, progress: bool = True) -> PatchMemory:
    """A class's memory from its references cut as test images are: the global view and every tile.

    The patches of tiles are at the scale a tiled test image's tiles show them. Each reference's
    views stay together (one reference = the patches of all its views), so the leave-one-out
    normalisation and calibration leave a whole reference out; references must therefore give
    the same number of views (images of one size, as from one camera).

    Raises:
        AnomalyCLIPError: References with different grids (named), or none.
    """
    import torch

    from AnomalyCLIP_lib.memory import memory_from_unit_tokens, normalized
    from AnomalyCLIP_lib.transform import image_transform

    if not references:
        raise AnomalyCLIPError(f"class {info.get('class_name')!r} has no reference image")
    transform = image_transform(inference.config.image_size)
    per_reference: list[list[torch.Tensor]] = []  # per reference: (1, V * P, D) unit tokens per layer
    counts: dict[int, str] = {}
    with tqdm(total=len(references), desc=f"memory {info.get('class_name', '')} (tiled)".strip(), unit="image",
              disable=None if progress else True) as bar:
        for reference in references:
            views = [transform(view) for view in image_views(load_image(reference.file), spec)]
            counts.setdefault(len(views), reference.file)
            chunks = [inference.reference_tokens(torch.stack(views[start:start + batch_size]), settings)
                      for start in range(0, len(views), batch_size)]
            per_reference.append([normalized(torch.cat(layer)).reshape(1, -1, int(layer[0].shape[-1]))
                                  for layer in zip(*chunks)])
            bar.update(1)
    if len(counts) > 1:
        shown = "; ".join(f"{file}: {count} views" for count, file in counts.items())
        raise AnomalyCLIPError(f"the references of class {info.get('class_name')!r} are cut into different tile grids "
                               f"({shown}): a tiled memory needs references of one size; give references of the "
                               "test images' size")
    unit = [torch.cat(layer) for layer in zip(*per_reference)]  # (K, V * P, D) per layer
    record = {**info, "k": len(references), "references": [ref.to_dict() for ref in references],
              "tiling": {"tile_size": spec.tile_size, "tile_overlap": spec.tile_overlap}}
    return memory_from_unit_tokens(unit, settings, record)


def check_memory_tiling(recorded: dict | None, spec: TilingSpec, source: str) -> None:
    """Refuse a memory built with other tiling than the run's (its patches are at another scale).

    Args:
        recorded: The memory's ``tiling`` record (its file's ``info``, or an export manifest's ``memory``).
    """
    ours = {"tile_size": spec.tile_size, "tile_overlap": spec.tile_overlap} if spec.enabled else None
    if recorded != ours:
        def shown(value: dict | None) -> str:
            return f"--tile_size {value['tile_size']} --tile_overlap {value['tile_overlap']}" if value else "untiled"

        raise AnomalyCLIPError(f"{source} was built {shown(recorded)} and this run is {shown(ours)}: its patches are "
                               "at another scale; build it again with this run's tiling (--reference_path DIR "
                               "--save_memory FILE)")


def metrics_size(spec: TilingSpec, image_size: int) -> int:
    """The side of the grid test.py compares maps and masks on: ``--metrics_resolution``, else ``--image_size``."""
    return spec.metrics_resolution if spec.enabled and spec.metrics_resolution else image_size


# --- records -------------------------------------------------------------------------------------


def tiling_record(spec: TilingSpec, eval_size: int | None = None) -> dict[str, object] | None:
    """The tiling of a run for ``results.json`` / ``predictions.json`` (``None`` when off)."""
    if not spec.enabled:
        return None
    record: dict[str, object] = {"tile_size": spec.tile_size, "tile_overlap": spec.tile_overlap,
                                 "map": MAP_RULE, "score": SCORE_RULE}
    if eval_size is not None:
        record["metrics_resolution"] = [eval_size, eval_size]
    return record
