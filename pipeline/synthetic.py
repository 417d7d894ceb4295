"""Synthetic anomaly-detection datasets with exact masks, for tests and the demo.

Two layouts, with different classes and textures so that one can train prompts on one and
evaluate zero-shot on the other:

* :func:`make_mvtec_like`: ``<class>/{train,test}/good/NNN.png``, ``<class>/test/<defect>/NNN.png``,
  ``<class>/ground_truth/<defect>/NNN_mask.png``; indexed with ``generate_dataset_json/folder.py``'s
  layout (the class names are not MVTec AD's). Default classes ``stripes checker rings``.
* :func:`make_visa_like`: ``<class>/Data/Images/{Normal,Anomaly}/*.JPG``,
  ``<class>/Data/Masks/Anomaly/NNN.png`` and ``split_csv/1cls.csv``; indexed with
  ``generate_dataset_json/visa.py``'s layout. Default classes ``blobs weave dots``.
* :func:`make_highres_like`: the MVTec layout at high resolution (default 2048 x 2048) with
  small defects, 10 to 30 pixels across (:func:`small_footprint`): what resizing to the model's
  input loses and tiling keeps (``test.py --tile_size``). Default class ``fabric`` (weave).

Normal images are a class texture (stripes, checker, rings, smooth blobs, weave, dot lattice)
in two class colours kept within 70..190 per channel, with a random phase per image and
integer noise in [-3, 3]. Defects (scratch, blob, hole, color_spot) are solid shapes in colours
far from any texture colour (near black or white, a ±70..100 shift, a saturated hue), so every
pixel of the shape changes visibly. A mask is exactly the set of pixels that the defect
changed (0/255 ``'L'`` PNG). Everything is drawn from ``numpy.random.default_rng`` seeded with
(seed, layout, class index): the same arguments give byte-identical files.

Command line::

    python synthetic_dataset.py --layout mvtec --root data/synth_mvtec --seed 0 --size 128
    python synthetic_dataset.py --layout highres --root data/synth_highres      # 2048 x 2048, defects 10-30 px
"""

from __future__ import annotations

import csv
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from pipeline.cli import cli_parser, run_cli
from generate_dataset_json import visa
from generate_dataset_json.folder import folder_layout
from generate_dataset_json.command import summary_table
from generate_dataset_json.indexer import index_dataset
from generate_dataset_json.schema import MetaIndex

TEXTURES = ("stripes", "checker", "rings", "blobs", "weave", "dots")
DEFECTS = ("scratch", "blob", "hole", "color_spot")
MVTEC_CLASSES = ("stripes", "checker", "rings")
VISA_CLASSES = ("blobs", "weave", "dots")
HIGHRES_CLASSES = ("fabric",)
HIGHRES_SIZE = 2048
HIGHRES_DEFECT_PIXELS = (10, 30)  # smallest and largest extent of a high-resolution defect
_LAYOUT_IDS = {"mvtec": 0, "visa": 1, "highres": 2}
_TEXTURE_OFFSETS = {"mvtec": 0, "visa": 3, "highres": 4}
_SPOT_COLOURS = np.array([[230, 25, 25], [25, 200, 40], [30, 40, 230], [225, 30, 215], [240, 220, 20]])


@dataclass(frozen=True)
class ClassStyle:
    """The look of one class: texture kind, two colours and the pattern scale (pixels)."""

    texture: str
    base: tuple[int, int, int]
    accent: tuple[int, int, int]
    period: float
    angle: float


def class_style(texture: str, rng: np.random.Generator, size: tuple[int, int]) -> ClassStyle:
    """Draw the colours and scale of a class with texture ``texture`` (one of :data:`TEXTURES`)."""
    if texture not in TEXTURES:
        raise AnomalyCLIPError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")
    base = rng.integers(80, 181, 3)
    accent = np.clip(base + rng.choice([-1, 1], 3) * rng.integers(45, 80, 3), 70, 190)
    period = min(size) * rng.uniform(0.08, 0.16)
    return ClassStyle(texture, tuple(int(v) for v in base), tuple(int(v) for v in accent),
                      float(period), float(rng.uniform(0, np.pi)))


