"""Tiled scoring (pipeline/tiling.py): the grid, exact and seamless stitching, the combination rule, the CLIs."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import prediction, tiling
from pipeline.cli import run_cli
from pipeline.config import TilingSpec
from tests.conftest import E2E_IMAGE_SIZE

# --- the grid ------------------------------------------------------------------------------------


def test_axis_starts_by_hand():
    # 1000 px, tiles of 512, overlap 0.25: stride 384, ceil(488 / 384) + 1 = 3 tiles spread over 0..488.
    assert tiling.axis_starts(1000, 512, 0.25) == (0, 244, 488)
    # 4000 px: ceil(3488 / 384) + 1 = 11 tiles, start i at round(i * 3488 / 10).
    assert tiling.axis_starts(4000, 512, 0.25) == (0, 349, 698, 1046, 1395, 1744, 2093, 2442, 2790, 3139, 3488)
    assert tiling.axis_starts(512, 512, 0.25) == (0,)  # one tile fits: no grid
    assert tiling.axis_starts(513, 512, 0.25) == (0, 1)
    assert tiling.axis_starts(1024, 512, 0.0) == (0, 512)  # no overlap: the tiles abut


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("length", [65, 100, 257, 1000, 3001])
def test_axis_starts_cover_with_the_overlap(length, overlap):
    tile = 64
    starts = np.array(tiling.axis_starts(length, tile, overlap))
    assert starts[0] == 0 and starts[-1] == length - tile
    overlaps = starts[:-1] + tile - starts[1:]
    assert overlaps.min() >= np.floor(overlap * tile) - 1  # at least the asked share (rounding of the starts)
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start:start + tile] = True
    assert covered.all()


def test_small_images_are_scored_whole():
    spec = TilingSpec(tile_size=512)
    assert tiling.tile_grid((512, 512), spec) is None and tiling.tile_grid((300, 40), spec) is None
    assert tiling.tile_grid((4000, 3000), TilingSpec()) is None  # tiling off
    grid = tiling.tile_grid((1000, 300), spec)  # wider than a tile only: one row of full-height tiles
    assert (grid.tile_width, grid.tile_height, grid.xs, grid.ys) == (512, 300, (0, 244, 488), (0,))
    assert grid.boxes() == [(0, 0, 512, 300), (244, 0, 756, 300), (488, 0, 1000, 300)]


# --- stitching -----------------------------------------------------------------------------------


def _stitch(grid, tile_maps):
    stitcher = tiling.Stitcher(grid)
    for number, tile_map in enumerate(tile_maps):
        stitcher.add(number, tile_map)
    return stitcher.result()


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_a_function_of_position_comes_back_unchanged(overlap):
    """Every tile shows the same map at its own pixels: the stitched map is that map (random, so any map)."""
    truth = np.random.default_rng(1).random((300, 410), dtype=np.float32)
    grid = tiling.tile_grid((410, 300), TilingSpec(64, overlap))
    stitched = _stitch(grid, [truth[top:bottom, left:right] for left, top, right, bottom in grid.boxes()])
    assert stitched.shape == truth.shape and stitched.dtype == np.float32
    np.testing.assert_allclose(stitched, truth, rtol=2e-6, atol=0)


def test_no_seams_where_tiles_disagree():
    """Tiles holding different constants: the stitched map changes by at most ~2 x contrast / overlap per pixel;
    equal constants give that constant everywhere."""
    grid = tiling.tile_grid((400, 300), TilingSpec(64, 0.25))
    values = np.random.default_rng(2).random(grid.count).astype(np.float32)
    stitched = _stitch(grid, [np.full((64, 64), value, np.float32) for value in values])
    ramp = min(a + 64 - b for starts in (grid.xs, grid.ys) for a, b in zip(starts, starts[1:]))
    contrast = values.max() - values.min()
    steps = max(np.abs(np.diff(stitched, axis=0)).max(), np.abs(np.diff(stitched, axis=1)).max())
    assert ramp >= 16 and steps <= 2 * contrast / ramp + 1e-6
    # Centre-keeping would jump by the neighbours' full difference somewhere.
    assert max(abs(values[i] - values[i + 1]) for i in range(len(grid.xs) - 1)) > 4 * steps
    constant = _stitch(grid, [np.full((64, 64), 0.37, np.float32)] * grid.count)
    np.testing.assert_allclose(constant, 0.37, rtol=1e-6)


# --- the scorer around a scorer ------------------------------------------------------------------


class _PixelScorer:
    """Scores a ``'F'`` image: the map is the view resized to S x S (nearest), the score its mean."""

    image_size = 32
    patch_size = 4

    def __init__(self):
        self.batches = []

    def preprocess(self, image):
        return np.asarray(image.resize((self.image_size, self.image_size), Image.NEAREST), dtype=np.float32)

    def stack(self, rows):
        return np.stack(rows)

    def predict(self, images):
        self.batches.append(len(images))
        return images.mean(axis=(1, 2)), images.copy()


def _position_image(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return np.sin(x / 7.0) + np.cos(y / 5.0) + 2.0


def test_tiled_scorer_applies_the_rule_in_batches():
    """T = S: each tile's map is the image's pixels there, so the stitched map is the image; the result is its
    maximum with the global map resized bilinearly (Pillow), and the score the largest view score."""
    values = _position_image(100, 70).astype(np.float32)
    image = Image.fromarray(values)
    inner = _PixelScorer()
    spec = TilingSpec(32, 0.25)
    scorer = tiling.TiledScorer(inner, spec, batch_size=4, progress=False)
    scores, maps = scorer.predict(scorer.stack([scorer.preprocess(image)]))
    grid = tiling.tile_grid((100, 70), spec)
    assert inner.batches == _chunks(1 + grid.count, 4)  # every view through the model, 4 at a time
    global_view = np.asarray(image.resize((32, 32), Image.NEAREST), np.float32)
    upsampled = np.asarray(Image.fromarray(global_view).resize((100, 70), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(maps[0], np.maximum(values, upsampled), rtol=2e-6)
    view_scores = [global_view.mean()] + [values[t:b, l:r].mean() for l, t, r, b in grid.boxes()]
    assert scores[0] == pytest.approx(max(view_scores), rel=1e-6)


def _chunks(count, size):
    return [size] * (count // size) + ([count % size] if count % size else [])


def test_an_image_no_larger_than_a_tile_is_scored_as_without_tiling():
    values = _position_image(30, 20).astype(np.float32)
    inner = _PixelScorer()
    scorer = tiling.TiledScorer(inner, TilingSpec(32), batch_size=8, progress=False)
    scores, maps = scorer.predict([Image.fromarray(values)])
    expected = inner.preprocess(Image.fromarray(values))
    assert np.array_equal(maps[0], expected) and scores[0] == expected.mean() and inner.batches == [1]


def test_tile_smaller_than_the_models_patch_is_refused():
    with pytest.raises(Exception, match="--tile_size 3 is smaller than the model's patch size \\(4 pixels\\)"):
        tiling.TiledScorer(_PixelScorer(), TilingSpec(3), batch_size=1)


def test_views_for_a_memory_are_the_global_view_and_the_tiles():
    image = Image.fromarray(_position_image(100, 70).astype(np.float32))
    views = tiling.image_views(image, TilingSpec(32))
    grid = tiling.tile_grid((100, 70), TilingSpec(32))
    assert len(views) == 1 + grid.count and views[0] is image
    assert [view.size for view in views[1:]] == [(32, 32)] * grid.count
    rows = tiling.preprocessed_views(image, _PixelScorer(), TilingSpec(32))
    assert np.array_equal(rows[2], np.asarray(image.crop(grid.boxes()[1]), np.float32))


# --- test_one_example.py -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_image(tmp_path_factory):
    """A 4000 x 3000 part (a synthetic texture, upscaled) with a dark 20-pixel scratch."""
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(3)
    small = rng.integers(90, 170, (60, 80, 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((4000, 3000), Image.BICUBIC))
    pixels[1500:1520, 2000:2300] = 10
    Image.fromarray(pixels).save(folder / "part.png")
    return folder / "part.png"


def test_one_example_tiled_writes_native_size_mask_and_overlay(large_image, trained_checkpoint, design_args,
                                                               tmp_path):
    out = tmp_path / "out"
    assert run_cli(prediction.main, ["--image_path", str(large_image), "--checkpoint_path", str(trained_checkpoint),
                                     "--save_path", str(out), "--tile_size", "512", "--threshold", "0.5",
                                     "--pixel_threshold", "0.5", "--batch_size", "16", *design_args]) == 0
    with Image.open(out / "part.png.mask.png") as mask, Image.open(out / "part.png.overlay.png") as overlay:
        assert mask.size == (4000, 3000) and overlay.size == (4000, 3000)
        mask_pixels = np.asarray(mask)
    document = json.loads((out / "predictions.json").read_text())
    row = document["predictions"][0]
    assert row["defect_pixels"] == int(np.count_nonzero(mask_pixels))
    assert row["tiles"] == {"columns": 11, "rows": 8, "tile": [512, 512],
                            "x": [0, 349, 698, 1046, 1395, 1744, 2093, 2442, 2790, 3139, 3488],
                            "y": [0, 355, 711, 1066, 1422, 1777, 2133, 2488]}  # round(i * 2488 / 7)
    assert document["tiling"]["tile_size"] == 512 and document["tiling"]["tile_overlap"] == 0.25


def _scored(files, checkpoint, design_args, *extra):
    config = prediction.parse_args(["--image_path", str(files[0]), "--checkpoint_path", str(checkpoint),
                                    *design_args, *extra])
    return list(prediction.scored_files(config, files, None))


def test_tiled_maps_follow_the_views_of_the_model(trained_checkpoint, design_args, tmp_path):
    """Scores and maps of a tiled image through test_one_example's path equal the rule applied by hand to the
    module's own outputs for each view; an image no larger than a tile keeps its untiled score and map."""
    import torch

    from AnomalyCLIP_lib.transform import image_transform
    from pipeline.loading import inference_module

    rng = np.random.default_rng(4)
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(big)
    Image.fromarray(rng.integers(0, 255, (60, 64, 3), dtype=np.uint8)).save(small)
    (_, size, score, native), (_, _, small_score, small_map) = _scored(
        [big, small], trained_checkpoint, design_args, "--tile_size", "64", "--batch_size", "5")
    assert size == (200, 150) and native.shape == (150, 200)
    untiled = _scored([small], trained_checkpoint, design_args)[0]
    assert small_score == pytest.approx(untiled[2], abs=1e-6) and np.allclose(small_map, untiled[3], atol=1e-6)

    config = prediction.parse_args(["--image_path", str(big), "--checkpoint_path", str(trained_checkpoint),
                                    *design_args])
    module = inference_module(config.model, config.scoring, torch.device("cpu"))
    image = Image.open(big)
    grid = tiling.tile_grid(image.size, TilingSpec(64))
    transform = image_transform(E2E_IMAGE_SIZE)
    views = torch.stack([transform(image)] + [transform(image.crop(box)) for box in grid.boxes()])
    result = module.predict(views)
    view_scores, view_maps = result.scores.numpy(), result.maps.numpy()
    assert score == pytest.approx(float(view_scores.max()), abs=1e-5)
    total, weights = np.zeros((150, 200)), np.zeros((150, 200))
    ramp_x = min(a + 64 - b for a, b in zip(grid.xs, grid.xs[1:]))
    ramp_y = min(a + 64 - b for a, b in zip(grid.ys, grid.ys[1:]))
    for (left, top, right, bottom), tile_map in zip(grid.boxes(), view_maps[1:]):
        up = np.asarray(Image.fromarray(tile_map).resize((64, 64), Image.BILINEAR), np.float64)
        weight = np.outer(_window(top, 64, 150, ramp_y), _window(left, 64, 200, ramp_x))
        total[top:bottom, left:right] += up * weight
        weights[top:bottom, left:right] += weight
    global_up = np.asarray(Image.fromarray(view_maps[0]).resize((200, 150), Image.BILINEAR), np.float64)
    np.testing.assert_allclose(native, np.maximum(total / weights, global_up), atol=1e-5)


