"""PPMA: "Polyline Path Masked Attention for Vision Transformer" (arXiv:2506.15940),
github.com/zhongchenzhao/PPMA (PAPERS.md row 15).

The official classifier (``classification/models/PPMA.py``) is RMT's four-stage backbone with RMT's
Manhattan decay replaced by the polyline path mask: a 4-conv stride-4 stem with BatchNorm, stages of blocks
``x + cpe(x)`` (3x3 depthwise conv) -> pre-norm masked attention -> pre-norm conv FFN, 3x3 stride-2 conv +
BatchNorm between stages, and a head ``Linear(C, 1024) -> BatchNorm -> SiLU -> avg pool -> Linear``.
Stages flagged in ``axial_stages`` use the criss-cross form (the official "chunkwise" stages: 1-2 for
PPMA-T, 1-3 for S/B), the others full attention; the masks are additive biases before the softmax, with one
q kᵀ shared by both polylines (per axis in the criss-cross form) as in the official code
(``layers/polyline_mask.py``). PPMA-T/S/B are the official configs; params and FLOPs come from the
official README / paper Table 1 (ImageNet-1K, 224 px): counted here 14.34M / 2.70G, 26.97M / 4.90G and
54.16M / 10.59G against 14M / 2.7G, 27M / 4.9G and 54M / 10.6G.

Deviations: q/k/v in one fused linear (same parameters and MACs); no official checkpoint key map yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ..layers import (
    AxialPolylinePathAttention,
    ConvDownsample,
    HierarchicalBackbone,
    MetaBlock,
    PolylinePathAttention,
    Stage,
    fast_forward,
    is_fx_tracing,
    map_to_tokens,
    tokens_to_map,
)
from ..layers.block import Grid
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["PPMA", "PPMA_PAPER", "VARIANTS"]

PPMA_PAPER = Paper(
    15,
    "Polyline Path Masked Attention for Vision Transformer",
    "2506.15940",
    "https://github.com/zhongchenzhao/PPMA",
)


class _TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of ``(B, N, C)`` tokens (the official stem/downsample norm)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not is_fx_tracing():  # traced, ``input.dim()`` is a proxy
            super()._check_input_dim(input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _Stem(nn.Sequential):
    """Four 3x3 convs with BatchNorm (two of stride 2), GELU between: image -> ``(tokens, grid)`` at 1/4."""

    def __init__(self, in_chans: int, dim: int) -> None:
        layers, chans = [], in_chans
        for i, (out, stride) in enumerate(((dim // 2, 2), (dim // 2, 1), (dim, 2), (dim, 1))):
            layers += [nn.Conv2d(chans, out, 3, stride, 1), nn.BatchNorm2d(out)] + ([nn.GELU()] if i < 3 else [])
            chans = out
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:  # type: ignore[override]
        if (out := fast_forward(self, x)) is not None:
            return out
        return map_to_tokens(super().forward(x))


class _LocalFfn(nn.Module):
    """RMT/PPMA FFN: ``fc1 -> GELU -> h + dwconv3x3(h) -> fc2`` (the conv after the activation)."""

    uses_grid = True

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if (out := fast_forward(self, x, grid)) is not None:
            return out
        h = self.act(self.fc1(x))
        return self.fc2(h + map_to_tokens(self.dwconv(tokens_to_map(h, grid)))[0])


class _CpeBlock(MetaBlock):
    """``MetaBlock`` preceded by a conditional position encoding ``x + dwconv3x3(x)`` (RMT's ``pos``)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, **kwargs)
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if (out := fast_forward(self, x, grid)) is not None:
            return out
        x = x + map_to_tokens(self.cpe(tokens_to_map(x, grid)))[0]
        return super().forward(x, grid)


class _ProjHead(nn.Module):
    """The official pre-pool projection ``Linear -> BatchNorm -> SiLU`` (in place of a final LayerNorm)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj, self.norm, self.act = nn.Linear(dim, out_dim), _TokenBatchNorm(out_dim), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class PPMA(HierarchicalBackbone):
    """Four-stage PPMA (RMT layout with polyline-path-masked attention).

    Args:
        axial_stages: per stage, use the criss-cross (axial) masked attention instead of full attention.
        layer_scales: per stage, the initial layer-scale value (None: no layer scale).
        head_proj_dim: width of the projection before pooling (``num_features``).
        img_size: accepted for timm's interface; nothing depends on it (no position table).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 8, 2),
        num_heads: Sequence[int] = (4, 4, 8, 16),
        mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
        axial_stages: Sequence[bool] = (True, True, False, False),
        layer_scales: Sequence[float | None] = (None, None, None, None),
        head_proj_dim: int = 1024,
        drop_path_rate: float = 0.1,
        **kwargs: Any,
    ) -> None:
        per_stage = (embed_dims, depths, num_heads, mlp_ratios, axial_stages, layer_scales)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError(
                "embed_dims, depths, num_heads, mlp_ratios, axial_stages, layer_scales need one entry each"
            )
        self.img_size = img_size
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        norm = partial(nn.LayerNorm, eps=1e-6)
        stages, start = [], 0
        for i, (dim, depth, heads, ratio, axial, ls) in enumerate(zip(*per_stage, strict=True)):
            attn = AxialPolylinePathAttention if axial else PolylinePathAttention
            blocks = [
                _CpeBlock(
                    dim,
                    mixer=partial(attn, num_heads=heads),
                    mlp=_LocalFfn,
                    norm_layer=norm,
                    mlp_ratio=ratio,
                    drop_path=rates[start + j],
                    layer_scale=ls,
                )
                for j in range(depth)
            ]
            start += depth
            down = ConvDownsample(embed_dims[i - 1], dim, 3, 2, norm_layer=_TokenBatchNorm) if i else None
            stages.append(Stage(blocks, dim, down))
        head_norm = partial(_ProjHead, out_dim=head_proj_dim)
        super().__init__(
            _Stem(in_chans, embed_dims[0]), stages, stem_stride=4, in_chans=in_chans, num_classes=num_classes,
            norm_layer=head_norm, **kwargs,
        )  # fmt: skip
        # the pooled features are the projection's output, not the last stage's width
        self.num_features = self.head_hidden_size = head_proj_dim
        self.head = self._make_head(num_classes)
        self.init_weights()


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> PPMA:
    return build_with_features(PPMA, variant, pretrained, **kwargs)