def _pattern(style: ClassStyle, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """The texture's weight of the accent colour, (H, W) in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase, period = rng.uniform(0, 2 * np.pi), style.period
    if style.texture == "stripes":
        along = x * np.cos(style.angle) + y * np.sin(style.angle)
        return 0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase)
    if style.texture == "checker":
        cell = max(2, int(round(period)))
        dx, dy = rng.integers(0, cell, 2)
        return (((x + dx) // cell + (y + dy) // cell) % 2).astype(np.float64)
    if style.texture == "rings":
        cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / period + phase)
    if style.texture == "blobs":
        coarse = rng.uniform(0, 255, (max(2, int(height / period) + 2), max(2, int(width / period) + 2)))
        smooth = Image.fromarray(coarse.astype(np.uint8), mode="L").resize((width, height), Image.BICUBIC)
        return np.asarray(smooth, dtype=np.float64) / 255.0
    if style.texture == "weave":
        return 0.5 + 0.5 * np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase / 2)
    dx, dy = rng.uniform(0, period, 2)  # dots: a lattice of discs
    fx, fy = (x + dx) % period - period / 2, (y + dy) % period - period / 2
    return (np.hypot(fx, fy) < period * 0.3).astype(np.float64)


def render_normal(style: ClassStyle, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One normal image of the class, uint8 (H, W, 3) with values in 67..193."""
    width, height = size
    weight = _pattern(style, rng, width, height)[..., None]
    image = np.array(style.base) * (1 - weight) + np.array(style.accent) * weight
    image = np.rint(image) + rng.integers(-3, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """The boolean (H, W) footprint of one defect of ``kind``, drawn without antialiasing."""
    width, height = size
    side = min(size)
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    if kind == "scratch":
        points = [(cx, cy)]
        for _ in range(int(rng.integers(2, 4))):
            step, angle = rng.uniform(0.12, 0.25) * side, rng.uniform(0, 2 * np.pi)
            points.append((float(np.clip(points[-1][0] + step * np.cos(angle), 1, width - 2)),
                           float(np.clip(points[-1][1] + step * np.sin(angle), 1, height - 2))))
        draw.line(points, fill=255, width=max(2, side // 50))
    elif kind == "blob":
        for _ in range(int(rng.integers(2, 4))):
            rx, ry = np.maximum(2.0, rng.uniform(0.05, 0.1, 2) * side)
            ox, oy = rng.uniform(-0.06, 0.06, 2) * side
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    elif kind == "hole":
        radius = max(3.0, rng.uniform(0.06, 0.1) * side)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif kind == "color_spot":
        rx, ry = np.maximum(3.0, rng.uniform(0.05, 0.09, 2) * side)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        raise AnomalyCLIPError(f"unknown defect {kind!r}; choose one of {', '.join(DEFECTS)}")
    return np.asarray(canvas) > 0


def small_footprint(kind: str, rng: np.random.Generator, size: tuple[int, int],
                    extent: tuple[int, int] = HIGHRES_DEFECT_PIXELS) -> np.ndarray:
    """The boolean (H, W) footprint of a small defect of ``kind``, ``extent`` pixels across (drawn uniformly).

    A scratch is a straight line of that length, 2 to 3 pixels wide; the others are discs or
    ellipses of that diameter. Placed at least 32 pixels from the border.
    """
    if kind not in DEFECTS:
        raise AnomalyCLIPError(f"unknown defect {kind!r}; choose one of {', '.join(DEFECTS)}")
    width, height = size
    across = float(rng.uniform(*extent))
    margin = 32 + across
    cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = across / 2 * np.cos(angle), across / 2 * np.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(2, 4)))
    else:
        rx = across / 2
        ry = rx if kind == "hole" else rx * rng.uniform(0.6, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(canvas) > 0


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
               footprint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` (one of :data:`DEFECTS`) on a copy of ``image``.

    Args:
        image: uint8 (H, W, 3) normal image.
        kind: ``scratch``, ``blob``, ``hole`` or ``color_spot``.
        rng: The random generator.
        footprint: Where to paint (boolean (H, W)); default: a shape of ``kind`` sized to the image.

    Returns:
        The defective image and its mask, uint8 (H, W) 0/255: exactly the changed pixels.
    """
    height, width = image.shape[:2]
    if footprint is None:
        footprint = _shape(kind, rng, (width, height))
    pixels = image[footprint].astype(np.int64)
    noise = rng.integers(-3, 4, pixels.shape)
    if kind == "scratch":
        level = 15 if image.mean() > 128 else 240
        painted = np.full_like(pixels, level) + noise
    elif kind == "hole":
        painted = np.full_like(pixels, 8) + noise
    elif kind == "blob":
        shift = int(rng.integers(70, 101))
        painted = np.where(pixels >= 128, pixels - shift, pixels + shift) + noise
    else:
        distance = np.abs(_SPOT_COLOURS[:, None, :] - image.reshape(-1, 3)[None].astype(np.int64)).sum(-1).min(1)
        painted = _SPOT_COLOURS[int(np.argmax(distance))] + noise
    defective = image.copy()
    defective[footprint] = np.clip(painted, 0, 255).astype(np.uint8)
    mask = (defective != image).any(-1)
    return defective, (mask * 255).astype(np.uint8)


def _texture_for(name: str, index: int, layout: str) -> str:
    return name if name in TEXTURES else TEXTURES[(index + _TEXTURE_OFFSETS[layout]) % len(TEXTURES)]


def _samples(layout: str, class_names: Iterable[str], n_normal: int, n_defect: int, size: tuple[int, int],
             seed: int, defect_pixels: tuple[int, int] | None = None
             ) -> Iterable[tuple[str, list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray]]]]:
    """For each class: its name, ``n_normal`` normal images and ``n_defect`` (defect, image, mask).

    ``defect_pixels``: small defects of that extent (:func:`small_footprint`); default: sized to the image.
    """
    for index, name in enumerate(class_names):
        rng = np.random.default_rng([seed, _LAYOUT_IDS[layout], index])
        style = class_style(_texture_for(name, index, layout), rng, size)
        normals = [render_normal(style, rng, size) for _ in range(n_normal)]
        defects = []
        for number in range(n_defect):
            kind = DEFECTS[number % len(DEFECTS)]
            image = render_normal(style, rng, size)
            footprint = None if defect_pixels is None else small_footprint(kind, rng, size, defect_pixels)
            defects.append((kind, *add_defect(image, kind, rng, footprint)))
        yield name, normals, defects


def _prepare_root(root: Path, paths: Iterable[str], overwrite: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    existing = [p for p in paths if (root / p).exists()]
    if existing and not overwrite:
        raise AnomalyCLIPError(
            f"{root} already holds {', '.join(existing)}; choose an empty folder or pass overwrite=True (--overwrite)"
        )
    for name in existing:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


def _save(array: np.ndarray, path: Path, **options: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)


def make_mvtec_like(root: str | Path, class_names: Iterable[str] = MVTEC_CLASSES, n_train: int = 8,
                    n_test_good: int = 4, n_test_defect: int = 8, image_size: tuple[int, int] = (128, 128),
                    seed: int = 0, write_meta: bool = True, overwrite: bool = False) -> MetaIndex | None:
    """Write an MVTec-layout synthetic dataset (defect types round-robin over :data:`DEFECTS`).

    Args:
        root: Output folder (created).
        class_names: Class folder names; a name of :data:`TEXTURES` picks that texture.
        n_train: Normal training images per class.
        n_test_good: Normal test images per class.
        n_test_defect: Defective test images per class.
        image_size: (width, height).
        seed: Random seed.
        write_meta: Also write ``meta.json`` (``folder.py`` layout).
        overwrite: Replace the class folders and meta.json if they exist.

    Returns:
        The meta.json index, or ``None`` when ``write_meta`` is false.
    """
    root, class_names = Path(root), list(class_names)
    _prepare_root(root, [*class_names, "meta.json"], overwrite)
    for name, normals, defects in _samples("mvtec", class_names, n_train + n_test_good, n_test_defect,
                                           tuple(image_size), seed):
        _write_mvtec_class(root, name, normals, defects, n_train)
    return index_dataset(folder_layout(classes=tuple(class_names)), root) if write_meta else None


def make_highres_like(root: str | Path, class_names: Iterable[str] = HIGHRES_CLASSES, n_train: int = 4,
                      n_test_good: int = 4, n_test_defect: int = 8,
                      image_size: tuple[int, int] = (HIGHRES_SIZE, HIGHRES_SIZE), seed: int = 0,
                      write_meta: bool = True, overwrite: bool = False,
                      defect_pixels: tuple[int, int] = HIGHRES_DEFECT_PIXELS) -> MetaIndex | None:
    """Write a high-resolution MVTec-layout dataset whose defects are ``defect_pixels`` across (module docstring).

    Arguments as :func:`make_mvtec_like`; textures keep their scale relative to the image (a
    pattern period of 8-16 % of the side), so the defects are small against them too.
    """
    root, class_names = Path(root), list(class_names)
    _prepare_root(root, [*class_names, "meta.json"], overwrite)
    for name, normals, defects in _samples("highres", class_names, n_train + n_test_good, n_test_defect,
                                           tuple(image_size), seed, tuple(defect_pixels)):
        _write_mvtec_class(root, name, normals, defects, n_train)
    return index_dataset(folder_layout(classes=tuple(class_names)), root) if write_meta else None


def _write_mvtec_class(root: Path, name: str, normals: list[np.ndarray],
                       defects: list[tuple[str, np.ndarray, np.ndarray]], n_train: int) -> None:
    for number, image in enumerate(normals):
        split, offset = ("train", 0) if number < n_train else ("test", n_train)
        _save(image, root / name / split / "good" / f"{number - offset:03d}.png")
    counters: dict[str, int] = {}
    for kind, image, mask in defects:
        number = counters[kind] = counters.get(kind, -1) + 1
        _save(image, root / name / "test" / kind / f"{number:03d}.png")
        _save(mask, root / name / "ground_truth" / kind / f"{number:03d}_mask.png")


def make_visa_like(root: str | Path, class_names: Iterable[str] = VISA_CLASSES, n_train: int = 8,
                   n_test_good: int = 4, n_test_defect: int = 8, image_size: tuple[int, int] = (128, 128),
                   seed: int = 0, write_meta: bool = True, overwrite: bool = False) -> MetaIndex | None:
    """Write a VisA-layout synthetic dataset (JPEG images, PNG masks, ``split_csv/1cls.csv``).

    Arguments as :func:`make_mvtec_like`; ``meta.json`` is written with ``visa.py``'s layout.
    """
    root, class_names = Path(root), list(class_names)
    _prepare_root(root, [*class_names, "split_csv", "meta.json"], overwrite)
    rows = []
    for name, normals, defects in _samples("visa", class_names, n_train + n_test_good, n_test_defect,
                                           tuple(image_size), seed):
        for number, image in enumerate(normals):
            path = f"{name}/Data/Images/Normal/{number:04d}.JPG"
            _save(image, root / path, quality=95)
            rows.append([name, "train" if number < n_train else "test", "normal", path, ""])
        for number, (_, image, mask) in enumerate(defects):
            path = f"{name}/Data/Images/Anomaly/{number:03d}.JPG"
            mask_path = f"{name}/Data/Masks/Anomaly/{number:03d}.png"
            _save(image, root / path, quality=95)
            _save(mask, root / mask_path)
            rows.append([name, "test", "anomaly", path, mask_path])
    (root / "split_csv").mkdir(exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows([["object", "split", "label", "image", "mask"], *rows])
    return index_dataset(visa.LAYOUT, root) if write_meta else None


def main(argv: list[str] | None = None) -> int:
    """Command line: write one synthetic dataset and its meta.json, print the counts.

    Raises:
        AnomalyCLIPError: The root already holds a class (without ``--overwrite``); run it through
            :func:`pipeline.cli.run_cli` for the one-line error.
    """
    parser = cli_parser("Write a synthetic anomaly-detection dataset with exact masks.")
    parser.add_argument("--layout", choices=sorted(_LAYOUT_IDS), required=True)
    parser.add_argument("--root", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                        help=f"image size: SIDE, or WIDTH HEIGHT (default 128; highres: {HIGHRES_SIZE})")
    parser.add_argument("--classes", nargs="+", default=None, help="class names (default: the layout's three)")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defect", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true", help="replace existing class folders")
    args = parser.parse_args(argv)
    args.size = args.size or [HIGHRES_SIZE if args.layout == "highres" else 128]
    if len(args.size) > 2 or min(args.size) < 8:
        parser.error("--size takes SIDE or WIDTH HEIGHT, each at least 8")
    for flag in ("n_train", "n_test_good", "n_test_defect"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 0")
    for name in args.classes or ():
        if not name.strip() or name in (".", "..") or any(sep in name for sep in "/\\"):
            parser.error(f"--classes {name!r} is not a folder name: use names without / or \\")
    if args.classes and len(set(args.classes)) != len(args.classes):
        parser.error(f"--classes {' '.join(args.classes)} repeats a class")
    if args.layout == "highres" and min(args.size) < 2 * (32 + HIGHRES_DEFECT_PIXELS[1]) + 1:
        parser.error(f"--size of the highres layout must be at least {2 * (32 + HIGHRES_DEFECT_PIXELS[1]) + 1}")
    make = {"mvtec": make_mvtec_like, "visa": make_visa_like, "highres": make_highres_like}[args.layout]
    defaults = {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES, "highres": HIGHRES_CLASSES}[args.layout]
    index = make(args.root, args.classes or defaults, args.n_train, args.n_test_good, args.n_test_defect,
                 (args.size[0], args.size[-1]), args.seed, overwrite=args.overwrite)
    print(f"wrote a {args.layout}-layout synthetic dataset and {Path(args.root) / 'meta.json'}")
    print(summary_table(index))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
