"""Transformer building blocks of CLIP, with the DPAM dual-attention mode (method §2, §3).

Tensors are batch-first, ``(B, tokens, width)``. Parameter names follow OpenAI's state-dict
layout (``attn.in_proj_weight``, ``attn.out_proj``, ``ln_1``, ``mlp.c_fc``, ...), so an OpenAI
checkpoint loads with a strict ``load_state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in fp32 and casts back, as OpenAI CLIP does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, CLIP's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with packed q/k/v weights (``nn.MultiheadAttention`` layout).

    Besides the usual forward it offers :meth:`forward_dpam`, which computes the ordinary
    attention and the value-value (DPAM) attention from one shared qkv projection.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, heads_out: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, head_dim = heads_out.shape
        return self.out_proj(heads_out.transpose(1, 2).reshape(batch, tokens, self.heads * head_dim))

    def forward(self, x: torch.Tensor, causal: bool = False, query_tokens: int | None = None) -> torch.Tensor:
        """Ordinary attention.

        Args:
            x: ``(B, N, width)`` normalised input.
            causal: Mask attention to later tokens (text tower).
            query_tokens: Compute outputs for the first ``query_tokens`` tokens only (keys and
                values still cover every token); ``None`` for all.
        """
        q, k, v = self._qkv(x)
        if query_tokens is not None:
            q = q[:, :, :query_tokens]
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def forward_dpam(
        self, x: torch.Tensor, query_tokens: int | None = None, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ordinary and value-value attention from one qkv projection (method §3).

        Args:
            x: ``(B, N, width)`` normalised input.
            query_tokens: Limit ``a_ori`` to the first tokens.
            reference: Use the released code's arithmetic (explicit ``q k^T * scale``, softmax,
                ``@ v``) instead of the fused kernel: bit-identical to the original on the same
                CPU kernels, slower, and it materialises the attention matrices.

        Returns:
            ``(a_ori, a_v)``: ``softmax(q k^T / sqrt(d)) v`` and ``softmax(v v^T / sqrt(d)) v``,
            each through ``out_proj``.
        """
        q, k, v = self._qkv(x)
        if query_tokens is not None:
            q = q[:, :, :query_tokens]
        if reference:
            scale = q.shape[-1] ** -0.5
            a_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
            a_v = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
        else:
            a_ori = F.scaled_dot_product_attention(q, k, v)
            a_v = F.scaled_dot_product_attention(v, v, v)
        return self._merge(a_ori), self._merge(a_v)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def _finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + attn_out
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, causal: bool = False, query_tokens: int | None = None) -> torch.Tensor:
        """One block; with ``query_tokens`` only the first tokens' outputs are computed."""
        attn_out = self.attn(self.ln_1(x), causal=causal, query_tokens=query_tokens)
        if query_tokens is not None:
            x = x[:, :query_tokens]
        return self._finish(x, attn_out)

    def forward_dpam(
        self, x_ori: torch.Tensor, x_dpam: torch.Tensor, query_tokens: int | None = None, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block in DPAM mode (method §3).

        Both attentions read ``ln_1`` of the original stream. The original stream gets the
        usual residual and MLP; the DPAM stream only accumulates the value-value attention.

        Args:
            x_ori: Original (CLIP) hidden state ``(B, N, width)``.
            x_dpam: DPAM hidden state; pass ``x_ori`` itself at the first DPAM layer.
            query_tokens: Compute the original stream for the first tokens only.
            reference: See :meth:`SelfAttention.forward_dpam`.

        Returns:
            ``(x_ori, x_dpam)`` after this block.
        """
        a_ori, a_v = self.attn.forward_dpam(self.ln_1(x_ori), query_tokens=query_tokens, reference=reference)
        x_dpam = x_dpam + a_v
        if query_tokens is not None:
            x_ori = x_ori[:, :query_tokens]
        return self._finish(x_ori, a_ori), x_dpam


class Transformer(nn.Module):
    """A stack of residual attention blocks (``transformer.resblocks.N`` in the state dict)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
