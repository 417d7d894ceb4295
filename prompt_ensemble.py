"""AnomalyCLIP's object-agnostic prompt learner (method §4) and its checkpoint I/O.

Parameters, buffers and state-dict keys are exactly the original's, so prompt checkpoints
move between the two implementations in both directions.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.safe_load import check_is_file, load_tensors
from AnomalyCLIP_lib.model import CLIP
from AnomalyCLIP_lib.tokenizer import tokenize

logger = logging.getLogger(__name__)

UNUSED_PROJECTION_WIDTH = 896
NORMAL_TEMPLATE = "{}."
ABNORMAL_TEMPLATE = "damaged {}."
OBJECT_NAME = "object"


def design_details(n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4) -> dict[str, int]:
    """The original's ``AnomalyCLIP_parameters`` dict for the given prompt design."""
    return {
        "Prompt_length": n_ctx,
        "learnabel_text_embedding_depth": depth,
        "learnabel_text_embedding_length": t_n_ctx,
    }


class AnomalyCLIP_PromptLearner(nn.Module):
    """Learnable normal/abnormal prompts plus deep text tokens.

    Args:
        clip_model: The backbone; only its token embedding and widths are read.
        design: ``design_details(...)``: prompt length E (``n_ctx``), deep-token depth and
            deep-token length (``t_n_ctx``).

    State dict (for ViT-L/14, text width 768): ``ctx_pos``/``ctx_neg`` (1, 1, E, 768);
    ``compound_prompts_text.{0..depth-2}`` (t_n_ctx, 768); the never-used
    ``compound_prompt_projections.{i}.weight/bias`` (896, 768)/(896,), kept because the original
    loads prompt checkpoints strictly; buffers ``token_prefix_*`` (1, 1, 1, 768),
    ``token_suffix_*`` (1, 1, 77-1-E, 768) and ``tokenized_prompts_*`` (1, 1, 77) int32.
    """

    def __init__(self, clip_model: CLIP, design: Mapping[str, int] | None = None) -> None:
        super().__init__()
        design = dict(design or design_details())
        self.n_ctx = int(design["Prompt_length"])
        self.depth = int(design["learnabel_text_embedding_depth"])
        self.t_n_ctx = int(design["learnabel_text_embedding_length"])
        self._validate(clip_model)
        width = clip_model.ln_final.weight.shape[0]
        dtype = clip_model.dtype

        ctx_pos = torch.empty(1, 1, self.n_ctx, width, dtype=dtype)
        ctx_neg = torch.empty(1, 1, self.n_ctx, width, dtype=dtype)
        nn.init.normal_(ctx_pos, std=0.02)
        nn.init.normal_(ctx_neg, std=0.02)
        self.compound_prompts_text = nn.ParameterList(
            nn.Parameter(torch.empty(self.t_n_ctx, width)) for _ in range(self.depth - 1)
        )
        for deep_tokens in self.compound_prompts_text:
            nn.init.normal_(deep_tokens, std=0.02)
        projection = nn.Linear(width, UNUSED_PROJECTION_WIDTH)
        self.compound_prompt_projections = nn.ModuleList(copy.deepcopy(projection) for _ in range(self.depth - 1))
        self.ctx_pos = nn.Parameter(ctx_pos)
        self.ctx_neg = nn.Parameter(ctx_neg)

        placeholder = " ".join(["X"] * self.n_ctx)
        for suffix, template in (("pos", NORMAL_TEMPLATE), ("neg", ABNORMAL_TEMPLATE)):
            ids = tokenize(f"{placeholder} {template.format(OBJECT_NAME)}", clip_model.context_length)
            with torch.no_grad():
                embedding = clip_model.token_embedding(ids.long().to(clip_model.token_embedding.weight.device))
            embedding = embedding.to(dtype).cpu().view(1, 1, *embedding.shape[1:])
            self.register_buffer(f"token_prefix_{suffix}", embedding[:, :, :1].clone())
            self.register_buffer(f"token_suffix_{suffix}", embedding[:, :, 1 + self.n_ctx :].clone())
            self.register_buffer(f"tokenized_prompts_{suffix}", ids.view(1, 1, -1))

    def _validate(self, clip_model: CLIP) -> None:
        if self.n_ctx < 1 or self.depth < 1 or self.t_n_ctx < 1:
            raise AnomalyCLIPError(f"n_ctx, depth and t_n_ctx must be positive; "
                                   f"got {self.n_ctx}, {self.depth}, {self.t_n_ctx}")
        if self.depth > clip_model.transformer.layers:
            raise AnomalyCLIPError(f"--depth {self.depth} exceeds the backbone's "
                                   f"{clip_model.transformer.layers} text layers")
        if self.t_n_ctx > self.n_ctx + 2:
            raise AnomalyCLIPError(f"--t_n_ctx {self.t_n_ctx} is longer than the prompt it overwrites")
        # The longer template with its start/end tokens; each placeholder "X" is one more token.
        template_tokens = max(int((tokenize(t.format(OBJECT_NAME), clip_model.context_length) != 0).sum())
                              for t in (NORMAL_TEMPLATE, ABNORMAL_TEMPLATE))
        longest = clip_model.context_length - template_tokens
        if self.n_ctx > longest:
            raise AnomalyCLIPError(f"--n_ctx {self.n_ctx} makes the prompt longer than the text encoder's "
                                   f"{clip_model.context_length} tokens: use at most {longest}")

    def forward(self, cls_id: object = None) -> tuple[torch.Tensor, torch.Tensor, nn.ParameterList]:
        """Prompt embeddings ``(2, 77, width)``, token ids ``(2, 77)`` and the deep tokens.

        Row 0 is the normal prompt, row 1 the abnormal one. ``cls_id`` is accepted and ignored,
        as in the original (the prompts are object-agnostic).
        """
        pos = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        neg = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        length, width = pos.shape[-2:]
        prompts = torch.cat([pos.reshape(-1, length, width), neg.reshape(-1, length, width)], dim=0)
        tokenized = torch.cat(
            [self.tokenized_prompts_pos.reshape(-1, length), self.tokenized_prompts_neg.reshape(-1, length)], dim=0
        )
        return prompts, tokenized, self.compound_prompts_text


