"""Shifted-window attention (Swin, arXiv:2103.14030, Sec. 3.2) as a mixer any MetaBlock model can use.

Tokens ``(B, H*W, C)`` on ``grid = (H, W)`` are cyclically shifted, padded to whole windows and attended
within ``window_size``² windows, with a learned relative position bias and, for shifted windows, a mask
that keeps tokens from attending across the seams of the cyclic shift. The softmax is ``attend``'s.

Parameter names and the order of operations (shift, then zero-pad at the bottom/right; padded tokens are
not masked) follow timm's ``SwinTransformerBlock``, so its weights load and outputs match (a test checks).
A grid no larger than the window is one window, unshifted, as in timm.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .attention import attend
from .tracing import is_fx_tracing

__all__ = ["WindowAttention", "relative_position_index", "shifted_window_mask", "window_partition", "window_reverse"]

_SEAM = -100.0  # additive bias across shift seams; exp(-100) is 0 in float32, as in the paper's code


def window_partition(x: torch.Tensor, ws: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of the window -> ``(B * windows, wh * ww, C)``, row-major windows."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C).transpose(2, 3)
    return x.reshape(-1, ws[0] * ws[1], C)


def window_reverse(windows: torch.Tensor, ws: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of ``window_partition``: ``(B * windows, wh * ww, C)`` -> ``(B, H, W, C)``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws[0], W // ws[1], ws[0], ws[1], C).transpose(2, 3)
    return x.reshape(-1, H, W, C)


def relative_position_index(ws: tuple[int, int]) -> torch.Tensor:
    """``(wh*ww, wh*ww)`` index into a ``((2wh-1)(2ww-1), heads)`` table of the offset between two positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor([ws[0] - 1, ws[1] - 1])[:, None, None]
    return rel[0] * (2 * ws[1] - 1) + rel[1]


@torch.fx.wrap  # one FX graph node: it builds index tensors from sizes
def shifted_window_mask(size: tuple[int, int], ws: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """``(windows, N, N)`` additive mask for a map of ``size`` (whole windows) shifted by ``shift``.

    After the cyclic shift, each axis has three regions (before ``-ws``, between ``-ws`` and ``-shift``,
    after ``-shift``); a token may attend only to tokens of the same region pair.
    """

    def region(n: int, w: int, s: int) -> torch.Tensor:
        i = torch.arange(n)
        return (i >= n - w).long() + (i >= n - s).long() if s else torch.zeros(n, dtype=torch.long)

    label = region(size[0], ws[0], shift[0])[:, None] * 3 + region(size[1], ws[1], shift[1])[None, :]
    win = window_partition(label[None, :, :, None], ws).squeeze(-1)  # (windows, N)
    return (win[:, :, None] != win[:, None, :]).float() * _SEAM


@torch.fx.wrap  # one FX graph node: the layout is a choice on sizes
def _window_layout(window_size: int, shift_size: int, H: int, W: int) -> tuple[int, int, int, int]:
    """Window height, width and shifts for an ``H x W`` grid: a grid side no larger than the window is one
    unshifted window (timm's rule)."""
    return (
        min(window_size, H),
        min(window_size, W),
        shift_size if window_size < H else 0,
        shift_size if window_size < W else 0,
    )


@torch.fx.wrap  # one FX graph node: it slices a buffer by sizes
def _relative_position_bias(table: torch.Tensor, index: torch.Tensor, ws: tuple[int, int]) -> torch.Tensor:
    """``(heads, N, N)`` bias of a ``ws`` window from the full window's table and ``(N_full, N_full)`` index."""
    full = math.isqrt(index.shape[0])
    index = index.view(full, full, full, full)[: ws[0], : ws[1], : ws[0], : ws[1]]
    n = ws[0] * ws[1]
    return table[index.reshape(n, n)].permute(2, 0, 1)


class WindowAttention(nn.Module):
    """Multi-head attention inside (shifted) windows: the mixer ``forward(x (B, N, C), grid) -> (B, N, C)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        window_size: int = 7,
        shift_size: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads} (>= 1)")
        if window_size < 1 or not 0 <= shift_size < window_size:
            raise ValueError(
                f"need window_size >= 1 and 0 <= shift_size < window_size, got {window_size}, {shift_size}"
            )
        self.num_heads, self.window_size, self.shift_size = num_heads, window_size, shift_size
        ws = (window_size, window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws[0] - 1) * (2 * ws[1] - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _window(self, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        wh, ww, sh, sw = _window_layout(self.window_size, self.shift_size, grid[0], grid[1])
        return (wh, ww), (sh, sw)

    def _bias(self, ws: tuple[int, int]) -> torch.Tensor:
        return _relative_position_bias(self.relative_position_bias_table, self.relative_position_index, ws)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("WindowAttention needs the token grid (H, W)")
        B, N, C = x.shape
        H, W = grid
        if not is_fx_tracing() and N != H * W:
            raise ValueError(f"{N} tokens do not fill grid {tuple(grid)} (window attention takes no prefix tokens)")
        ws, shift = self._window(grid)
        # traced, the shift is a proxy: roll and mask always (a zero shift rolls nothing and masks nothing)
        shifted = is_fx_tracing() or any(shift)
        x = x.view(B, H, W, C)
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = (-H) % ws[0], (-W) % ws[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        windows = window_partition(x, ws)  # (B * nW, n, C)
        n, nw = ws[0] * ws[1], (Hp // ws[0]) * (Wp // ws[1])
        q, k, v = self.qkv(windows).view(-1, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self._bias(ws).unsqueeze(0)  # (1, heads, n, n)
        if shifted:
            mask = shifted_window_mask((Hp, Wp), ws, shift).to(x)  # (nW, n, n)
            bias = (bias.unsqueeze(0) + mask[None, :, None]).expand(B, -1, -1, -1, -1).reshape(B * nw, -1, n, n)
        out = attend(q, k, v, bias, self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(-1, n, C)))
        out = window_reverse(out, ws, Hp, Wp)[:, :H, :W]
        if shifted:
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out.reshape(B, N, C)
