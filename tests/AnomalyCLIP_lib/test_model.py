"""Vision tower with DPAM and text tower with deep tokens, checked against SPEC §3/§4 written out naively."""

import math

import pytest
import torch
import torch.nn.functional as F

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.model import build_model, model_config_from_state_dict, normalize_layers


def _images(batch=2, size=56, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _naive_attention(block, x, value_value=False):
    """Textbook multi-head attention on (B, N, C) with explicit matmuls."""
    batch, tokens, width = x.shape
    heads = block.attn.heads
    qkv = x @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias
    q, k, v = (t.reshape(batch, tokens, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    if value_value:
        q = k = v
    weights = (q @ k.transpose(-2, -1) / math.sqrt(width // heads)).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return block.attn.out_proj(out)


def _naive_encode(model, images, features_list, dpam_layer):
    """SPEC §3 literally: both streams through every DPAM layer, every token, no shortcuts."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding_for(int(math.sqrt(x.shape[1] - 1))))
    num_layers = visual.num_layers
    first_dpam = num_layers - dpam_layer + 2 if dpam_layer else num_layers + 1
    x_ori, x_dpam, outputs = x, None, {}
    for number, block in enumerate(visual.transformer.resblocks, start=1):
        h = block.ln_1(x_ori)
        if number >= first_dpam:
            a_v = _naive_attention(block, h, value_value=True)
            x_dpam = (x_ori if x_dpam is None else x_dpam) + a_v
        x_ori = x_ori + _naive_attention(block, h)
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        outputs[number] = x_dpam if number >= first_dpam else x_ori
    tokens = [visual.ln_post(outputs[n]) @ visual.proj for n in sorted(set(features_list))]
    return x_ori[:, 0] @ visual.proj, tokens


@pytest.mark.parametrize("features_list", [[24], [6, 12, 18, 24], [3, 20], [5]])
@pytest.mark.parametrize("size", [56, 70])
def test_encode_image_matches_naive_spec(tiny_model, features_list, size):
    images = _images(size=size)
    with torch.no_grad():
        embedding, tokens = tiny_model.encode_image(images, features_list, dpam_layer=20)
        ref_embedding, ref_tokens = _naive_encode(tiny_model, images, features_list, 20)
    torch.testing.assert_close(embedding, ref_embedding, atol=1e-5, rtol=1e-5)
    assert len(tokens) == len(ref_tokens)
    for ours, ref in zip(tokens, ref_tokens):
        assert ours.shape == (2, (size // 14) ** 2 + 1, 64)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_plain_clip_matches_naive(tiny_model):
    images = _images()
    with torch.no_grad():
        embedding, tokens = tiny_model.encode_image(images, [12, 24], dpam_layer=None)
        ref_embedding, ref_tokens = _naive_encode(tiny_model, images, [12, 24], None)
    torch.testing.assert_close(embedding, ref_embedding, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(tokens, ref_tokens):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_dpam_keeps_original_stream(tiny_model):
    """The image embedding and pre-DPAM layers are plain CLIP's whatever DPAM does."""
    images = _images(size=70)
    with torch.no_grad():
        dpam_embedding, dpam_tokens = tiny_model.encode_image(images, [3, 5, 24], dpam_layer=20)
        plain_embedding, plain_tokens = tiny_model.encode_image(images, [3, 5, 24], dpam_layer=None)
    torch.testing.assert_close(dpam_embedding, plain_embedding, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dpam_tokens[0], plain_tokens[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dpam_tokens[1], plain_tokens[1], atol=1e-6, rtol=1e-6)
    assert (dpam_tokens[2] - plain_tokens[2]).abs().max() > 1e-3


def _last_block_tokens(model, run):
    """Run ``run()`` and return the token count the last vision block's MLP saw (observed by a hook)."""
    seen = []
    handle = model.visual.transformer.resblocks[-1].mlp.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    try:
        result = run()
    finally:
        handle.remove()
    return result, seen


@pytest.mark.parametrize("features_list, dpam_layer", [([24], 20), ([6, 12, 18, 24], 20), ([12], None), ([3, 20], 20)])
def test_batched_pass_with_class_token_only_last_block_equals_single_images(tiny_model, features_list, dpam_layer):
    """The one-pass batch (what a GPU runs) with the class-token-only last block, against image by image.

    On a CPU ``encode`` splits a batch into single images, so the batched pass is called directly.
    Both are also checked against the full-token reference arithmetic, which skips nothing.
    """
    visual = tiny_model.visual
    images = _images(batch=3, size=70)
    layers, first_dpam = normalize_layers(features_list, 24), visual._first_dpam_layer(dpam_layer)
    with torch.no_grad():
        (embedding, tokens), seen = _last_block_tokens(tiny_model, lambda: visual._encode(images, layers, first_dpam))
        singles = [visual._encode(images[i : i + 1], layers, first_dpam) for i in range(3)]
        (ref_embedding, ref_tokens), ref_seen = _last_block_tokens(
            tiny_model, lambda: tiny_model.encode_image(images, features_list, dpam_layer, reference_arithmetic=True))
    assert seen == [1] and ref_seen == [26]  # the shortcut was taken in one pass; the reference skips nothing
    assert embedding.shape == (3, 64) and len(tokens) == len(layers)
    torch.testing.assert_close(embedding, torch.cat([s[0] for s in singles]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedding, ref_embedding, atol=1e-5, rtol=1e-5)
    for index, layer_tokens in enumerate(tokens):
        assert layer_tokens.shape == (3, 26, 64)
        torch.testing.assert_close(layer_tokens, torch.cat([s[1][index] for s in singles]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer_tokens, ref_tokens[index], atol=1e-5, rtol=1e-5)
    assert (embedding[0] - embedding[1]).abs().max() > 1e-3  # the images differ, so a mix-up would show


@pytest.mark.gpu
@pytest.mark.parametrize("features_list, dpam_layer", [([24], 20), ([6, 12, 18, 24], 20), ([12], None)])
def test_cuda_batch_equals_single_images_and_cpu(tiny_clip_state, features_list, dpam_layer):
    """On CUDA ``encode`` runs the batch in one pass; each image equals its own pass and the CPU result."""
    model = build_model(tiny_clip_state).cuda()
    images = _images(batch=4, size=70)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 kernels, as on the CPU
    try:
        with torch.no_grad():
            embedding, tokens = model.encode_image(images.cuda(), features_list, dpam_layer)
            singles = [model.encode_image(images[i : i + 1].cuda(), features_list, dpam_layer) for i in range(4)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    with torch.no_grad():
        cpu_embedding, cpu_tokens = build_model(tiny_clip_state).encode_image(images, features_list, dpam_layer)
    torch.testing.assert_close(embedding, torch.cat([s[0] for s in singles]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embedding.cpu(), cpu_embedding, atol=1e-4, rtol=1e-4)
    for index, layer_tokens in enumerate(tokens):
        torch.testing.assert_close(layer_tokens, torch.cat([s[1][index] for s in singles]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer_tokens.cpu(), cpu_tokens[index], atol=1e-4, rtol=1e-4)


def test_intermediate_layers_do_not_alias(tiny_model):
    """Regression for the original's bug where every layer's tokens were layer 24's."""
    with torch.no_grad():
        _, tokens = tiny_model.encode_image(_images(), [6, 12, 18, 24], dpam_layer=20)
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            assert (tokens[i] - tokens[j]).abs().max() > 1e-3, (i, j)


def test_features_list_sorted_and_deduplicated(tiny_model):
    images = _images()
    with torch.no_grad():
        _, sorted_tokens = tiny_model.encode_image(images, [6, 24], dpam_layer=20)
        _, unsorted_tokens = tiny_model.encode_image(images, [24, 6, 24], dpam_layer=20)
    assert len(unsorted_tokens) == 2
    for a, b in zip(sorted_tokens, unsorted_tokens):
        assert torch.equal(a, b)
    assert normalize_layers([24, 24], 24) == [24]


def test_forward_at_518_equivalent_leaves_parameters_unchanged(tiny_clip_state):
    model = build_model(tiny_clip_state)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        _, tokens = model.encode_image(_images(batch=1, size=518), [6, 12, 18, 24], dpam_layer=20)
    assert tokens[0].shape == (1, 37 * 37 + 1, 64)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert model.visual.positional_embedding.shape == (17, 128)


def test_positional_embedding_resize_is_bilinear_and_keeps_class_position(tiny_model):
    table = tiny_model.visual.positional_embedding
    resized = tiny_model.visual.positional_embedding_for(5)
    assert resized.shape == (26, 128)
    assert torch.equal(resized[0], table[0])
    grid = table[1:].reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(5, 5), mode="bilinear", align_corners=False)[0].reshape(128, 25).t()
    torch.testing.assert_close(resized[1:], expected)
    assert tiny_model.visual.positional_embedding_for(4) is table


@pytest.mark.parametrize("bad", [[0], [25], []])
def test_bad_features_list_is_a_clear_error(tiny_model, bad):
    with pytest.raises(AnomalyCLIPError, match="features_list"):
        tiny_model.encode_image(_images(), bad)


def test_bad_image_size_and_dpam_layer_are_clear_errors(tiny_model):
    with pytest.raises(AnomalyCLIPError, match="multiple of the patch size"):
        tiny_model.encode_image(_images(size=60), [24])
    with pytest.raises(AnomalyCLIPError, match="dpam_layer"):
        tiny_model.encode_image(_images(), [24], dpam_layer=26)


def test_config_read_from_shapes(tiny_clip_state):
    config = model_config_from_state_dict(tiny_clip_state)
    assert config == {
        "embed_dim": 64, "image_resolution": 56, "vision_layers": 24, "vision_width": 128,
        "vision_patch_size": 14, "context_length": 77, "vocab_size": 49408, "transformer_width": 64,
        "transformer_heads": 1, "transformer_layers": 12,
    }


def test_vit_l14_336_architecture_from_shapes():
    """The full-size model's shapes give the published architecture (built on the meta device)."""
    from AnomalyCLIP_lib.model import CLIP

    with torch.device("meta"):
        model = CLIP(768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12)
    config = model_config_from_state_dict(model.state_dict())
    assert config == {
        "embed_dim": 768, "image_resolution": 336, "vision_layers": 24, "vision_width": 1024,
        "vision_patch_size": 14, "context_length": 77, "vocab_size": 49408, "transformer_width": 768,
        "transformer_heads": 12, "transformer_layers": 12,
    }
    assert model.visual.transformer.resblocks[0].attn.heads == 16
    assert model.visual.positional_embedding.shape == (577, 1024)


def test_text_deep_tokens_replace_positions_with_fp16_rounding(tiny_model):
    """Deep tokens overwrite positions 1..t before blocks 1..depth-1, rounded to fp16 values."""
    torch.manual_seed(0)
    prompts = torch.randn(2, 77, 64)
    ids = torch.zeros(2, 77, dtype=torch.int32)
    ids[:, 10] = 49407
    deep = [torch.randn(4, 64) * 0.3 for _ in range(3)]
    with torch.no_grad():
        ours = tiny_model.encode_text_learn(prompts, ids, deep)
        x = prompts + tiny_model.positional_embedding
        for index, block in enumerate(tiny_model.transformer.resblocks):
            if 1 <= index <= 3:
                x = x.clone()
                x[:, 1:5] = deep[index - 1].half().float()
            x = block(x, causal=True)
        expected = tiny_model.ln_final(x)[:, 10] @ tiny_model.text_projection
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    # Moved by less than half an fp16 step (|x| * 2**-13 < ulp/2), the tokens round back to the same
    # fp16 values: with the rounding the output is bit for bit the same, without it it moves.
    rounded = [d.half().float() for d in deep]
    nudged = [r + r.abs() * 2.0**-13 for r in rounded]
    assert all(torch.equal(n.half().float(), r) for n, r in zip(nudged, rounded))
    assert all(not torch.equal(n, r) for n, r in zip(nudged, rounded))
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_text_learn(prompts, ids, nudged), ours)
        x = prompts + tiny_model.positional_embedding
        for index, block in enumerate(tiny_model.transformer.resblocks):
            if 1 <= index <= 3:
                x = x.clone()
                x[:, 1:5] = nudged[index - 1]  # not rounded
            x = block(x, causal=True)
        unrounded_output = tiny_model.ln_final(x)[:, 10] @ tiny_model.text_projection
    assert not torch.equal(unrounded_output, ours)  # the nudge is visible where nothing rounds it away


def test_text_attention_is_causal(tiny_model):
    """Changing a later token must not change an earlier position's output."""
    torch.manual_seed(1)
    prompts = torch.randn(1, 77, 64)
    changed = prompts.clone()
    changed[:, 40:] += 1.0
    ids = torch.zeros(1, 77, dtype=torch.int32)
    ids[0, 20] = 49407
    with torch.no_grad():
        a = tiny_model.encode_text_learn(prompts, ids)
        b = tiny_model.encode_text_learn(changed, ids)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
