"""CLIP ViT with AnomalyCLIP's DPAM image encoder and deep learnable text tokens.

The architecture is OpenAI CLIP (method §2). Two things are AnomalyCLIP's own:

* :meth:`VisionTransformer.encode` runs the last ``dpam_layer - 1`` blocks in DPAM mode
  (method §3) and returns the image embedding plus patch tokens of requested layers. DPAM is a
  mode of the forward pass: the loaded weights are neither copied nor changed.
* :meth:`CLIP.encode_text_learn` replaces token positions ``1..t_n_ctx`` with learnable deep
  tokens before the first blocks of the text tower (method §4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .constants import DPAM_LAYER
from .errors import AnomalyCLIPError
from .transformer import LayerNorm, Transformer


def normalize_layers(features_list: Iterable[int], num_layers: int) -> list[int]:
    """Distinct 1-based layer numbers in ascending order (method §3), validated.

    Raises:
        AnomalyCLIPError: A layer outside ``1..num_layers``.
    """
    layers = sorted(set(int(layer) for layer in features_list))
    if not layers:
        raise AnomalyCLIPError("--features_list is empty; pass at least one layer, e.g. --features_list 24")
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise AnomalyCLIPError(
            f"--features_list has layers {bad} outside 1..{num_layers} (the backbone has {num_layers} vision layers)"
        )
    return layers


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower (state-dict prefix ``visual.``)."""

    def __init__(
        self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    @property
    def num_layers(self) -> int:
        return self.transformer.layers

    def positional_embedding_for(self, grid: int) -> torch.Tensor:
        """The positional table for a ``grid x grid`` token grid (method §2).

        The patch part is resized bilinearly (align_corners=False, no antialias) when the grid
        differs from the checkpoint's; the class position is kept. Computed per call, never
        written back into the parameter.
        """
        table = self.positional_embedding
        native = round(math.sqrt(table.shape[0] - 1))
        if grid == native:
            return table
        width = table.shape[1]
        patch_part = table[1:].reshape(1, native, native, width).permute(0, 3, 1, 2)
        resized = F.interpolate(patch_part, size=(grid, grid), mode="bilinear", align_corners=False)
        resized = resized[0].reshape(width, grid * grid).transpose(0, 1)
        return torch.cat([table[:1], resized], dim=0)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend the class token, add positions, ``ln_pre``: ``(B, 1 + g*g, width)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise AnomalyCLIPError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        if images.shape[-1] != images.shape[-2] or images.shape[-1] % self.patch_size:
            raise AnomalyCLIPError(
                f"image size {tuple(images.shape[-2:])} must be square and a multiple of the "
                f"patch size {self.patch_size} (e.g. --image_size 518 for ViT-L/14)"
            )
        x = self.conv1(images.to(self.conv1.weight.dtype))
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding_for(grid).to(x.dtype)
        return self.ln_pre(x)

    def encode(
        self,
        images: torch.Tensor,
        features_list: Sequence[int] = (24,),
        dpam_layer: int | None = DPAM_LAYER,
        reference_arithmetic: bool = False,
        plain_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embedding and per-layer patch tokens (method §3).

        Work whose result is not returned is skipped: the DPAM stream stops at the deepest
        requested layer, and in the last block only the class token of the original stream is
        computed unless that block's plain hidden state is itself requested. On a CPU a batch
        runs one image at a time (unless ``reference_arithmetic``): a block's matmuls are
        already compute-bound at one image's tokens, and a batch's larger activations only cost
        memory traffic (ViT-L/14 at 518 px, batch 8: 11.2 s per image in one pass, 9.1 s image by
        image); every image then gets exactly its single-image result.

        Args:
            images: ``(B, 3, S, S)`` preprocessed images; S a multiple of the patch size.
            features_list: 1-based layers whose patch tokens to return; sorted and de-duplicated.
            dpam_layer: The last ``dpam_layer - 1`` blocks run in DPAM mode; ``None`` for plain CLIP.
            reference_arithmetic: DPAM blocks compute attention with the released code's explicit
                matmul-softmax arithmetic and the last block runs on every token, so results are
                bit-identical to the original's on the same CPU kernels. Off by default: the fused
                attention kernel and the class-token-only last block are faster and differ only by
                fp32 rounding (~1e-6).
            plain_layers: Layers whose plain-stream (original CLIP) tokens to return as well, after
                those of ``features_list`` (the few-shot memory's ``plain`` tokens).

        Returns:
            ``(image_embedding (B, D), [patch_tokens (B, 1 + g*g, D) per layer])``. The image
            embedding is the original stream's class token ``@ proj`` WITHOUT ``ln_post`` (as the
            released code computes it); patch tokens are ``ln_post(.) @ proj`` of the DPAM stream
            (the plain stream before the first DPAM block). Nothing is normalised.
        """
        layers = normalize_layers(features_list, self.num_layers)
        plain = normalize_layers(plain_layers, self.num_layers) if plain_layers else []
        first_dpam = self._first_dpam_layer(dpam_layer)
        if images.device.type == "cpu" and images.ndim == 4 and len(images) > 1 and not reference_arithmetic:
            parts = [self._encode(image[None], layers, first_dpam, plain_layers=plain) for image in images]
            return torch.cat([p[0] for p in parts]), [torch.cat(t) for t in zip(*(p[1] for p in parts))]
        return self._encode(images, layers, first_dpam, reference_arithmetic, plain)

    def _encode(
        self, images: torch.Tensor, layers: list[int], first_dpam: int, reference_arithmetic: bool = False,
        plain_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`encode` of a batch in one pass, with validated ``layers`` and first DPAM block.

        ``plain_layers`` (validated too): the plain (original CLIP) stream's tokens at these layers are
        returned after those of ``layers`` (the few-shot memory's ``plain`` tokens); the DPAM stream
        still stops at the deepest of ``layers``.
        """
        num_layers = self.num_layers
        deepest_requested = layers[-1]
        x_ori = self.embed(images)
        x_dpam: torch.Tensor | None = None
        collected: list[torch.Tensor] = []
        plain: list[torch.Tensor] = []
        for number, block in enumerate(self.transformer.resblocks, start=1):
            dpam_here = first_dpam <= number <= deepest_requested
            needs_full_ori = number < num_layers or (number in layers and not dpam_here) or number in plain_layers
            query_tokens = None if needs_full_ori or reference_arithmetic else 1
            if dpam_here:
                x_ori, x_dpam = block.forward_dpam(
                    x_ori, x_ori if x_dpam is None else x_dpam, query_tokens, reference_arithmetic
                )
            else:
                x_ori = block(x_ori, query_tokens=query_tokens)
            if number in layers:
                collected.append(x_dpam if dpam_here else x_ori)
            if number in plain_layers:
                plain.append(x_ori)

        image_embedding = x_ori[:, 0] @ self.proj
        patch_tokens = [self.ln_post(tokens) @ self.proj for tokens in collected + plain]
        return image_embedding, patch_tokens

    def _first_dpam_layer(self, dpam_layer: int | None) -> int:
        """1-based number of the first DPAM block, or one past the last layer when off."""
        num_layers = self.num_layers
        if dpam_layer is None:
            return num_layers + 1
        if not 2 <= dpam_layer <= num_layers + 1:
            raise AnomalyCLIPError(
                f"dpam_layer {dpam_layer} must be in 2..{num_layers + 1} for a {num_layers}-layer "
                "vision tower (the last dpam_layer - 1 blocks get DPAM)"
            )
        return num_layers - dpam_layer + 2


class CLIP(nn.Module):
    """CLIP ViT (OpenAI state-dict layout) with AnomalyCLIP's encoders."""

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: int,
        vision_width: int,
        vision_patch_size: int,
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(
            input_resolution=image_resolution,
            patch_size=vision_patch_size,
            width=vision_width,
            layers=vision_layers,
            heads=vision_width // 64 or 1,
            output_dim=embed_dim,
        )
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=transformer_width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(
        self,
        images: torch.Tensor,
        features_list: Sequence[int] = (24,),
        dpam_layer: int | None = DPAM_LAYER,
        reference_arithmetic: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """See :meth:`VisionTransformer.encode`."""
        return self.visual.encode(images, features_list, dpam_layer, reference_arithmetic)

    def encode_text_learn(
        self,
        prompts: torch.Tensor,
        tokenized_prompts: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text features of prompt embeddings with deep learnable tokens (method §4).

        Before block ``i`` (0-based) for ``i = 1..len(deep_prompts)``, token positions
        ``1..t_n_ctx`` are replaced by ``deep_prompts[i - 1]``, rounded to fp16 values as the
        released code does (its prompts were trained through that rounding, gradients included).

        Args:
            prompts: ``(P, context_length, width)`` token embeddings.
            tokenized_prompts: ``(P, context_length)`` ids; the end-of-text token is their argmax.
            deep_prompts: ``(t_n_ctx, width)`` tensors, one per block after the first.

        Returns:
            ``(P, embed_dim)`` projected, not normalised.
        """
        deep_prompts = list(deep_prompts or [])
        if len(deep_prompts) >= self.transformer.layers:
            raise AnomalyCLIPError(
                f"depth {len(deep_prompts) + 1} exceeds the {self.transformer.layers} text layers of the backbone"
            )
        x = prompts + self.positional_embedding.to(prompts.dtype)
        for index, block in enumerate(self.transformer.resblocks):
            if 1 <= index <= len(deep_prompts):
                x = self._insert_deep_tokens(x, deep_prompts[index - 1])
            x = block(x, causal=True)
        x = self.ln_final(x)
        end_of_text = tokenized_prompts.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), end_of_text] @ self.text_projection

    @staticmethod
    def _insert_deep_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        count = tokens.shape[0]
        # .half() then type promotion in cat: the released code's fp16 rounding, kept for parity.
        context = tokens.expand(x.shape[0], -1, -1).half()
        return torch.cat([x[:, :1], context, x[:, 1 + count :]], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain CLIP text features of token ids ``(P, context_length)``."""
        return self.encode_text_learn(self.token_embedding(tokens).to(self.dtype), tokens)


def _count_prefixed(state_dict: dict[str, torch.Tensor], prefix: str, suffix: str) -> int:
    return sum(1 for key in state_dict if key.startswith(prefix) and key.endswith(suffix))


def model_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture of a CLIP ViT read from tensor shapes (method §2).

    Raises:
        AnomalyCLIPError: Not a CLIP ViT state dict.
    """
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise AnomalyCLIPError(
            f"not a CLIP ViT checkpoint: missing {missing[:5]} (ResNet CLIPs are not supported)"
        )
    conv = state_dict["visual.conv1.weight"]
    grid = round(math.sqrt(state_dict["visual.positional_embedding"].shape[0] - 1))
    text_blocks = {key.split(".")[2] for key in state_dict if key.startswith("transformer.resblocks.")}
    text_width = state_dict["ln_final.weight"].shape[0]
    return {
        "embed_dim": state_dict["text_projection"].shape[1],
        "image_resolution": conv.shape[-1] * grid,
        "vision_layers": _count_prefixed(state_dict, "visual.", ".attn.in_proj_weight"),
        "vision_width": conv.shape[0],
        "vision_patch_size": conv.shape[-1],
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "transformer_width": text_width,
        "transformer_heads": text_width // 64 or 1,
        "transformer_layers": len(text_blocks),
    }


NON_TENSOR_KEYS = ("input_resolution", "context_length", "vocab_size")


def build_model(state_dict: dict[str, torch.Tensor]) -> CLIP:
    """Build a CLIP from a state dict in OpenAI's layout and load it (fp32, eval mode, frozen).

    Raises:
        AnomalyCLIPError: Missing or mis-shaped entries.
    """
    state_dict = {key: value for key, value in state_dict.items() if key not in NON_TENSOR_KEYS}
    model = CLIP(**model_config_from_state_dict(state_dict))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[1:3]) or first_line[0]
        raise AnomalyCLIPError(f"checkpoint does not fit the CLIP layout it describes: {detail}") from None
    return model.float().eval().requires_grad_(False)