def checkpoint_design(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``n_ctx``, ``depth``, ``t_n_ctx`` and text ``width`` that a prompt state dict was made with."""
    deep = [key for key in state_dict if key.startswith("compound_prompts_text.")]
    ctx = state_dict["ctx_pos"]
    return {
        "n_ctx": ctx.shape[2],
        "depth": len(deep) + 1,
        "t_n_ctx": state_dict["compound_prompts_text.0"].shape[0] if deep else 0,
        "width": ctx.shape[3],
    }


def _prompt_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("prompt_learner"), Mapping):
        checkpoint = checkpoint["prompt_learner"]
    if not isinstance(checkpoint, Mapping) or "ctx_pos" not in checkpoint:
        raise AnomalyCLIPError(f"{path} is not a prompt checkpoint (no 'prompt_learner' entry with 'ctx_pos')")
    return dict(checkpoint)


def read_prompt_checkpoint(path: str | os.PathLike) -> dict[str, object]:
    """The whole checkpoint file, loaded safely onto the CPU.

    Files written by the original on a GPU hold CUDA tensors; ``map_location="cpu"`` moves them.

    Raises:
        AnomalyCLIPError: Missing or unreadable file.
    """
    path = Path(path)
    check_is_file(path, "prompt checkpoint", "check the path given to --checkpoint_path (or --resume)")
    checkpoint = load_tensors(path, "prompt checkpoint")
    if not isinstance(checkpoint, dict):
        raise AnomalyCLIPError(f"{path} is not a prompt checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def load_prompt_state(prompt_learner: AnomalyCLIP_PromptLearner, path: str | os.PathLike) -> dict[str, object]:
    """Load the prompt learner's weights from a checkpoint of the original's or our format.

    The unused ``compound_prompt_projections`` entries may be present (released files) or
    absent (then the learner's own are kept). Everything else must match.

    Returns:
        The whole checkpoint dict (ours also carries optimizer state, epoch and config).

    Raises:
        AnomalyCLIPError: Wrong file, or a prompt design that differs from the learner's.
    """
    path = Path(path)
    checkpoint = read_prompt_checkpoint(path)
    state = _prompt_state_dict(checkpoint, path)
    found = checkpoint_design(state)
    expected = {"n_ctx": prompt_learner.n_ctx, "depth": prompt_learner.depth, "t_n_ctx": prompt_learner.t_n_ctx,
                "width": prompt_learner.ctx_pos.shape[3]}
    if found != expected:
        if found["width"] != expected["width"]:
            raise AnomalyCLIPError(
                f"{path} was trained on a backbone with text width {found['width']}, this one has "
                f"{expected['width']}; use the backbone the prompts were trained with"
            )
        raise AnomalyCLIPError(
            f"{path} was trained with --n_ctx {found['n_ctx']} --depth {found['depth']} --t_n_ctx {found['t_n_ctx']}, "
            f"not --n_ctx {expected['n_ctx']} --depth {expected['depth']} --t_n_ctx {expected['t_n_ctx']}; "
            "pass the former"
        )
    broken = [key for key, value in state.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise AnomalyCLIPError(f"{path} holds NaN or infinite values in {', '.join(broken[:3])}: the training that "
                               "wrote it diverged (try a lower --learning_rate) or the file is damaged")
    try:
        missing, unexpected = prompt_learner.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[1:2]).strip()
        raise AnomalyCLIPError(f"{path} does not fit this backbone's prompt learner: {detail}") from None
    missing = [key for key in missing if not key.startswith("compound_prompt_projections.")]
    if missing or unexpected:
        raise AnomalyCLIPError(
            f"{path} does not match the prompt learner: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return checkpoint
