"""One training step on the goldens' tiny model, compared with the original's recorded step.

Imported by the parity tests, and run as a script by them on PyTorch's AVX2 kernels (see
``test_parity.py`` for why): prints the comparison as one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.model import build_model
from loss import layer_loss_parts
from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details, load_prompt_state
from pipeline.training import make_optimizer, train_step

def golden_model(goldens: Path):
    return build_model(torch.load(goldens / "tiny_clip.pt", weights_only=True))


def golden_prompts(model, goldens: Path) -> AnomalyCLIP_PromptLearner:
    learner = AnomalyCLIP_PromptLearner(model, design_details(n_ctx=12, depth=9, t_n_ctx=4))
    load_prompt_state(learner, goldens / "tiny_prompts.pth")
    return learner


def compare_train_step(goldens: Path, variant: str, reference_arithmetic: bool = False) -> dict[str, object]:
    """Run ``train.train_step`` as the goldens describe and measure the differences.

    Returns:
        ``loss``, ``image_loss``, ``total``: absolute differences; ``loss_parts``: the largest
        absolute difference of the per-layer terms; ``grad_rel``: per parameter, max abs
        difference over the max abs reference gradient; ``grad_none_ok``: the unused
        projections got no gradient; ``param_abs``: max abs difference after the Adam step;
        ``unchanged_ok``: the projections did not move; ``cpu_capability``.
    """
    record = torch.load(goldens / "upstream_train_step.pt", weights_only=True)[variant]
    model = golden_model(goldens)
    learner = golden_prompts(model, goldens)
    before = {name: value.detach().clone() for name, value in learner.named_parameters()}
    optimizer = make_optimizer(learner, record["optimizer"]["lr"])
    terms = train_step(model, learner, optimizer, record["image"], record["label"], record["gt"],
                       record["features_list"], reference_arithmetic=reference_arithmetic)

    parts_diff = 0.0
    with torch.no_grad():
        _, patch_tokens = model.encode_image(record["image"], record["features_list"], 20, reference_arithmetic)
        text_feats = scoring.text_features(model, golden_prompts(model, goldens))
        maps = scoring.similarity_maps(patch_tokens, text_feats, record["image"].shape[-1])
        for layer_map, ref_parts in zip(maps, record["loss_parts_per_layer"]):
            for name, value in layer_loss_parts(layer_map, record["gt"]).items():
                parts_diff = max(parts_diff, abs(value.item() - ref_parts[name]))

    grad_rel, grad_none_ok, param_abs = {}, True, {}
    for name, param in learner.named_parameters():
        ref_grad = record["grads"][name]
        if ref_grad is None:
            grad_none_ok &= param.grad is None
            continue
        grad_rel[name] = ((param.grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        param_abs[name] = (param.detach() - record["params_after"][name]).abs().max().item()
    params = dict(learner.named_parameters())
    return {
        "loss": abs(terms.local.item() - record["loss"]),
        "image_loss": abs(terms.image.item() - record["image_loss"]),
        "total": abs(terms.total.item() - record["total"]),
        "loss_parts": parts_diff,
        "grad_rel": grad_rel,
        "grad_none_ok": grad_none_ok,
        "param_abs": param_abs,
        "unchanged_ok": all(torch.equal(params[name].detach(), before[name]) for name in record["params_unchanged"]),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def compare_encode_image(goldens: Path, reference_arithmetic: bool = False) -> dict[str, float]:
    """Largest absolute difference to each ``upstream_encode_image*.pt`` (embedding and tokens)."""
    model = golden_model(goldens)
    result = {}
    for file_name, dpam_layer in (("upstream_encode_image.pt", 20), ("upstream_encode_image_plain.pt", None),
                                  ("upstream_encode_image_56.pt", 20)):
        record = torch.load(goldens / file_name, weights_only=True)
        with torch.no_grad():
            embedding, tokens = model.encode_image(record["x"], record["features_list"], dpam_layer,
                                                   reference_arithmetic)
        diffs = [(embedding - record["image_features"]).abs().max().item()]
        diffs += [(ours - ref).abs().max().item() for ours, ref in zip(tokens, record["patch_tokens"], strict=True)]
        result[file_name] = max(diffs)
    return result


if __name__ == "__main__":
    goldens_dir = Path(sys.argv[1])
    print(json.dumps({
        "encode_image": compare_encode_image(goldens_dir, reference_arithmetic=True),
        "train_step": {variant: compare_train_step(goldens_dir, variant, reference_arithmetic=True)
                       for variant in ("f24", "f6_12_18_24")},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }))
