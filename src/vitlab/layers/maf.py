"""Multi-scale Attention Fusion (MAF), the token mixer of MAFormer ("MAFormer: A Transformer Network with
Multi-scale Attention Fusion for Visual Recognition", arXiv:2209.01620; no official code was released).

A MAF mixer runs two streams on the same ``(B, H*W, C)`` tokens and fuses them with attention:

- local: multi-head attention inside non-overlapping windows (``layers.WindowAttention``), fine-grained;
- global, GLD ("Global Learning with Down-sampling"): a fully connected layer *across the token axis* maps the
  ``H*W`` tokens to a small ``gh x gw`` set of global tokens (every global token a learned weighted sum of all
  tokens), to which a learned position embedding is added;
- fusion: attention whose queries come from the local stream and whose keys and values come from the global
  tokens, added to the local stream: ``x_l + proj(softmax(q(x_l) k(x_g)ᵀ) v(x_g))``.

The MAFormer paper's method section could not be read here; this follows its abstract and a published
restatement of the GLD and fusion equations (``x_g = Pos + FC(x)`` over flattened tokens; queries local,
keys/values global). Choices made here, not from the paper: the global grid is fixed when the layer is built
(``global_grid``), the GLD weights start as average pooling onto that grid, and at a token grid other than
the built one the GLD weights, seen as one ``H x W`` map per global token, are resampled bilinearly (and
rescaled by the area ratio) so any input size works with a constant number of global tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_

from .attention import attend
from .tracing import is_fx_tracing
from .window_attention import WindowAttention

__all__ = ["GlobalDownsample", "MultiScaleAttentionFusion", "pooling_weights"]

Grid = tuple[int, int]


def _check_grid(name: str, grid: int | tuple[int, int]) -> Grid:
    out = to_2tuple(grid)
    if len(out) != 2 or not all(isinstance(g, int) and g >= 1 for g in out):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {grid!r}")
    return out[0], out[1]


def pooling_weights(grid: Grid, global_grid: Grid) -> torch.Tensor:
    """``(gh*gw, H*W)`` matrix of adaptive average pooling from ``grid`` onto ``global_grid`` (rows sum to 1)."""

    def axis(n: int, g: int) -> torch.Tensor:  # (g, n): bin i averages [floor(i n / g), ceil((i + 1) n / g))
        i, j = torch.arange(g)[:, None], torch.arange(n)[None, :]
        inside = (j >= (i * n) // g) & (j < -((-(i + 1) * n) // g))
        return inside / inside.sum(1, keepdim=True)

    return torch.kron(axis(grid[0], global_grid[0]), axis(grid[1], global_grid[1]))


class GlobalDownsample(nn.Module):
    """GLD: ``(B, H*W, C)`` tokens -> ``(B, gh*gw, C)`` global tokens by a fully connected layer across tokens.

    Args:
        dim: channels (for the position embedding of the global tokens).
        grid: the token grid the layer is built for; other grids resample the weights.
        global_grid: ``(gh, gw)`` global tokens, fixed.
    """

    def __init__(self, dim: int, grid: int | tuple[int, int] = 14, global_grid: int | tuple[int, int] = 7) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.grid = _check_grid("grid", grid)
        self.global_grid = _check_grid("global_grid", global_grid)
        self.weight = nn.Parameter(pooling_weights(self.grid, self.global_grid))  # (gh*gw, H*W)
        self.bias = nn.Parameter(torch.zeros(self.weight.shape[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.weight.shape[0], dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def token_weight(self, grid: Grid) -> torch.Tensor:
        """The ``(gh*gw, H*W)`` token-mixing weights for ``grid`` (the built ones, or resampled to it)."""
        if not is_fx_tracing() and tuple(grid) == self.grid:  # traced: always resample (the identity when equal)
            return self.weight
        maps = self.weight.view(-1, 1, self.grid[0], self.grid[1])  # one weight map per global token
        maps = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
        # a weight map covers the same area on the new grid: keep its total weight
        return maps.flatten(1) * (self.grid[0] * self.grid[1] / (grid[0] * grid[1]))

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if not is_fx_tracing() and x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{x.shape[1]} tokens do not fill grid {tuple(grid)}")
        return self.token_weight(grid) @ x + self.bias[:, None] + self.pos_embed  # (B, gh*gw, C)


class MultiScaleAttentionFusion(nn.Module):
    """The MAF mixer ``forward(x (B, H*W, C), grid) -> (B, H*W, C)``: local windows + GLD, fused by attention.

    Args:
        num_heads: heads of both the window attention and the fusion attention.
        window_size, shift_size: the local branch's windows (``WindowAttention``).
        grid: token grid the GLD weights are built for; global_grid: number of global tokens per side.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        window_size: int = 7,
        grid: int | tuple[int, int] = 14,
        global_grid: int | tuple[int, int] = 7,
        shift_size: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.local = WindowAttention(dim, num_heads, window_size, shift_size, qkv_bias, attn_drop, proj_drop)
        self.gld = GlobalDownsample(dim, grid, global_grid)
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("MultiScaleAttentionFusion needs the token grid (H, W)")
        B, N, C = x.shape
        h = self.num_heads
        local = self.local(x, grid)  # (B, N, C), fine-grained
        glob = self.gld(x, grid)  # (B, M, C), coarse
        q = self.q(local).view(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(glob).view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, M, hd) each
        fused = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return local + self.proj_drop(self.proj(fused.transpose(1, 2).reshape(B, N, C)))
