"""S2AFormer: "S2AFormer: Strip Self-Attention for Efficient Vision Transformer" (arXiv:2505.22195;
PAPERS.md row 7). No official code was found (searched an index of public GitHub code, 2026).

A four-stage hybrid CNN/Transformer backbone with feature strides 4, 8, 16 and 32: a stem of three 3x3
conv + BatchNorm + GELU layers (the first with stride 2), then per stage a strided-conv patch embedding
(``ConvDownsample``: 3x3, stride 2, LayerNorm) and ``L_i`` Hybrid Perception Blocks (HPB). An HPB is
(the paper's Sec. III, as quoted in reviews of the paper)::

    f_conv = DWConv(x) + x                    local perception, depthwise 3x3
    f_ssa  = SSA(LN(f_conv)) + f_conv         strip self-attention (``layers.StripAttention``)
    f_lim  = LIM(LN(f_ssa)) + f_ssa           Local Interaction Module
    f_mlp  = MLP(LN(f_lim)) + f_lim           channel MLP

SSA reduces K/V spatially (depthwise strided conv) and compresses Q/K to a few channels; see
``layers/strip_attention.py``. There are no position embeddings, so a model runs at any input size.

The stem and the HPB have fused oneDNN fast paths for CPU inference (``layers/fast/onednn.py``).

Reconstructed, not from the paper (whose architecture table could not be read here: only the abstract and
third-party summaries of Sec. III were reachable, and there is no official code):
- the variant widths, depths and heads: PVTv2-style (64, 128, 320, 512) widths with heads (1, 2, 5, 8), K/V
  reduction ratios (8, 4, 2, 1) as in PVT/CMT, MLP ratio 4; stem width half the stage-1 width;
- Q/K compressed to one channel per head (the "strip"); LIM as ``pointwise -> depthwise 3x3 -> GELU ->
  pointwise`` at width C (``layers.ConvFfn`` with ``dw_residual=False``);
- the reference parameter/MAC figures of the table are this reconstruction's, by a closed-form hand count
  that ``tests/models/test_s2aformer.py`` checks against the built model, not the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, DropPath, Mlp

from ..layers import (
    ConvDownsample,
    ConvFfn,
    Grid,
    HierarchicalBackbone,
    Stage,
    StripAttention,
    fast_forward,
    map_to_tokens,
    tokens_to_map,
)
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["S2AFORMER", "VARIANTS", "HybridPerceptionBlock", "S2AFormer"]

S2AFORMER = Paper(
    7,
    "S2AFormer: Strip Self-Attention for Efficient Vision Transformer",
    "2505.22195",
    "https://arxiv.org/abs/2505.22195",  # no official repository found; see the module docstring
)


class _ConvStem(nn.Sequential):
    """Three 3x3 conv + BN + GELU (the first with stride 2): image -> ``((B, H/2 * W/2, C), grid)``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        act = nn.GELU
        super().__init__(
            ConvNormAct(in_chans, dim, 3, stride=2, padding=1, act_layer=act),
            ConvNormAct(dim, dim, 3, padding=1, act_layer=act),
            ConvNormAct(dim, dim, 3, padding=1, act_layer=act),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:  # type: ignore[override]
        if (out := fast_forward(self, x)) is not None:
            return out
        # channels-last: the (B, N, C) tokens are then a free view of the stem's output map (no NCHW copies)
        return map_to_tokens(super().forward(x.contiguous(memory_format=torch.channels_last)))


class HybridPerceptionBlock(nn.Module):
    """HPB: depthwise-conv residual, then pre-norm SSA, LIM and MLP residuals, on ``(B, H*W, C)`` + grid.

    Args:
        mixer: ``mixer(dim)`` builds the global mixer (strip self-attention in the paper).
        mlp_ratio: MLP hidden width over ``dim``; ``lim_ratio``: the LIM's hidden width over ``dim``.
    """

    def __init__(
        self,
        dim: int,
        mixer: Callable[[int], nn.Module],
        mlp_ratio: float = 4.0,
        lim_ratio: float = 1.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0 or lim_ratio <= 0:
            raise ValueError(f"mlp_ratio and lim_ratio must be > 0, got {mlp_ratio}, {lim_ratio}")
        self.local = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = mixer(dim)
        self.norm2 = norm_layer(dim)
        self.lim = ConvFfn(dim, max(1, int(dim * lim_ratio)), dw_residual=False)
        self.norm3 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path1, self.drop_path2, self.drop_path3 = (
            DropPath(drop_path) if drop_path > 0.0 else nn.Identity() for _ in range(3)
        )

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if (out := fast_forward(self, x, grid)) is not None:
            return out
        x = x + map_to_tokens(self.local(tokens_to_map(x, grid)))[0]
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        x = x + self.drop_path2(self.lim(self.norm2(x), grid))
        return x + self.drop_path3(self.mlp(self.norm3(x)))


def _per_stage(name: str, value: Any, n: int) -> list[Any]:
    values = list(value) if isinstance(value, Sequence) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per stage ({n}), got {value!r}")
    return values


class S2AFormer(HierarchicalBackbone):
    """Conv stem, then four stages of strided-conv patch embedding + Hybrid Perception Blocks.

    Args:
        img_size: accepted for timm's interface; nothing depends on it (no position embeddings).
        embed_dims, depths, num_heads, sr_ratios: per stage (``sr_ratios``: SSA's K/V spatial reduction).
        qk_dims: per-stage total Q/K width of SSA; None: one channel per head (the strip).
        stem_dim: width of the stem; default half of ``embed_dims[0]``.
        mlp_ratio, lim_ratio: hidden widths of the MLP and of the LIM over the block width.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qk_dims: int | Sequence[int | None] | None = None,
        stem_dim: int | None = None,
        mlp_ratio: float = 4.0,
        lim_ratio: float = 1.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        n = len(depths)
        if n < 1 or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be positive integers, one per stage, got {depths!r}")
        dims = _per_stage("embed_dims", embed_dims, n)
        heads, srs = _per_stage("num_heads", num_heads, n), _per_stage("sr_ratios", sr_ratios, n)
        qks = _per_stage("qk_dims", qk_dims, n)
        if any(not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"embed_dims must be positive integers, got {embed_dims!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
        stem_dim = stem_dim or max(1, dims[0] // 2)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # timm's linear rule
        stages, prev = [], stem_dim
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            ssa = partial(StripAttention, num_heads=heads[i], qk_dim=qks[i], sr_ratio=srs[i], qkv_bias=qkv_bias)
            ssa = partial(ssa, attn_drop=attn_drop_rate, norm_layer=norm_layer)
            first = sum(depths[:i])
            blocks = [
                HybridPerceptionBlock(dim, ssa, mlp_ratio, lim_ratio, rates[first + j], norm_layer)
                for j in range(depth)
            ]
            stages.append(Stage(blocks, dim, ConvDownsample(prev, dim, 3, 2, norm_layer)))
            prev = dim
        super().__init__(
            _ConvStem(in_chans, stem_dim),
            stages,
            stem_stride=2,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            norm_layer=norm_layer,
        )
        self.img_size = img_size


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    return build_with_features(S2AFormer, variant, pretrained, **kwargs)


# 32 px: stem 16x16, stages 8x8 (K/V 2x2), 4x4 (2x2), 2x2 (1x1), 1x1; 48 px pads 3x3 to whole 2x2 cells.
_TINY = {
    "embed_dims": (16, 16, 32, 32),
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 2, 2),
    "sr_ratios": (4, 2, 2, 1),
    "stem_dim": 8,
    "img_size": 32,
}
_SOURCE = (
    "reconstructed: paper table unread (no official code); PVTv2-style widths/heads, K/V reduction 8/4/2/1, "
    "one Q/K channel per head; figures of this reconstruction (closed-form count in tests/models/test_s2aformer.py)"
)


def _spec(arch: dict[str, Any], params_m: float, gmacs: float, size: str) -> VariantSpec:
    return VariantSpec(
        S2AFORMER,
        kwargs=arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=_SOURCE,
        test_kwargs=_TINY,
        first_conv="stem.0.conv",
        pool_reduction=32,
        description=f"S2AFormer-{size} (reconstructed configuration): strip self-attention + HPBs, 224 px.",
    )


_WIDE = {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8)}
# Figures from the closed form of tests/models/test_s2aformer.py (224 px, 1000 classes).
VARIANTS = {
    "s2aformer_tiny": _spec({**_WIDE, "embed_dims": (32, 64, 160, 256), "depths": (2, 2, 6, 2)}, 4.38, 0.724, "T"),
    "s2aformer_small": _spec({**_WIDE, "depths": (2, 2, 6, 2)}, 16.81, 2.808, "S"),
    "s2aformer_base": _spec({**_WIDE, "depths": (3, 4, 18, 3)}, 35.39, 6.184, "B"),
}

register_variants(_create, VARIANTS, module=__name__)
