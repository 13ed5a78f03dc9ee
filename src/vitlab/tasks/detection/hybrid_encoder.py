"""A light RT-DETR hybrid encoder: attention within the coarsest map, then conv fusion across scales.

RT-DETR (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", arXiv:2304.08069, github.com/lyuwenyu/RT-DETR)
replaces the deformable encoder by (1) **AIFI**, one transformer encoder layer over the coarsest map only (2-D
sine-cosine positions on queries and keys), and (2) **CCFM**, a top-down then bottom-up path (FPN + PAN) whose
fusion blocks merge the concatenated neighbours. MonoDINO-DETR calls this its "hierarchical feature fusion" over the
three ViT levels.

Simplified here (say so where it is used): a fusion block is a 1x1 conv of the concatenation plus one residual
3x3 conv (RT-DETR: a CSP block of RepVGG units); GroupNorm instead of BatchNorm (tiny CPU batches); the resampling goes
to the neighbour's exact size, so odd grids work. ``AttentionEncoderLayer`` (post-norm self-attention with the
position on queries and keys, then a ReLU FFN) is also MonoDETR's depth encoder layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ...layers import sincos_2d_normalized

__all__ = ["AttentionEncoderLayer", "HybridEncoder"]


class AttentionEncoderLayer(nn.Module):
    """Post-norm self-attention (position added to queries and keys) + ReLU FFN over a map ``(B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim, act_layer=nn.ReLU, drop=dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        pos = sincos_2d_normalized((H, W), C, device=x.device).to(x.dtype).reshape(1, H * W, C)
        q = tokens + pos
        tokens = self.norm1(tokens + self.attn(q, q, tokens, need_weights=False)[0])
        tokens = self.norm2(tokens + self.mlp(tokens))
        return tokens.transpose(1, 2).reshape(B, C, H, W)


def _conv(in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, bias=False),
        nn.GroupNorm(math.gcd(32, out_chans), out_chans),
        nn.SiLU(),
    )


class _Fuse(nn.Module):
    """Concatenated neighbours ``(B, 2C, H, W)`` -> ``(B, C, H, W)``: 1x1 merge, then a residual 3x3 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.merge = _conv(2 * dim, dim)
        self.conv = _conv(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.merge(x)
        return x + self.conv(x)


class HybridEncoder(nn.Module):
    """Maps ``(B, dim, H_l, W_l)``, fine to coarse, -> the same shapes after AIFI (coarsest) and CCFM."""

    def __init__(
        self, dim: int, num_levels: int, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.aifi = AttentionEncoderLayer(dim, num_heads, ffn_dim, dropout)
        n = num_levels - 1
        self.lateral = nn.ModuleList(_conv(dim, dim) for _ in range(n))
        self.top_down = nn.ModuleList(_Fuse(dim) for _ in range(n))
        self.down = nn.ModuleList(_conv(dim, dim, 3, 2) for _ in range(n))
        self.bottom_up = nn.ModuleList(_Fuse(dim) for _ in range(n))

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        maps = list(maps)
        maps[-1] = self.aifi(maps[-1])
        # top-down (FPN): from the coarsest, each lateral-projected map is upsampled and fused with the finer one
        inner = [maps[-1]]
        for k, i in enumerate(range(len(maps) - 2, -1, -1)):
            coarse = self.lateral[k](inner[0])
            inner[0] = coarse
            up = F.interpolate(coarse, size=maps[i].shape[-2:], mode="nearest")
            inner.insert(0, self.top_down[k](torch.cat([up, maps[i]], 1)))
        # bottom-up (PAN): from the finest, each map is downsampled and fused with the coarser one
        outs = [inner[0]]
        for k in range(len(maps) - 1):
            down = self.down[k](outs[-1])
            if down.shape[-2:] != inner[k + 1].shape[-2:]:
                down = F.interpolate(down, size=inner[k + 1].shape[-2:], mode="nearest")
            outs.append(self.bottom_up[k](torch.cat([down, inner[k + 1]], 1)))
        return outs
