"""MSA-Conv: multi-head self-attention inside a sliding convolution window, as a mixer for any grid size.

From "TiC: Exploring Vision Transformer in Convolution" (arXiv:2310.04134); code announced at
github.com/zs670980918/MSA-Conv, published as github.com/StriveZs/MSA-Conv (the CUDA operator and a demo
module only, no model). Every token is a query that attends to the ``k x k`` keys and values a convolution
kernel centred on it would see, so nothing depends on the input size (no position embedding to resample).
The paper's "generalised convolutions" are the arguments: ``dilation=1`` standard, ``dilation=d`` dilated,
``num_heads=dim`` depthwise (every channel its own attention map); ``num_heads=1`` is the official operator
(one map over all channels, scale ``dim ** -0.5``).

As the official im2col operator, window positions outside the map hold zero keys and values: they enter
the softmax with logit 0 and add nothing to the output (a zero-padded convolution).

The two capacity mechanisms are reconstructed (the paper's text could not be read here):

- Inter-pooling (``pool_size=f > 1``), as the authors describe it (StriveZs/MSA-Conv issue #2): queries
  are regrouped space-to-batch, ``(B, C, H, W) -> (B f², C, H/f, W/f)``, keys and values are downsampled
  by a stride-``f`` convolution (here depthwise, ``f x f``) and repeated ``f²`` times. So the ``f x f``
  queries of each cell attend to one ``k x k`` window of the pooled map, which covers ``(k f)²`` pixels.
  Here the ``f²`` queries of a cell form one attention call's query set instead of repeating keys/values;
  sizes not divisible by ``f`` are zero-padded at the bottom/right and cropped afterwards.
- Multi-directional cyclic shift (``shift=True``): the heads are split into four groups (contiguous,
  ``tensor_split``; fewer than four heads leave later directions empty) whose keys and values are rolled
  cyclically by ``shift_size`` (default: one window span) towards up, down, left and right. Each group
  then sees the neighbouring window in its direction, and the wrap-around joins opposite borders.

How it runs: the maps stay channels-last (the token layout) and the queries are taken in blocks of
``block_size x block_size`` (pooled) cells; each block attends, through ``layers.attention.attend``, to the
``(block_size + k - 1)²`` halo of keys its windows cover, with a boolean mask that keeps each query to its own
``k x k`` window (zero-padded positions stay in, as logit-0 taps). This gathers each key about
``((b + k - 1) / b)²`` times (3.4 at ``b = k = 7``) instead of ``k²`` times (the unfolded windows of the
official im2col operator, ``msa_conv_windows`` here), and the attention runs as matrix products. The masked
products are work the operator does not need, so in inference the attention call goes through the
``vitlab::msa_conv_attention`` op whose registered FLOP formula counts the nominal ``k²`` taps per query;
with autograd recording (training) it calls ``attend`` directly and a FLOP counter sees the full blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .attention import attend
from .block import Grid

__all__ = ["MSAConv", "msa_conv_windows"]


def msa_conv_windows(x: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, k*k, C)``: the zero-padded (dilated) ``k x k`` window around each position."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    B, C, H, W = x.shape
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=dilation * (kernel_size // 2))  # (B, C*k*k, H*W)
    return cols.view(B, C, kernel_size * kernel_size, H * W).permute(0, 3, 2, 1)


@torch.library.custom_op("vitlab::msa_conv_attention", mutates_args=())
def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, macs: int
) -> torch.Tensor:
    """``attend(q, k, v, mask)`` whose cost a FLOP counter takes as ``macs`` (the unmasked taps only)."""
    return attend(q, k, v, mask, scale=scale)


@_masked_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, macs: int) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@register_flop_formula(torch.ops.vitlab.msa_conv_attention)
def _masked_attention_flops(q_shape, k_shape, v_shape, mask_shape, scale, macs, *args, **kwargs) -> int:
    return 2 * macs


def _window_mask(block: int, pool: int, kernel_size: int, dilation: int, device: torch.device) -> torch.Tensor:
    """``(block * pool, block + 2r)``: may query row ``i`` of a block see halo row ``u`` (one axis; ``r`` the reach)?"""
    reach = dilation * (kernel_size // 2)
    cell = torch.arange(block * pool, device=device) // pool  # the pooled cell each query row belongs to
    offset = torch.arange(block + 2 * reach, device=device)[None] - reach - cell[:, None]
    return (offset.abs() <= reach) & (offset % dilation == 0)


class MSAConv(nn.Module):
    """Self-attention within convolution windows: the mixer ``forward(x (B, H*W, C), grid) -> (B, H*W, C)``.

    Args:
        kernel_size: odd window size; ``dilation`` spaces its taps (the window spans ``dilation*(k-1)+1``).
        pool_size: inter-pooling factor ``f`` (1: off).
        shift: multi-directional cyclic shift of the keys/values per head group; ``shift_size`` (default the
            window span) is in units of the (pooled) key map.
    """

    block_size = 7  # query cells per block side (speed only: any value computes the same function)

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        kernel_size: int = 3,
        dilation: int = 1,
        pool_size: int = 1,
        shift: bool = False,
        shift_size: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads} (>= 1)")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if dilation < 1 or pool_size < 1:
            raise ValueError(f"dilation and pool_size must be >= 1, got {dilation}, {pool_size}")
        if shift_size is not None and shift_size < 0:
            raise ValueError(f"shift_size must be >= 0, got {shift_size}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation, self.pool_size = kernel_size, dilation, pool_size
        self.shift = shift
        self.shift_size = dilation * (kernel_size - 1) + 1 if shift_size is None else shift_size
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # inter-pooling: keys and values downsampled by a stride-f depthwise conv
        self.kv_pool = nn.Conv2d(2 * dim, 2 * dim, pool_size, pool_size, groups=2 * dim) if pool_size > 1 else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _pad_keys(self, kv: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        """``(B, h, w, 2C)`` keys/values -> zero-padded ``(B, top + h + bottom, left + w + right, 2, heads, head_dim)``,
        with the cyclic shift (``shift=True``) of each head group written in place of a roll (one copy)."""
        B, h, w, _ = kv.shape
        src = kv.reshape(B, h, w, 2, self.num_heads, self.head_dim)
        out = kv.new_zeros(B, top + h + bottom, left + w + right, 2, self.num_heads, self.head_dim)
        if not self.shift:
            out[:, top : top + h, left : left + w] = src
            return out
        s = self.shift_size
        # head group g rolled up / down / left / right: rolled[i] = src[(i - d) mod n], four quadrant copies
        size, extra = divmod(self.num_heads, 4)  # four contiguous head groups, as tensor_split makes them
        ends = [g * size + min(g, extra) for g in range(5)]
        for g, (dy, dx) in enumerate(((s, 0), (-s, 0), (0, s), (0, -s))):
            heads = slice(ends[g], ends[g + 1])
            dy, dx = dy % h, dx % w
            for ys, yd in ((slice(0, h - dy), slice(top + dy, top + h)), (slice(h - dy, h), slice(top, top + dy))):
                for xs, xd in (
                    (slice(0, w - dx), slice(left + dx, left + w)),
                    (slice(w - dx, w), slice(left, left + dx)),
                ):
                    out[:, yd, xd, :, heads] = src[:, ys, xs, :, heads]
        return out

    def _attend_blocks(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Queries ``(B, h f, w f, C)`` onto their windows of the keys/values ``(B, h, w, 2C)``, block by block."""
        B, h, w, C2 = kv.shape
        f, nh, hd, r = self.pool_size, self.num_heads, self.head_dim, self.dilation * (self.kernel_size // 2)
        bh, bw = min(self.block_size, h), min(self.block_size, w)
        nH, nW = -(-h // bh), -(-w // bw)
        eh, ew = bh + 2 * r, bw + 2 * r  # halo of a block
        # zeros around the map (the operator's padding) and up to whole blocks; then each block's halo, gathered
        kv = self._pad_keys(kv, r, nH * bh - h + r, r, nW * bw - w + r)
        sB, sH, sW = kv.stride()[:3]
        kv = kv.as_strided((B, nH, nW, eh, ew, 2, nh, hd), (sB, bh * sH, bw * sW, sH, sW, *kv.stride()[3:]))
        k, v = kv.permute(5, 0, 1, 2, 6, 3, 4, 7).reshape(2, -1, nh, eh * ew, hd)  # (B*nH*nW, nh, eh*ew, hd) each
        if q.shape[1] != nH * bh * f or q.shape[2] != nW * bw * f:
            q = F.pad(q, (0, 0, 0, nW * bw * f - q.shape[2], 0, nH * bh * f - q.shape[1]))
        q = q.view(B, nH, bh * f, nW, bw * f, nh, hd).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, nh, bh * bw * f * f, hd)
        rows = _window_mask(bh, f, self.kernel_size, self.dilation, q.device)
        cols = _window_mask(bw, f, self.kernel_size, self.dilation, q.device)
        mask = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(bh * f * bw * f, eh * ew)
        dropout = self.attn_drop if self.training else 0.0
        if dropout or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
            out = attend(q, k, v, mask, dropout, self.scale)
        else:  # inference: counted at the nominal k*k taps per (real) query
            macs = B * h * w * f * f * nh * self.kernel_size**2 * 2 * hd
            out = torch.ops.vitlab.msa_conv_attention(q, k, v, mask, self.scale, macs)
        out = out.view(B, nH, nW, nh, bh * f, bw * f, hd).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, nH * bh * f, nW * bw * f, C2 // 2)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("MSAConv needs the token grid (H, W)")
        B, N, C = x.shape
        H, W = grid
        if N != H * W:
            raise ValueError(f"{N} tokens do not fill grid {tuple(grid)} (MSAConv takes no prefix tokens)")
        f = self.pool_size
        qkv = self.qkv(x).view(B, H, W, 3 * C)  # channels-last maps throughout
        if H % f or W % f:
            qkv = F.pad(qkv, (0, 0, 0, -W % f, 0, -H % f))  # whole f x f cells
        q, kv = qkv[..., :C], qkv[..., C:]
        if self.kv_pool is not None:  # (B, Hp/f, Wp/f, 2C): the conv runs on a channels-last view
            kv = self.kv_pool(kv.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self._attend_blocks(q, kv)[:, :H, :W]
        return self.proj_drop(self.proj(out.reshape(B, N, C)))
