"""The one scoring path (SPEC §5)."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from AnomalyCLIP_lib import scoring
from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details


@pytest.fixture(scope="module")
def text_feats(tiny_model):
    torch.manual_seed(0)
    learner = AnomalyCLIP_PromptLearner(tiny_model, design_details(n_ctx=12, depth=9, t_n_ctx=4))
    with torch.inference_mode():
        return scoring.text_features(tiny_model, learner)


def _images(batch, size=70, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_text_features_are_normalised_pairs(text_feats):
    assert text_feats.shape == (1, 2, 64)
    torch.testing.assert_close(text_feats.norm(dim=-1), torch.ones(1, 2))


@pytest.mark.parametrize("features_list", [[24], [6, 12, 18, 24]])
def test_batch_equals_single_images(tiny_model, text_feats, features_list):
    images = _images(3)
    batched = scoring.predict(tiny_model, text_feats, images, features_list)
    singles = [scoring.predict(tiny_model, text_feats, images[i : i + 1], features_list) for i in range(3)]
    assert batched.scores.shape == (3,) and batched.maps.shape == (3, 70, 70)
    torch.testing.assert_close(batched.scores, torch.cat([s.scores for s in singles]), atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.maps, torch.cat([s.maps for s in singles]), atol=1e-6, rtol=0)


def test_predict_follows_spec(tiny_model, text_feats):
    """Score = softmax(f t / 0.07)[1]; map = sum_l (p1 + 1 - p0) / 2 upsampled, then Gaussian sigma 4."""
    images = _images(2)
    prediction = scoring.predict(tiny_model, text_feats, images, [12, 24], sigma=4)
    with torch.no_grad():
        embedding, tokens = tiny_model.encode_image(images, [12, 24], 20)
        f = embedding / embedding.norm(dim=-1, keepdim=True)
        expected_scores = ((f @ text_feats[0].t()) / 0.07).softmax(-1)[:, 1]
        total = 0
        for layer_tokens in tokens:
            p = layer_tokens / layer_tokens.norm(dim=-1, keepdim=True)
            probs = ((p[:, 1:] @ text_feats[0].t()) / 0.07).softmax(-1)
            grid = probs.reshape(2, 5, 5, 2).permute(0, 3, 1, 2)
            up = torch.nn.functional.interpolate(grid, size=(70, 70), mode="bilinear", align_corners=False)
            total = total + up[:, 1]
    torch.testing.assert_close(prediction.scores, expected_scores, atol=1e-6, rtol=0)
    expected_maps = np.stack([gaussian_filter(m, sigma=4) for m in total.numpy()])
    np.testing.assert_allclose(prediction.maps.numpy(), expected_maps, atol=1e-5)
    assert prediction.maps.dtype == torch.float32 and prediction.scores.dtype == torch.float32


def test_feature_map_layer_skips_leading_layers(tiny_model, text_feats):
    images = _images(1)
    only_last = scoring.predict(tiny_model, text_feats, images, [24], sigma=0)
    skip_first = scoring.predict(tiny_model, text_feats, images, [12, 24], sigma=0, feature_map_layer=1)
    torch.testing.assert_close(only_last.maps, skip_first.maps, atol=1e-6, rtol=0)


def test_similarity_maps_are_probabilities(tiny_model, text_feats):
    with torch.no_grad():
        _, tokens = tiny_model.encode_image(_images(2), [6, 24], 20)
    maps = scoring.similarity_maps(tokens, text_feats, 70)
    assert len(maps) == 2
    for layer_map in maps:
        assert layer_map.shape == (2, 2, 70, 70)
        torch.testing.assert_close(layer_map.sum(1), torch.ones(2, 70, 70))
