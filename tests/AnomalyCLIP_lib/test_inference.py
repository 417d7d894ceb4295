"""The inference module and the torch Gaussian filter, against scoring.predict and scipy."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from AnomalyCLIP_lib import inference as inference_module
from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
from tests.deploy_helpers import FEATURES, TINY_SIZE, random_images, random_prompt_learner

SIGMAS = [0.5, 1.0, 2.0, 4.0, 7.3]
SIZES = [(1, 1), (1, 6), (2, 3), (5, 5), (7, 13), (17, 17), (40, 33)]


def _scipy(maps: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([gaussian_filter(one, sigma=sigma) for one in maps])


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("size", SIZES)
def test_torch_filter_equals_scipy(sigma, size):
    rng = np.random.default_rng(int(sigma * 10) + size[0] * 100 + size[1])
    maps = (rng.random((3, *size)) * 4).astype(np.float32)  # maps sum up to 4 layers
    ours = scoring.gaussian_smooth_torch(torch.from_numpy(maps), sigma)
    assert ours.dtype == torch.float32 and ours.shape == maps.shape
    np.testing.assert_allclose(ours.numpy(), _scipy(maps, sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_torch_filter_in_float32_equals_scipy(sigma):
    maps = np.random.default_rng(1).random((2, 70, 70)).astype(np.float32)
    ours = scoring.gaussian_smooth_torch(torch.from_numpy(maps), sigma, compute_dtype=None)
    np.testing.assert_allclose(ours.numpy(), _scipy(maps, sigma), rtol=0, atol=1e-6)


def test_torch_filter_at_518_and_sigma_zero():
    maps = np.random.default_rng(2).random((1, 518, 518)).astype(np.float32) * 4
    ours = scoring.gaussian_smooth_torch(torch.from_numpy(maps), 4.0)
    np.testing.assert_allclose(ours.numpy(), _scipy(maps, 4.0), rtol=0, atol=1e-6)
    same = torch.from_numpy(maps)
    assert scoring.gaussian_smooth_torch(same, 0) is same


def test_reflect_indices_by_hand():
    # scipy 'reflect' of [a b c] padded by 4: c c b a | a b c | c b a a (period 6)
    assert scoring.reflect_indices(3, 4).tolist() == [2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0]
    assert scoring.reflect_indices(1, 2).tolist() == [0, 0, 0, 0, 0]
    assert scoring.reflect_indices(4, 1).tolist() == [0, 0, 1, 2, 3, 3]


def test_gaussian_kernel_by_hand():
    weights = scoring.gaussian_kernel(1.0)  # radius int(4 * 1 + 0.5) = 4
    x = np.arange(-4, 5)
    expected = np.exp(-x**2 / 2) / np.exp(-x**2 / 2).sum()
    np.testing.assert_allclose(weights, expected, rtol=1e-15)
    assert len(scoring.gaussian_kernel(4.0)) == 33


@pytest.mark.gpu
def test_torch_filter_on_gpu_equals_scipy():
    maps = np.random.default_rng(3).random((2, 518, 518)).astype(np.float32) * 4
    ours = scoring.gaussian_smooth_torch(torch.from_numpy(maps).cuda(), 4.0)
    assert ours.is_cuda
    np.testing.assert_allclose(ours.cpu().numpy(), _scipy(maps, 4.0), rtol=0, atol=1e-6)


# --- the module ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learner(tiny_model):
    return random_prompt_learner(tiny_model)


@pytest.fixture(scope="module")
def text_feats(tiny_model, learner):
    with torch.inference_mode():
        return scoring.text_features(tiny_model, learner.eval())


def _module(model, learner, **settings):
    config = ScoringConfig(**{"image_size": TINY_SIZE, "features_list": FEATURES, **settings})
    return AnomalyCLIPInference.from_model(model, learner, config)


@pytest.mark.parametrize("reference", [False, True])
def test_scipy_smoothing_is_predict_bit_for_bit(tiny_model, learner, text_feats, reference):
    images = random_images(3)
    module = _module(tiny_model, learner, reference_arithmetic=reference, smoothing="auto" if reference else "scipy")
    assert module.config.uses_scipy_filter
    ours = module.predict(images)
    expected = scoring.predict(tiny_model, text_feats, images, list(FEATURES), 20, 4.0, 0,
                               reference_arithmetic=reference)
    assert torch.equal(ours.scores, expected.scores)
    assert torch.equal(ours.maps, expected.maps)


@pytest.mark.parametrize("settings", [{}, {"sigma": 2.0, "feature_map_layer": 1}, {"features_list": (24,), "sigma": 0},
                                      {"dpam_layer": None}])
def test_forward_equals_predict(tiny_model, learner, text_feats, settings):
    images = random_images(2, seed=1)
    module = _module(tiny_model, learner, **settings)
    cfg = module.config
    assert not cfg.uses_scipy_filter
    with torch.inference_mode():
        scores, maps = module(images)
    expected = scoring.predict(tiny_model, text_feats, images, list(cfg.features_list), cfg.dpam_layer, cfg.sigma,
                               cfg.feature_map_layer)
    assert scores.shape == (2,) and maps.shape == (2, TINY_SIZE, TINY_SIZE) and maps.dtype == torch.float32
    assert torch.equal(scores, expected.scores)  # the same arithmetic up to the filter
    torch.testing.assert_close(maps, expected.maps, rtol=0, atol=1e-6)


def test_text_features_are_a_buffer_and_the_text_tower_is_not_kept(tiny_model, learner, text_feats):
    module = _module(tiny_model, learner)
    assert torch.equal(module.text_features, text_feats)
    assert "text_features" in dict(module.named_buffers())
    assert not any(name.startswith("transformer.") for name, _ in module.named_parameters())
    assert module.visual is tiny_model.visual


# A real batch (one pass through the tower) agrees with single images up to float32 rounding of
# batched kernels; an image mixed with another of the batch differs by ~1e-1.
BATCH_TOL = 1e-5


def _first_block_batch_sizes(visual):
    """Batch sizes the first vision block sees, recorded by a forward pre-hook."""
    seen = []
    handle = visual.transformer.resblocks[0].register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    return seen, handle


@pytest.mark.parametrize("dpam_layer", [20, None])
def test_real_batch_equals_single_images(tiny_model, text_feats, dpam_layer):
    """raw_predict(batched=True), what an exported graph runs: one pass over 3 images, each as if alone."""
    images = random_images(3, seed=2)
    visual = tiny_model.visual
    seen, handle = _first_block_batch_sizes(visual)
    try:
        with torch.inference_mode():
            scores, maps = scoring.raw_predict(visual, text_feats, images, FEATURES, dpam_layer, batched=True)
            assert seen == [3]  # one pass over the whole batch, not image by image
            singles = [scoring.raw_predict(visual, text_feats, images[i : i + 1], FEATURES, dpam_layer)
                       for i in range(3)]
    finally:
        handle.remove()
    for i, (score, single_map) in enumerate(singles):
        torch.testing.assert_close(scores[i : i + 1], score, rtol=0, atol=BATCH_TOL)
        torch.testing.assert_close(maps[i : i + 1], single_map, rtol=0, atol=BATCH_TOL)
    assert (maps[0] - maps[1]).abs().max() > 100 * BATCH_TOL  # the images differ: mixing them would show


def test_traced_forward_of_a_batch_equals_single_images(tiny_model, learner, monkeypatch):
    """The module's forward as export traces it (a real batch, float32 filter) against single images."""
    module = _module(tiny_model, learner)
    images = random_images(3, seed=6)
    monkeypatch.setattr(inference_module, "is_exporting", lambda: True)
    seen, handle = _first_block_batch_sizes(module.visual)
    try:
        with torch.inference_mode():
            scores, maps = module(images)
            singles = [module(images[i : i + 1]) for i in range(3)]
    finally:
        handle.remove()
    assert seen == [3, 1, 1, 1]
    for i, (score, single_map) in enumerate(singles):
        torch.testing.assert_close(scores[i : i + 1], score, rtol=0, atol=BATCH_TOL)
        torch.testing.assert_close(maps[i : i + 1], single_map, rtol=0, atol=BATCH_TOL)


