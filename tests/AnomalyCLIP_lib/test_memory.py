"""The few-shot memory against brute-force numpy, and its fusion against an independent computation."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
from AnomalyCLIP_lib.memory import PatchMemory, build_memory, leave_one_out_scales, nearest_distances
from AnomalyCLIP_lib.memory_config import MemorySettings

SIZE = 56  # 4 x 4 patches of 14 pixels


def _unit(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=-1, keepdims=True)


def _brute_nearest(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """min over the bank of (1 - cos) / 2, one pair at a time in float64."""
    out = np.empty(queries.shape[:2])
    for b in range(queries.shape[0]):
        for p in range(queries.shape[1]):
            out[b, p] = min((1 - float(np.dot(queries[b, p], row))) / 2 for row in bank)
    return out


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
def test_nearest_distances_equal_brute_force_for_any_chunk(chunk_rows):
    rng = np.random.default_rng(0)
    queries, bank = _unit(rng.normal(size=(2, 5, 8))), _unit(rng.normal(size=(13, 8)))
    ours = nearest_distances(torch.tensor(queries, dtype=torch.float32), torch.tensor(bank, dtype=torch.float32),
                             chunk_rows)
    np.testing.assert_allclose(ours.numpy(), _brute_nearest(queries, bank), atol=1e-6)


def test_leave_one_out_scales_by_hand():
    rng = np.random.default_rng(1)
    per_layer = [_unit(rng.normal(size=(3, 4, 6))) for _ in range(2)]
    expected = []
    for tokens in per_layer:
        worst = [_brute_nearest(tokens[k:k + 1], np.concatenate([tokens[j] for j in range(3) if j != k])).max()
                 for k in range(3)]
        expected.append(0.5 / np.mean(worst))
    ours = leave_one_out_scales([torch.tensor(t, dtype=torch.float32) for t in per_layer], chunk_rows=5)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    assert leave_one_out_scales([torch.tensor(per_layer[0][:1], dtype=torch.float32)]).tolist() == [1.0]


def test_distance_maps_are_the_scaled_layer_mean_at_patch_resolution():
    rng = np.random.default_rng(2)
    references = [rng.normal(size=(2, 17, 8)).astype(np.float32) for _ in range(2)]  # class token + 16 patches
    memory = build_memory([torch.tensor(t) for t in references], MemorySettings(layers=(3, 5)))
    test_tokens = [rng.normal(size=(1, 17, 8)).astype(np.float32) for _ in range(2)]
    ours = memory.distance_maps([torch.tensor(t) for t in test_tokens], image_size=4).numpy()
    expected = np.zeros((1, 16))
    for tokens, refs, scale in zip(test_tokens, references, memory.scales.numpy()):
        bank = _unit(refs[:, 1:].reshape(-1, 8).astype(np.float64))
        expected += _brute_nearest(_unit(tokens[:, 1:].astype(np.float64)), bank) * scale / 2
    np.testing.assert_allclose(ours.reshape(1, 16), expected, atol=1e-6)


@pytest.fixture(scope="module")
def zero_shot(tiny_model):
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(1, 2, tiny_model.visual.proj.shape[1]), dim=-1)
    config = ScoringConfig(image_size=SIZE, features_list=(6, 24), sigma=2.0)
    return AnomalyCLIPInference(tiny_model.visual, text, config).eval()


@pytest.mark.parametrize("stream", ["dpam", "plain"])
def test_fused_scores_and_maps_equal_an_independent_computation(zero_shot, stream):
    torch.manual_seed(1)
    references, images = torch.randn(3, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE)
    settings = MemorySettings(layers=(6, 12, 24), stream=stream, weight=0.3)
    memory = build_memory(zero_shot.reference_tokens(references, settings), settings)
    fused = zero_shot.with_memory(memory).predict(images)

    base = zero_shot.predict(images)  # zero-shot scores and filtered maps, as without a memory
    tokens = zero_shot.reference_tokens(images, settings)
    raw_memory_map = memory.distance_maps(tokens, SIZE).numpy().astype(np.float64)
    memory_map = np.stack([gaussian_filter(one, sigma=2.0) for one in raw_memory_map])
    summed_layers = 2  # features_list 6 24, feature_map_layer 0
    expected_maps = 0.7 * base.maps.numpy() + 0.3 * summed_layers * memory_map
    expected_scores = 0.7 * base.scores.numpy() + 0.3 * memory_map.max(axis=(1, 2))
    np.testing.assert_allclose(fused.maps.numpy(), expected_maps, atol=2e-6)
    np.testing.assert_allclose(fused.scores.numpy(), expected_scores, atol=2e-6)


def test_plain_tokens_are_the_plain_towers(zero_shot, tiny_model):
    images = torch.randn(2, 3, SIZE, SIZE)
    settings = MemorySettings(layers=(6, 24), stream="plain")
    ours = zero_shot.reference_tokens(images, settings)
    with torch.inference_mode():
        _, plain = tiny_model.encode_image(images, [6, 24], dpam_layer=None)
    for mine, theirs in zip(ours, plain):
        torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=1e-5)


def test_a_reference_scored_against_its_own_memory_is_zero_shot_times_one_minus_w(zero_shot):
    torch.manual_seed(2)
    image = torch.randn(1, 3, SIZE, SIZE)
    settings = MemorySettings(weight=0.5)
    memory = build_memory(zero_shot.reference_tokens(image, settings), settings)  # K = 1: raw distances
    assert memory.scales.tolist() == [1.0] * 4
    fused = zero_shot.with_memory(memory).predict(image)
    base = zero_shot.predict(image)
    np.testing.assert_allclose(fused.scores.numpy(), 0.5 * base.scores.numpy(), atol=1e-6)
    np.testing.assert_allclose(fused.maps.numpy(), 0.5 * base.maps.numpy(), atol=1e-5)


def test_weight_zero_is_zero_shot(zero_shot):
    torch.manual_seed(3)
    images = torch.randn(2, 3, SIZE, SIZE)
    settings = MemorySettings(weight=0.0)
    memory = build_memory(zero_shot.reference_tokens(torch.randn(2, 3, SIZE, SIZE), settings), settings)
    fused, base = zero_shot.with_memory(memory).predict(images), zero_shot.predict(images)
    np.testing.assert_allclose(fused.scores.numpy(), base.scores.numpy(), atol=1e-7)
    np.testing.assert_allclose(fused.maps.numpy(), base.maps.numpy(), atol=1e-6)


def test_arrays_round_trip_and_leave_one_out_drops_one_references_rows():
    rng = np.random.default_rng(4)
    per_layer = [torch.tensor(rng.normal(size=(3, 5, 6)).astype(np.float32)) for _ in range(2)]
    refs = [{"path": f"r{k}.png", "sha256": str(k) * 64} for k in range(3)]
    memory = build_memory(per_layer, MemorySettings(layers=(2, 4)), {"k": 3, "references": refs})
    again = PatchMemory.from_arrays(memory.to_arrays())
    for ours, theirs in zip(memory.banks, again.banks):
        torch.testing.assert_close(ours, theirs)
    assert again.settings == memory.settings and again.info == memory.info
    without = memory.without_reference(1)
    assert without.rows == 8
    torch.testing.assert_close(without.bank_0, torch.cat([memory.bank_0[:4], memory.bank_0[8:]]))
    torch.testing.assert_close(without.scales, memory.scales)  # the full memory's units
    with pytest.raises(AnomalyCLIPError, match="at least 2"):
        build_memory(per_layer[:1] * 1, MemorySettings(layers=(2,)), {"k": 1}).without_reference(0)


@pytest.mark.parametrize("settings, message", [
    (dict(weight=1.5), "--memory_weight 1.5 must be in"),
    (dict(layers=()), "--memory_layers is empty"),
    (dict(stream="other"), "unknown memory stream"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(AnomalyCLIPError, match=message):
        MemorySettings(**settings)


def test_layers_the_tower_lacks_and_tokens_of_another_width_are_refused(zero_shot):
    with pytest.raises(AnomalyCLIPError, match="outside 1..24"):
        zero_shot.reference_tokens(torch.zeros(1, 3, SIZE, SIZE), MemorySettings(layers=(6, 30)))
    other = build_memory([torch.randn(1, 17, 5)], MemorySettings(layers=(6,)))
    with pytest.raises(AnomalyCLIPError, match="another backbone"):
        zero_shot.with_memory(other)
