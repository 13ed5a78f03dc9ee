"""Softmax attention, written once: every "softmax(q kᵀ + bias) v" in vitlab goes through ``attend``.

Families differ in how they build q/k/v and the bias (relative positions, polyline masks, packing masks,
log-size for proportional attention), never in the softmax, which stays on
``F.scaled_dot_product_attention`` (fused kernels on CPU and CUDA). The one exception: when values are
wider than queries/keys (S2AFormer's channel-compressed strips) no fused kernel applies and SDPA's math
fallback (with its "safe" softmax) runs 2-6x slower on CPU than the three explicit ops, so ``attend``
writes them out itself, with SDPA's semantics (bias, bool mask, dropout, fully masked rows -> 0).

This module also gives ``torch.utils.flop_counter`` a formula for the CPU fused kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), which torch's counter lacks
(2.14 included) while it counts the CUDA kernels and the math path, so CPU counts agree with ``meta``/CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .tracing import is_fx_tracing

__all__ = ["Attention", "attend"]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias) v`` for ``q (B, h, N, d)``, ``k, v (B, h, M, d)`` -> ``(B, h, N, d)``.

    ``bias``: an additive float tensor broadcastable to ``(B, h, N, M)``, or a bool mask (True = attend).
    ``scale`` defaults to ``d ** -0.5``. ``v`` may be wider than ``q``/``k`` (``(B, h, M, d_v)`` ->
    ``(B, h, N, d_v)``); that case runs as explicit ops, every other through SDPA.
    """
    if is_fx_tracing():  # sizes are proxies: decide the path when the traced graph runs
        return _attend_traced(q, k, v, bias, dropout_p, scale)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attend expects (B, heads, N, head_dim) q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}")
    if bias is not None and bias.dtype != torch.bool and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if q.shape[-1] != v.shape[-1]:
        return _attend_explicit(q, k, v, bias, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


@torch.fx.wrap
def _attend_traced(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float, scale: float | None
) -> torch.Tensor:
    """``attend`` as one node of an FX graph (``torch.fx.wrap``): it runs, checks included, on real tensors."""
    return attend(q, k, v, bias, dropout_p, scale)


def _attend_explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float, scale: float | None
) -> torch.Tensor:
    """``attend`` as matmul + softmax + matmul, for value widths that differ from the query/key width."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q if scale == 1.0 else q * scale) @ k.transpose(-2, -1)  # (B, h, N, M); scale the smaller q
    empty = None
    if bias is not None:
        attn = attn.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else attn + bias
        empty = attn.isneginf().all(-1, keepdim=True)  # rows with nothing to attend give 0, as in SDPA
    attn = attn.softmax(-1)
    if empty is not None:
        attn = attn.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``).

    The mixer contract: ``forward(x (B, N, C), grid=None, bias=None) -> (B, N, C)``; ``grid`` is unused
    here and accepted so attention is interchangeable with the other mixers. timm ViT checkpoints load.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads} (>= 1)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int] | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attend(q, k, v, bias, self.attn_drop if self.training else 0.0, self.scale)
        # -1, not C: compress.structured may have removed heads
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *_: Any, **__: Any) -> int:
    """``q kᵀ`` plus ``p v``, 2 FLOPs per multiply-accumulate, as torch counts its CUDA SDPA kernels.

    Masks and ``is_causal`` do not lower the count (torch's formulas do not either).
    """
    # q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv); the query's leading dims count (k/v heads may be fewer: GQA)
    Nq, D = query_shape[-2:]
    return 2 * math.prod(query_shape[:-2]) * Nq * key_shape[-2] * (D + value_shape[-1])


def _sdpa_backward_flops(
    grad_out_shape: torch.Size,
    query_shape: torch.Size,
    key_shape: torch.Size,
    value_shape: torch.Size,
    *_: Any,
    **__: Any,
) -> int:
    """Backward: recompute ``q kᵀ``, then ``dp = do vᵀ``, ``dv = pᵀ do``, ``dq = ds k``, ``dk = dsᵀ q``."""
    Nq, D = query_shape[-2:]
    return 2 * math.prod(query_shape[:-2]) * Nq * key_shape[-2] * (3 * D + 2 * value_shape[-1])


# NOTE: registered once per process and only where torch has no formula of its own, so a torch that
# gains one keeps it; getattr because an op missing from some torch build must not break the import.
for _name, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None and _op not in flop_registry:
        register_flop_formula(_op)(_formula)
