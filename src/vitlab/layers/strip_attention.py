"""Strip self-attention (SSA), the token mixer of S2AFormer.

"S2AFormer: Strip Self-Attention for Efficient Vision Transformer" (arXiv:2505.22195; no official code was
found). Softmax attention made cheap in two ways at once (the paper's Sec. on SSA and its abstract):

- *spatial* reduction of K and V: they come from the token map after a depthwise ``s x s`` convolution with
  stride ``s`` and a LayerNorm, so each query attends to ``N' = ceil(H/s) * ceil(W/s)`` tokens, not ``N``;
- *channel* compression of Q and K: both are projected to only ``qk_dim`` channels (by default one per head,
  the thin ``N x 1`` "strips" of the name), while V keeps the full width.

Per head the attention costs ``N * N' * (qk_dim / h + C / h)`` multiply-accumulates instead of ``2 N² C / h``.
With ``sr_ratio=1`` and ``qk_dim=dim`` it is plain multi-head self-attention (a test checks this against
``layers.Attention``). The softmax runs through ``attend``, which handles values wider than queries/keys (there
as three explicit ops: SDPA has no fused kernel for that case and its math fallback is several times slower).

Reconstruction: the paper's text describes the two compressions; the exact widths (how far Q/K are
compressed), the LayerNorm after the reduction (as PVT/CMT do) and the zero padding of grids that the stride
does not divide (so any input size runs) are this implementation's choices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
from .block import Grid, map_to_tokens, tokens_to_map
from .tracing import is_fx_tracing

__all__ = ["StripAttention"]


class StripAttention(nn.Module):
    """Attention of full-width queries' strips onto a spatially reduced key/value map (mixer contract).

    Args:
        dim: token width ``C`` (also the width of V and of the output).
        num_heads: attention heads; ``dim`` and ``qk_dim`` must both divide by it.
        qk_dim: total width of Q and K after channel compression; default ``num_heads`` (one channel per head).
        sr_ratio: spatial reduction of K/V (kernel and stride of the depthwise conv); 1 = none.
        qkv_bias: biases in the Q and K/V projections.

    ``forward(x (B, H*W, C), grid=(H, W)) -> (B, H*W, C)``; ``grid`` may be None only when ``sr_ratio == 1``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qk_dim: int | None = None,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        qk_dim = num_heads if qk_dim is None else qk_dim
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads} (an integer >= 1)")
        if not isinstance(qk_dim, int) or qk_dim < num_heads or qk_dim % num_heads:
            raise ValueError(f"qk_dim must be a positive multiple of num_heads {num_heads}, got {qk_dim!r}")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an integer >= 1, got {sr_ratio!r}")
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.sr_ratio = sr_ratio
        self.scale = (qk_dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, qk_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, qk_dim + dim, bias=qkv_bias)  # K (compressed) and V (full width) in one matmul
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio, groups=dim)  # depthwise: the spatial reduction
            self.norm = norm_layer(dim)
        else:
            self.sr, self.norm = None, nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _reduce(self, x: torch.Tensor, grid: Grid | None) -> torch.Tensor:
        """``(B, H*W, C)`` -> the ``(B, N', C)`` tokens that keys and values are computed from."""
        if self.sr is None:
            return x
        if grid is None:
            raise ValueError(f"StripAttention with sr_ratio={self.sr_ratio} needs grid=(H, W) of the tokens")
        s = self.sr_ratio
        m = tokens_to_map(x, grid)  # a channels-last view of the tokens, no copy; so is the conv's output
        if is_fx_tracing() or grid[0] % s or grid[1] % s:  # (F.pad copies even when it pads nothing; traced: pad)
            m = F.pad(m, (0, -grid[1] % s, 0, -grid[0] % s))  # zero-pad right/bottom to whole s x s cells
        return self.norm(map_to_tokens(self.sr(m))[0])

    def attend_heads(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        """The heads' concatenated attention output before the output projection: ``(B, N, C)``.

        Split from ``forward`` so a block can fuse ``proj`` with its residual add (S2AFormer's inference path).
        """
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, qk_dim / h)
        k, v = self.kv(self._reduce(x, grid)).split([self.qk_dim, C], dim=-1)
        k = k.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, N', qk_dim / h)
        v = v.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, N', C / h)
        x = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return x.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend_heads(x, grid)))