def test_batch_equals_single_images(tiny_model, learner):
    """predict on a CPU runs the tower image by image: every image gets its single-image result."""
    module = _module(tiny_model, learner)
    images = random_images(3, seed=2)
    batched = module.predict(images)
    for i in range(3):
        single = module.predict(images[i : i + 1])
        torch.testing.assert_close(batched.scores[i : i + 1], single.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.maps[i : i + 1], single.maps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_memory", [False, True])
def test_one_pass_batches_run_the_tower_once_and_equal_single_images(tiny_model, learner, with_memory):
    """one_pass_batches (the service's batches): one pass over 3 images on a CPU, each image's scores and maps
    its single-image result (image by image, the default) to 1e-6; the default still runs image by image."""
    from AnomalyCLIP_lib.memory import build_memory
    from AnomalyCLIP_lib.memory_config import MemorySettings

    module = _module(tiny_model, learner)
    if with_memory:
        settings = MemorySettings(layers=(6, 24), weight=0.4)
        module = module.with_memory(build_memory(module.reference_tokens(random_images(2, seed=8), settings),
                                                 settings))
    one_pass = module.with_one_pass_batches()
    assert one_pass.one_pass_batches and not module.one_pass_batches and one_pass.memory is module.memory
    assert one_pass.with_memory(module.memory).one_pass_batches  # kept when a memory is attached
    images = random_images(3, seed=9)
    seen, handle = _first_block_batch_sizes(module.visual)
    try:
        batched = one_pass.predict(images)
        assert seen == [3]
        singles = [module.predict(images[i : i + 1]) for i in range(3)]
        seen.clear()
        module.predict(images)
        assert seen == [1, 1, 1]
    finally:
        handle.remove()
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched.scores[i : i + 1], single.scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.maps[i : i + 1], single.maps, rtol=0, atol=1e-6)
    assert (batched.maps[0] - batched.maps[1]).abs().max() > 1e-3  # the images differ: mixing them would show