# 32 px: an 8x8 grid after the stem, down to 1x1; axial then full stages, layer scale on the last
_TINY = {
    "embed_dims": (16, 16, 32, 32),
    "depths": (1, 1, 1, 1),
    "num_heads": (2, 2, 2, 2),
    "axial_stages": (True, True, False, False),
    "layer_scales": (None, None, None, 1e-6),
    "head_proj_dim": 32,
    "img_size": 32,
}


def _spec(arch: dict[str, Any], params_m: float, gmacs: float, name: str) -> VariantSpec:
    return VariantSpec(
        PPMA_PAPER,
        kwargs=arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_params_rounding=1.0,  # the paper gives whole millions
        ref_source=f"PPMA Table 1 / official README ({name}, ImageNet-1K 224)",
        test_kwargs=_TINY,
        first_conv="stem.0",
        pool_reduction=32,
        fx_traceable=False,
        fx_reason="polyline path attention loops over batch-head chunks sized from the token count in Python",
    )


_DIMS = (64, 128, 256, 512)
VARIANTS = {
    "ppma_tiny": _spec(
        {"embed_dims": _DIMS, "depths": (2, 2, 8, 2), "num_heads": (4, 4, 8, 16), "mlp_ratios": (3, 3, 3, 3)},
        14.0, 2.7, "PPMA-T",
    ),
    "ppma_small": _spec(
        {"embed_dims": _DIMS, "depths": (3, 4, 18, 4), "num_heads": (4, 4, 8, 16), "mlp_ratios": (4, 4, 3, 3),
         "axial_stages": (True, True, True, False), "drop_path_rate": 0.15},
        27.0, 4.9, "PPMA-S",
    ),
    "ppma_base": _spec(
        {"embed_dims": (80, 160, 320, 512), "depths": (4, 8, 25, 8), "num_heads": (5, 5, 10, 16),
         "mlp_ratios": (4, 4, 3, 3), "axial_stages": (True, True, True, False),
         "layer_scales": (None, None, 1e-6, 1e-6), "drop_path_rate": 0.4},
        54.0, 10.6, "PPMA-B",
    ),
}  # fmt: skip

register_variants(_create, VARIANTS, module=__name__)