def _window(start, extent, length, ramp):
    """The linear-ramp window written out: distance from each inner edge over the ramp, capped at 1."""
    window = []
    for offset in range(extent):
        value = 1.0
        if start > 0:
            value = min(value, (offset + 0.5) / ramp)
        if start + extent < length:
            value = min(value, (extent - offset - 0.5) / ramp)
        window.append(value)
    return np.array(window)


def test_calibration_counts_native_pixels_and_records_the_tiling(large_image, trained_checkpoint, design_args,
                                                                 tmp_path, capsys):
    folder = tmp_path / "good"
    folder.mkdir()
    Image.open(large_image).resize((700, 500)).save(folder / "a.png")
    Image.open(large_image).resize((40, 30)).save(folder / "b.png")  # no larger than a tile: scored whole
    saved = tmp_path / "thresholds.json"
    common = ["--checkpoint_path", str(trained_checkpoint), *design_args]
    assert run_cli(prediction.main, ["--image_path", str(folder), "--calibrate", "--save_thresholds", str(saved),
                                     "--tile_size", "256", *common]) == 0
    entry = json.loads(saved.read_text())["classes"]["good"]
    assert entry["n_pixels"] == 700 * 500 + E2E_IMAGE_SIZE**2
    assert entry["provenance"]["tile_size"] == 256 and entry["provenance"]["tile_overlap"] == 0.25
    capsys.readouterr()
    # Thresholds of a tiled calibration are refused on an untiled run, and the other way round.
    assert run_cli(prediction.main, ["--image_path", str(folder), "--thresholds", str(saved),
                                     "--save_path", str(tmp_path / "o1"), *common]) == 2
    assert "--tile_size none against the thresholds' 256" in capsys.readouterr().err
    assert run_cli(prediction.main, ["--image_path", str(folder), "--thresholds", str(saved), "--tile_size", "256",
                                     "--tile_overlap", "0.5", "--save_path", str(tmp_path / "o2"), *common]) == 2
    assert "--tile_overlap 0.5 against the thresholds' 0.25" in capsys.readouterr().err
    assert run_cli(prediction.main, ["--image_path", str(folder), "--thresholds", str(saved), "--accept_thresholds",
                                     "--save_path", str(tmp_path / "o3"), *common]) == 0
    accepted = json.loads((tmp_path / "o3" / "predictions.json").read_text())["thresholds"]["accepted_other_settings"]
    assert any("--tile_size" in line for line in accepted)