def test_config_is_frozen_and_round_trips():
    config = ScoringConfig(image_size=56, features_list=[24, 6, 6], sigma=2)
    assert config.features_list == (6, 24) and config.sigma == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sigma = 3.0
    assert ScoringConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["features_list"] == [6, 24]


@pytest.mark.parametrize("settings, message", [
    ({"features_list": ()}, "features_list is empty"),
    ({"feature_map_layer": 2, "features_list": (24,)}, "feature_map_layer"),
    ({"smoothing": "box"}, "unknown smoothing"),
    ({"precision": "int4"}, "unknown precision"),
    ({"sigma": -1}, "sigma"),
])
def test_config_errors(settings, message):
    with pytest.raises(AnomalyCLIPError, match=message):
        ScoringConfig(**settings)


def test_module_errors(tiny_model, learner):
    with pytest.raises(AnomalyCLIPError, match="outside 1..24"):
        _module(tiny_model, learner, features_list=(25,))
    with pytest.raises(AnomalyCLIPError, match="multiple of the patch size"):
        _module(tiny_model, learner, image_size=50)
    module = _module(tiny_model, learner)
    with pytest.raises(AnomalyCLIPError, match=r"\(B, 3, 56, 56\)"):
        module.predict(random_images(1, size=70))


def test_config_from_cli_flags():
    from pipeline.cli import add_model_args, add_sigma_arg, model_spec, parse_flags, scoring_spec
    from pipeline.loading import scoring_config

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    add_sigma_arg(parser)
    flags = parse_flags(parser, ["--features_list", "6", "24", "--feature_map_layer", "1", "2", "--image_size", "56",
                                 "--reference_arithmetic", "--sigma", "2"])
    config = scoring_config(model_spec(flags), scoring_spec(flags))
    assert config == ScoringConfig(image_size=56, features_list=(6, 24), dpam_layer=20, sigma=2.0,
                                   feature_map_layer=1, reference_arithmetic=True)
    assert config.uses_scipy_filter


@pytest.mark.gpu
def test_module_on_gpu_equals_cpu(tiny_model, learner):
    import copy

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _module(tiny_model, learner)
    gpu = _module(copy.deepcopy(tiny_model).cuda(), copy.deepcopy(learner).cuda())
    images = random_images(2, seed=4)
    expected, ours = cpu.predict(images), gpu.predict(images.cuda())
    torch.testing.assert_close(ours.scores, expected.scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.maps, expected.maps, rtol=0, atol=1e-4)
