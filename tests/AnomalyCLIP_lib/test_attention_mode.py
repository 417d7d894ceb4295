"""The attention arithmetic is an argument of the forward: no module changes what another one computes."""

import torch

from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
from AnomalyCLIP_lib.model import VisionTransformer
from tests.deploy_helpers import FEATURES, TINY_SIZE, random_images, random_prompt_learner


def _module(model, reference: bool) -> AnomalyCLIPInference:
    config = ScoringConfig(image_size=TINY_SIZE, features_list=FEATURES, reference_arithmetic=reference,
                           smoothing="torch")
    return AnomalyCLIPInference.from_model(model, random_prompt_learner(model), config).eval()


def _outputs(module: AnomalyCLIPInference, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return module(images)


def test_export_copy_leaves_the_source_on_the_reference_arithmetic(tiny_model):
    """export_copy() used to switch the shared tower to the fused attention under the source module."""
    images = random_images(3, seed=4)
    source = _module(tiny_model, reference=True)
    before = _outputs(source, images)
    copy = source.export_copy()
    assert copy.visual is source.visual and not copy.config.reference_arithmetic
    after = _outputs(source, images)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])

    copied = _outputs(copy, images)
    # The premise: the two arithmetics differ in the last bits on these images, so a switch would show.
    assert not torch.equal(copied[1], before[1])
    fused = _outputs(_module(tiny_model, reference=False), images)
    assert torch.equal(copied[0], fused[0]) and torch.equal(copied[1], fused[1])

def test_the_tower_holds_no_attention_mode(tiny_model):
    assert not hasattr(VisionTransformer, "reference_arithmetic")
    _module(tiny_model, reference=True)
    assert "reference_arithmetic" not in vars(tiny_model.visual)
