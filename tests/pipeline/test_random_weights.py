"""The random stand-ins: the default one is chaotic at ViT-L's width, the ``--stable`` one is not.

What must hold (pipeline/random_weights.py's docstring): a relative input perturbation of 1e-3
moves a smooth network's outputs by about 1e-3. The stable stand-in does that at a width where
the default one (fixed standard deviations) amplifies it tens of times; the measurement itself is
checked against a hand-made linear tower, whose relative change is known exactly.
"""

import pytest
import torch

from AnomalyCLIP_lib.model import build_model
from pipeline import random_weights
from pipeline.random_weights import TINY, input_sensitivity, random_state_dict, stable_state_dict

# ViT width 512 (heads of 64), a one-layer text tower: chaotic with the default draws, and seconds to build.
WIDE = {**TINY, "vision_width": 512, "transformer_layers": 1, "vocab_size": 100}


def _visual(state):
    return build_model(state).visual.eval()


def test_stable_stand_in_moves_about_as_much_as_its_input_and_the_default_does_not():
    stable = input_sensitivity(_visual(stable_state_dict(0, **WIDE)), 56)
    chaotic = input_sensitivity(_visual(random_state_dict(0, **WIDE)), 56)
    assert all(3e-4 < value < 3e-3 for value in stable.values()), stable
    assert all(value > 2e-2 for value in chaotic.values()), chaotic


def test_stable_weights_are_the_default_draws_scaled_in_the_vision_blocks_only():
    stable, raw = stable_state_dict(0, **WIDE), random_state_dict(0, **WIDE)
    factor = (128 / 512) ** 0.5
    for key in ("visual.transformer.resblocks.3.attn.in_proj_weight",
                "visual.transformer.resblocks.0.mlp.c_proj.weight"):
        assert torch.allclose(stable[key], raw[key] * factor)
    for key in ("visual.proj", "visual.conv1.weight", "visual.transformer.resblocks.0.ln_1.weight",
                "transformer.resblocks.0.attn.in_proj_weight"):
        assert torch.equal(stable[key], raw[key])
    assert stable_state_dict(0, dtype=torch.float16, **TINY)["visual.proj"].dtype == torch.float16


class _Linear(torch.nn.Module):
    """encode() of a linear map: its relative change is exactly the input's (epsilon)."""

    def encode(self, images, features_list, dpam_layer):
        flat = images.flatten(1)
        return 2 * flat, [flat.reshape(1, -1, 3)]


@pytest.mark.parametrize("epsilon", [1e-3, 1e-2])
def test_input_sensitivity_of_a_linear_map_is_epsilon(epsilon):
    found = input_sensitivity(_Linear(), 14, epsilon=epsilon)
    assert found == pytest.approx({"image_embedding": epsilon, "patch_tokens": epsilon}, rel=1e-4)


def test_command_line_writes_the_stable_stand_in(tmp_path, capsys):
    out = tmp_path / "stable.pt"
    assert random_weights.main(["--preset", "tiny", "--stable", "--seed", "3", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(saved[key], stable_state_dict(3, **TINY)[key])  # width 128: factor 1
    assert "stable" in capsys.readouterr().out