def test_untiled_thresholds_refused_on_a_tiled_run(trained_checkpoint, design_args, tmp_path, capsys):
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.full((80, 90, 3), 128, np.uint8)).save(image)
    saved = tmp_path / "thresholds.json"
    common = ["--image_path", str(image.parent), "--checkpoint_path", str(trained_checkpoint), *design_args]
    assert run_cli(prediction.main, [*common, "--calibrate", "--save_thresholds", str(saved)]) == 0
    capsys.readouterr()
    assert run_cli(prediction.main, [*common, "--thresholds", str(saved), "--tile_size", "64",
                                     "--save_path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tile_size 64 against the thresholds' none" in err


@pytest.mark.parametrize("flags, message", [
    (["--tile_size", "8"], "--tile_size 8 is smaller than the model's patch size (14 pixels)"),
    (["--tile_size", "512", "--tile_overlap", "0.95"], "--tile_overlap 0.95 must be a fraction in [0, 0.9]"),
    (["--tile_size", "512", "--tile_overlap", "-0.1"], "--tile_overlap -0.1 must be a fraction in [0, 0.9]"),
    (["--tile_overlap", "0.5"], "--tile_overlap goes with --tile_size N"),
])
def test_bad_tiling_flags_are_one_line(flags, message, trained_checkpoint, design_args, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    argv = ["--image_path", str(image), "--checkpoint_path", str(trained_checkpoint), "--save_path",
            str(tmp_path / "out"), *design_args, *flags]
    assert run_cli(prediction.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_decompression_bomb_stays_refused_when_tiled(trained_checkpoint, design_args, tmp_path, capsys,
                                                      monkeypatch):
    image = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)  # the file is over twice the limit
    argv = ["--image_path", str(image), "--checkpoint_path", str(trained_checkpoint), "--save_path",
            str(tmp_path / "out"), "--tile_size", "64", *design_args]
    assert run_cli(prediction.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more pixels than Pillow decodes safely" in err and "bomb.png" in err


# --- test.py -------------------------------------------------------------------------------------


def _evaluate(data_root, save_path, checkpoint, design_args, *extra):
    from pipeline import evaluation

    return run_cli(evaluation.main, ["--data_path", str(data_root), "--save_path", str(save_path), "--checkpoint_path",
                                     str(checkpoint), "--batch_size", "4", "--num_workers", "0",
                                     "--dump", str(save_path / "dump.npz"), *design_args, *extra])


def test_test_py_tiled_evaluates_at_the_masks_grid(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    """test.py --tile_size: each map is the image's stitched native map resized to S x S (the masks' grid, recorded),
    the same map test_one_example.py stitches; thresholds record the tiling."""
    target = synthetic_datasets[1]  # 64 x 48 images: a grid of 3 x 2 tiles of 32 px
    out = tmp_path / "tiled"
    assert _evaluate(target, out, trained_checkpoint, design_args, "--tile_size", "32") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tiling"]["metrics_resolution"] == [E2E_IMAGE_SIZE, E2E_IMAGE_SIZE]
    assert results["tiling"]["tile_size"] == 32 and results["config"]["tile_size"] == 32
    dump = np.load(out / "dump.npz")
    assert dump["maps"].shape[1:] == (E2E_IMAGE_SIZE, E2E_IMAGE_SIZE) and dump["maps"].dtype == np.float32
    files = [target / path for path in dump["img_paths"][:2]]
    for number, (_, size, score, native) in enumerate(_scored(files, trained_checkpoint, design_args,
                                                              "--tile_size", "32")):
        assert size == (64, 48) and native.shape == (48, 64)
        assert dump["scores"][number] == pytest.approx(score, abs=1e-5)
        expected = np.asarray(Image.fromarray(native).resize((E2E_IMAGE_SIZE,) * 2, Image.BILINEAR), np.float32)
        np.testing.assert_allclose(dump["maps"][number], expected, atol=1e-5)
    provenance = next(iter(json.loads((out / "thresholds.json").read_text())["classes"].values()))["provenance"]
    assert provenance["tile_size"] == 32 and provenance["tile_overlap"] == 0.25


def test_test_py_with_tiles_larger_than_every_image_equals_untiled(synthetic_datasets, trained_checkpoint,
                                                                   design_args, tmp_path):
    target = synthetic_datasets[1]
    assert _evaluate(target, tmp_path / "plain", trained_checkpoint, design_args) == 0
    assert _evaluate(target, tmp_path / "whole", trained_checkpoint, design_args, "--tile_size", "64") == 0
    plain, whole = np.load(tmp_path / "plain" / "dump.npz"), np.load(tmp_path / "whole" / "dump.npz")
    for key in ("scores", "maps", "masks"):
        assert np.array_equal(plain[key], whole[key]), key
    assert (tmp_path / "plain" / "scores.csv").read_bytes() == (tmp_path / "whole" / "scores.csv").read_bytes()


def test_test_py_refuses_bad_tiling_flags_in_one_line(synthetic_datasets, trained_checkpoint, design_args, tmp_path,
                                                      capsys):
    assert _evaluate(synthetic_datasets[1], tmp_path / "out", trained_checkpoint, design_args,
                     "--tile_size", "8") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tile_size 8 is smaller than the model's patch size (14 pixels)" in err
    assert not (tmp_path / "out" / "results.json").exists()


# --- few-shot memory -----------------------------------------------------------------------------


def test_tiled_memory_holds_each_references_views_together(trained_checkpoint, design_args, tmp_path):
    """The memory of tiled references: per reference, the unit patch tokens of its global view then its tiles, in
    order, each view's tokens as the module gives them alone."""
    import torch

    from AnomalyCLIP_lib.memory_config import MemorySettings
    from AnomalyCLIP_lib.transform import image_transform
    from pipeline.loading import inference_module
    from pipeline.memory import Reference

    rng = np.random.default_rng(6)
    references = []
    for number in range(2):
        path = tmp_path / f"ref{number}.png"
        Image.fromarray(rng.integers(0, 255, (48, 90, 3), dtype=np.uint8)).save(path)
        references.append(Reference(str(path), path.name, f"{number:064d}"))
    config = prediction.parse_args(["--image_path", str(references[0].file), "--checkpoint_path",
                                    str(trained_checkpoint), *design_args])
    module = inference_module(config.model, config.scoring, torch.device("cpu"))
    settings = MemorySettings(layers=(12, 24))
    spec = TilingSpec(32)
    memory = tiling.build_tiled_memory(module, references, settings, 3, {"class_name": "parts"}, spec,
                                       progress=False)
    grid = tiling.tile_grid((90, 48), spec)
    patches = (E2E_IMAGE_SIZE // 14) ** 2
    assert memory.rows == 2 * (1 + grid.count) * patches and memory.reference_count == 2
    assert memory.info["tiling"] == {"tile_size": 32, "tile_overlap": 0.25}
    transform = image_transform(E2E_IMAGE_SIZE)
    image = Image.open(references[1].file)
    views = [image] + [image.crop(box) for box in grid.boxes()]
    expected = []
    for view in views:  # one view at a time, class token dropped, unit length
        tokens = module.reference_tokens(transform(view)[None], settings)[1][0, 1:]
        expected.append(tokens / tokens.norm(dim=-1, keepdim=True))
    second = memory.banks[1][(1 + grid.count) * patches:]
    torch.testing.assert_close(second, torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_references_of_different_sizes_are_refused_for_a_tiled_memory(trained_checkpoint, design_args, tmp_path,
                                                                       capsys):
    references = tmp_path / "refs"
    references.mkdir()
    Image.fromarray(np.zeros((48, 90, 3), np.uint8)).save(references / "a.png")
    Image.fromarray(np.zeros((48, 200, 3), np.uint8)).save(references / "b.png")
    image = tmp_path / "part.png"
    Image.fromarray(np.zeros((48, 90, 3), np.uint8)).save(image)
    argv = ["--image_path", str(image), "--checkpoint_path", str(trained_checkpoint), "--reference_path",
            str(references), "--tile_size", "32", "--save_path", str(tmp_path / "out"), *design_args]
    assert run_cli(prediction.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are cut into different tile grids" in err
    assert "a.png: 9 views" in err and "b.png: 17 views" in err  # 1 + 4 x 2 and 1 + 8 x 2 tiles of 32 px


def test_tiled_memory_file_is_refused_on_an_untiled_run(trained_checkpoint, design_args, tmp_path, capsys):
    references = tmp_path / "refs"
    references.mkdir()
    rng = np.random.default_rng(7)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(60, 200, (48, 90, 3), dtype=np.uint8)).save(references / name)
    image = tmp_path / "part.png"
    Image.fromarray(rng.integers(60, 200, (48, 90, 3), dtype=np.uint8)).save(image)
    common = ["--image_path", str(image), "--checkpoint_path", str(trained_checkpoint), *design_args]
    saved = tmp_path / "memory.npz"
    assert run_cli(prediction.main, [*common, "--reference_path", str(references), "--save_memory", str(saved),
                                     "--tile_size", "32", "--save_path", str(tmp_path / "tiled")]) == 0
    assert run_cli(prediction.main, [*common, "--memory", str(saved), "--tile_size", "32",
                                     "--save_path", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert run_cli(prediction.main, [*common, "--memory", str(saved), "--save_path", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was built --tile_size 32 --tile_overlap 0.25 and this run is untiled" in err


def test_test_py_few_shot_tiled(synthetic_datasets, trained_checkpoint, design_args, tmp_path):
    """test.py --k_shot 2 --tile_size 32: each class's tiles scored against that class's tiled memory; the same
    scores as scoring each class's files with its memory by hand."""
    out = tmp_path / "fewshot"
    assert _evaluate(synthetic_datasets[1], out, trained_checkpoint, design_args, "--k_shot", "2",
                     "--tile_size", "32") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tiling"]["tile_size"] == 32
    provenance = next(iter(json.loads((out / "thresholds.json").read_text())["classes"].values()))["provenance"]
    assert provenance["tile_size"] == 32 and provenance["memory"]["k"] == 2
    plain = tmp_path / "plain"
    assert _evaluate(synthetic_datasets[1], plain, trained_checkpoint, design_args, "--k_shot", "2") == 0
    tiled_scores = np.load(out / "dump.npz")["scores"]
    assert not np.allclose(tiled_scores, np.load(plain / "dump.npz")["scores"])  # the tiles changed the scores


def test_test_py_metrics_resolution(synthetic_datasets, trained_checkpoint, design_args, tmp_path, capsys):
    """--metrics_resolution 96: maps are the stitched native maps resized to 96 x 96 and masks the ground truth
    resized to the same grid (recorded); without --tile_size the flag is one line."""
    target = synthetic_datasets[1]
    out = tmp_path / "fine"
    assert _evaluate(target, out, trained_checkpoint, design_args, "--tile_size", "32",
                     "--metrics_resolution", "96") == 0
    assert json.loads((out / "results.json").read_text())["tiling"]["metrics_resolution"] == [96, 96]
    dump = np.load(out / "dump.npz")
    assert dump["maps"].shape[1:] == (96, 96) and dump["masks"].shape[1:] == (96, 96)
    meta = json.loads((target / "meta.json").read_text())
    items = {item["img_path"]: item for cls in meta["test"].values() for item in cls}
    number = next(i for i, path in enumerate(dump["img_paths"]) if items[str(path)]["anomaly"] == 1)
    item = items[str(dump["img_paths"][number])]
    with Image.open(target / item["mask_path"]) as mask:  # bilinear to 96 x 96, then > 0.5, as the masks' transform
        resized = np.asarray(mask.convert("L").resize((96, 96), Image.BILINEAR), np.float32) / 255 > 0.5
    assert np.array_equal(dump["masks"][number], resized.astype(np.uint8))
    (_, _, score, native), = _scored([target / item["img_path"]], trained_checkpoint, design_args,
                                     "--tile_size", "32")
    expected = np.asarray(Image.fromarray(native).resize((96, 96), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(dump["maps"][number], expected, atol=1e-5)
    capsys.readouterr()
    assert _evaluate(target, tmp_path / "bad", trained_checkpoint, design_args, "--metrics_resolution", "96") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metrics_resolution goes with --tile_size N" in err
