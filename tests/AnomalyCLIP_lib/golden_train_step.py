"""One training step on the goldens' tiny model, compared with the original's recorded step.

Imported by the parity tests, and run as a script by them under ``ATEN_CPU_CAPABILITY=avx2``
(see ``test_parity.py`` for why): prints the comparison as one JSON line.
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
from train import make_optimizer, prompt_step, train_step


def compare_train_step(goldens: Path, variant: str, recorded_image_side: bool = False) -> dict[str, object]:
    """Run one training step as the goldens describe and measure the differences.

    With ``recorded_image_side`` the step starts from the original's recorded image embedding
    and patch tokens (``train.prompt_step``); otherwise our own image forward runs too
    (``train.train_step``).

    Returns:
        ``loss``, ``image_loss``, ``total``: absolute differences; ``loss_parts``: the largest
        absolute difference of the per-layer terms; ``grad_rel``: per parameter, max abs
        difference over the max abs reference gradient; ``grad_none_ok``: the unused
        projections got no gradient; ``param_abs``: max abs difference after the Adam step;
        ``unchanged_ok``: the projections did not move; ``cpu_capability``.
    """
    record = torch.load(goldens / "upstream_train_step.pt", weights_only=True)[variant]
    model = build_model(torch.load(goldens / "tiny_clip.pt", weights_only=True))
    learner = AnomalyCLIP_PromptLearner(model, design_details(n_ctx=12, depth=9, t_n_ctx=4))
    load_prompt_state(learner, goldens / "tiny_prompts.pth")
    before = {name: value.detach().clone() for name, value in learner.named_parameters()}
    optimizer = make_optimizer(learner, record["optimizer"]["lr"])
    if recorded_image_side:
        terms = prompt_step(model, learner, optimizer, record["image_features"], record["patch_features_raw"],
                            record["label"], record["gt"], record["image"].shape[-1])
    else:
        terms = train_step(model, learner, optimizer, record["image"], record["label"], record["gt"],
                           record["features_list"])

    parts_diff = 0.0
    initial = AnomalyCLIP_PromptLearner(model, design_details())
    load_prompt_state(initial, goldens / "tiny_prompts.pth")
    with torch.no_grad():
        _, patch_tokens = model.encode_image(record["image"], record["features_list"], 20)
        maps = scoring.similarity_maps(patch_tokens, scoring.text_features(model, initial), record["image"].shape[-1])
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
    unchanged_ok = all(torch.equal(dict(learner.named_parameters())[name].detach(), before[name])
                       for name in record["params_unchanged"])
    return {
        "loss": abs(terms.local.item() - record["loss"]),
        "image_loss": abs(terms.image.item() - record["image_loss"]),
        "total": abs(terms.total.item() - record["total"]),
        "loss_parts": parts_diff,
        "grad_rel": grad_rel,
        "grad_none_ok": grad_none_ok,
        "param_abs": param_abs,
        "unchanged_ok": unchanged_ok,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


if __name__ == "__main__":
    print(json.dumps(compare_train_step(Path(sys.argv[1]), sys.argv[2], recorded_image_side=True)))
