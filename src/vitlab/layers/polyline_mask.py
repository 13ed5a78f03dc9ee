"""Polyline path masks and polyline-path-masked attention (PPMA).

"Polyline Path Masked Attention for Vision Transformer" (Zhao et al., NeurIPS 2025, arXiv:2506.15940),
official code https://github.com/zhongchenzhao/PPMA (``PathEmbeding2D``, ``MambaAttention*Double``).

Mamba2's structured mask weights token pairs by the product of per-token decays along the scan between
them. PPMA scans a 2-D grid along L-shaped (polyline) paths: from query ``(i, j)`` horizontally along row
``i`` to column ``l``, then vertically along column ``l`` to key ``(k, l)``. In log space the mask is
``M[(i,j),(k,l)] = S_row_i[j, l] + S_col_l[i, k]`` with ``S`` the 1-D segment sums of the log-decays
(``segment_sum``); ``Mᵀ`` is the vertical-then-horizontal path. ``polyline_path_mask`` builds the
``(HW, HW)`` mask by broadcasting the two sets of 1-D masks, ``O(HW (H + W))`` work for the 1-D parts instead
of walking every path (``O((HW)^2 (H + W))``). The mask is an additive bias before the softmax (``exp(M)``
multiplies the attention weights, then rows renormalise).

``PolylinePathAttention`` is the official "whole" attention: ``(softmax(Z + M) + softmax(Z + Mᵀ)) / 2 · v``
with ``Z = q kᵀ / sqrt(d)``, plus a 5x5 depthwise LePE on v; ``AxialPolylinePathAttention`` the official
"chunk" form for large grids, the criss-cross factorisation ``(A_col A_row v + A_row A_col v) / 2`` with the
1-D masks on each axis. As in the official code, ``Z`` (per axis in the chunk form) is computed once and
shared by both paths, so the softmax is spelled out here rather than run through ``layers.attend``: one SDPA
call per path would recompute ``q kᵀ`` and the product with ``v`` (PPMA-T: 2.91 instead of 2.70 GMACs).
RoPE is one complex multiply on q and k together (float32/64; timm's ``apply_rot_embed`` otherwise), with
the softmax scale folded into q's table and the paths' 1/2 into the final sum with LePE.
Deviations: q/k/v come from one fused ``qkv`` linear (official: three), same parameters and FLOPs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed

from .block import Grid, map_to_tokens, tokens_to_map

__all__ = ["AxialPolylinePathAttention", "PolylinePathAttention", "polyline_path_mask", "segment_sum"]


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """Symmetric 1-D segment sums: ``(..., L)`` -> ``(..., L, L)``, ``out[i, j] = sum(x[min(i,j)+1 : max(i,j)+1])``.

    With ``x`` the log-decay of stepping onto each position, ``exp(out[i, j])`` is the product of the decays
    met between ``i`` and ``j`` in either direction (Mamba2's mask, made bidirectional as in PPMA).
    """
    c = x.cumsum(-1)
    idx = torch.arange(x.shape[-1], device=x.device)
    sign = torch.where(idx[:, None] >= idx, 1.0, -1.0)  # (L, L)
    return (c[..., :, None] - c[..., None, :]).mul_(sign)  # one pass fewer than torch.where(i >= j, d, -d)


def polyline_path_mask(alpha: torch.Tensor, beta: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Log polyline path mask ``(..., H*W, H*W)`` from horizontal / vertical log-decays ``(..., H, W)``.

    ``M[(i,j),(k,l)]`` sums ``alpha`` along row ``i`` between columns ``j`` and ``l``, then ``beta`` along
    column ``l`` between rows ``i`` and ``k`` (horizontal-then-vertical). ``transposed``: ``Mᵀ``, the other path,
    built the same way (a contiguous broadcast sum; reading ``M`` through a transposed view costs 2x more).
    """
    if alpha.shape != beta.shape or alpha.ndim < 2:
        raise ValueError(
            f"alpha and beta must share a (..., H, W) shape, got {tuple(alpha.shape)}, {tuple(beta.shape)}"
        )
    H, W = alpha.shape[-2:]
    row = segment_sum(alpha)  # (..., H, W, W): [i, j, l]
    col = segment_sum(beta.transpose(-1, -2))  # (..., W, H, H): [l, i, k]
    # the small factors are made contiguous in the order they broadcast in, so the sum comes out contiguous
    if transposed:  # Mᵀ[(i,j),(k,l)] = S_row_k[j, l] + S_col_j[i, k] (segment sums are symmetric)
        row = row.transpose(-3, -2).contiguous().unsqueeze(-4)  # [1, j, k, l]
        col = col.transpose(-3, -2).contiguous().unsqueeze(-1)  # [i, j, k, 1]
    else:
        row, col = row.unsqueeze(-2), col.movedim(-3, -1).contiguous().unsqueeze(-3)  # [i, j, 1, l], [i, 1, k, l]
    return (row + col).view(*alpha.shape[:-2], H * W, H * W)


_CHUNK = 1 << 22  # N x N elements per chunk of the full form (16 MiB in float32)


def _rope_sin_cos(n: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # official: 1-D rotary positions over the row-major token index, pairs interleaved (timm's layout)
    angle = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 2, device=device)
    theta = torch.arange(n, device=device, dtype=torch.float32)[:, None] * angle.repeat_interleave(2)[None]
    return theta.sin(), theta.cos()  # (N, head_dim) each


def _rotate_pairs(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """timm's ``apply_rot_embed(x, sin, cos)`` (interleaved pairs) as one complex multiply for float32/64 ``x``."""
    if x.dtype not in (torch.float32, torch.float64):
        return apply_rot_embed(x, sin, cos)  # half / bfloat16: no complex type on every device
    turn = torch.complex(cos[..., ::2], sin[..., ::2])  # e^(i theta) per pair
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * turn).flatten(-2)


class PolylinePathAttention(nn.Module):
    """Softmax attention with the polyline path mask as an additive bias, RoPE on q/k and LePE on v.

    Args:
        lepe_kernel: kernel of the depthwise conv on v added to the output (RMT's LePE).
        a_init_range: range of the per-head decay scales ``A`` (``-exp(A_log)``).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes (Mamba2's ``dt_bias`` init).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        lepe_kernel: int = 5,
        a_init_range: tuple[float, float] = (1.0, 1.1),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into num_heads {num_heads} heads of even width")
        if not 0 < a_init_range[0] <= a_init_range[1]:
            raise ValueError(f"a_init_range must be 0 < low <= high, got {a_init_range}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)
        # one (horizontal, vertical) step size per token and head, from that head's slice of the input
        self.dt_proj = nn.Linear(self.head_dim, 2, bias=False)
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(*a_init_range).log())

    def log_decays(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Horizontal and vertical log-decays ``(B, heads, H, W)`` (<= 0) of the tokens ``x (B, N, C)``."""
        B, N, _ = x.shape
        dt = self.dt_proj(x.view(B, N, self.num_heads, self.head_dim))  # (B, N, heads, 2)
        log_a = F.softplus(dt + self.dt_bias[:, None]) * -torch.exp(self.A_log)[:, None]  # Mamba2: dt * A
        alpha, beta = log_a.permute(3, 0, 2, 1).reshape(2, B, self.num_heads, *grid).unbind(0)
        return alpha, beta

    def _paths(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> list[torch.Tensor]:
        """Terms summing to the two polylines' outputs, each ``(B, heads, H, W, d)`` (any strides).

        ``q, k, v (B, heads, N, d)``, ``q`` carrying the softmax scale. Here one term,
        ``(softmax(Z + M) + softmax(Z + Mᵀ)) v``.
        """
        B, h, H, W = alpha.shape
        N = H * W
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (B * heads, N, d)
        alpha, beta = alpha.reshape(B * h, 1, H, W), beta.reshape(B * h, 1, H, W)
        # a few (image, head) slices at a time: the N x N scores, mask and softmaxes stay ~_CHUNK elements each
        # instead of B * heads * N^2 (e.g. 4 GB at 4,096 tokens, batch 4, 3 heads)
        step = max(1, _CHUNK // (N * N))
        outs = []
        for i in range(0, B * h, step):
            scores = q[i : i + step] @ k[i : i + step].transpose(-1, -2)  # shared by both paths, as official
            a, b = alpha[i : i + step], beta[i : i + step]
            paths = (polyline_path_mask(a, b, t)[:, 0].to(scores.dtype).add_(scores).softmax(-1) for t in (False, True))
            outs.append(torch.add(*paths) @ v[i : i + step])
        return [torch.cat(outs).view(B, h, H, W, -1)]

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("polyline path attention needs grid=(H, W) of the tokens")
        B, N, C = x.shape
        if grid[0] * grid[1] != N:
            raise ValueError(f"{N} tokens do not fill grid {tuple(grid)} (prefix tokens are not supported)")
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, h, d)
        # RoPE on q and k at once; q's tables also carry the softmax scale d^-1/2
        sin, cos = _rope_sin_cos(N, d, x.device)
        scale = torch.tensor([d**-0.5, 1.0], device=x.device)[:, None, None]  # (2, 1, 1)
        qk = _rotate_pairs(qkv[:, :, :2], sin[:, None, None] * scale, cos[:, None, None] * scale)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d) each
        v = qkv[:, :, 2]  # (B, N, heads, d)
        lepe = map_to_tokens(self.lepe(tokens_to_map(v.reshape(B, N, C), grid)))[0]
        terms = self._paths(q, k, v.transpose(1, 2), *self.log_decays(x, grid))
        # LePE + the mean of the two polylines, summed straight into token order (B, H, W, heads, d)
        out = torch.add(lepe.unflatten(1, grid).unflatten(-1, (h, d)), terms[0].permute(0, 2, 3, 1, 4), alpha=0.5)
        for term in terms[1:]:
            out.add_(term.permute(0, 2, 3, 1, 4), alpha=0.5)
        return self.proj(out.reshape(B, N, C))


class AxialPolylinePathAttention(PolylinePathAttention):
    """The criss-cross form for large grids: row and column attentions with the 1-D path masks.

    ``(A_col (A_row v) + A_row (A_col v)) / 2``: each product follows one polyline (row then column, or
    column then row), at ``O(HW (H + W))`` cost instead of ``O((HW)^2)``.
    """

    def _paths(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
    ) -> list[torch.Tensor]:
        # two terms: A_col (A_row v) and A_row (A_col v)
        B, h, H, W = alpha.shape
        d = q.shape[-1]
        q, k, v = (t.reshape(B, h, H, W, d) for t in (q, k, v))

        def along_last_axis(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # (B, h, R, L, d) q/k (q pre-scaled), (B, h, R, L, L) mask -> (B, h, R, L, L) weights, mask in the GEMM
            R, L = q.shape[2:4]
            flat = torch.baddbmm(mask.to(q.dtype).flatten(0, 2), q.flatten(0, 2), k.flatten(0, 2).transpose(1, 2))
            return flat.softmax(-1).view(B, h, R, L, L)

        # one attention matrix per axis (official), each used by both polylines
        a_row = along_last_axis(q, k, segment_sum(alpha))  # (B, h, H, W, W)
        a_col = along_last_axis(q.transpose(2, 3), k.transpose(2, 3), segment_sum(beta.transpose(-1, -2)))
        v_row = a_row @ v  # (B, h, H, W, d)
        v_col = a_col @ v.transpose(2, 3)  # (B, h, W, H, d)
        # row then column, column then row; each term stays in the layout its last product gives
        return [(a_col @ v_row.transpose(2, 3)).transpose(2, 3), a_row @ v_col.transpose(2, 3)]
