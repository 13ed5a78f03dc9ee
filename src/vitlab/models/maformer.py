"""MAFormer: "MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition"
(arXiv:2209.01620; PAPERS.md row 12). No official code or weights were released.

A four-stage hierarchical backbone whose blocks are ``MetaBlock``s around the Multi-scale Attention Fusion
mixer (``layers/maf.py``): a local window-attention stream and a global stream of GLD tokens (a fully
connected layer across the token axis down-samples the whole map to a few global tokens), fused by attention
with local queries and global keys/values. A 7x7 stride-4 conv stem and 3x3 stride-2 conv transitions with
LayerNorm (CSWin's layout, the paper's main comparison) link the stages; the last stage, whose 7x7 grid at
224 px is a single window, uses plain global self-attention (``maf_stages`` says which stages fuse).

Reconstructed, not the paper's table: the paper's method section and its MAFormer-S/B/L table could not be
read here (only the abstract and a published restatement of the GLD/fusion equations were reachable), so the
variants take Swin's T/S/B widths, depths and heads (window 7) for S/B/L, and GLD ratios 8/4/2 (7x7 global
tokens in every fusing stage at 224 px). The reference parameter and MAC figures in ``VARIANTS`` are those of
this reconstruction, checked against a closed-form count in ``tests/models/test_maformer.py``; they are not
the paper's. The layer's own reconstruction choices are listed in ``layers/maf.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ..layers import Attention, ConvDownsample, ConvEmbed, HierarchicalBackbone, MetaBlock, Stage
from ..layers.block import Grid
from ..layers.maf import MultiScaleAttentionFusion
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["MAFORMER", "VARIANTS", "MAFormer"]

MAFORMER = Paper(
    12,
    "MAFormer: A Transformer Network with Multi-scale Attention Fusion for Visual Recognition",
    "2209.01620",
    # no official repository exists; the paper's arXiv page stands in for it
    "https://arxiv.org/abs/2209.01620",
)


class _ConvStem(ConvEmbed):
    """7x7 stride-4 conv + LayerNorm: image -> ``((B, H/4 * W/4, C), grid)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:  # type: ignore[override]
        x = super().forward(x)  # (B, H', W', C)
        return x.flatten(1, 2), (x.shape[1], x.shape[2])


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MAFormer(HierarchicalBackbone):
    """Four stages of MAF blocks (local windows + GLD global tokens, fused by attention).

    Args:
        img_size: the size the GLD weights are built for; other sizes resample them.
        embed_dims, depths, num_heads: per stage.
        window_size: the local branch's window.
        gld_ratios: per stage, the GLD down-sampling per side (global grid = ceil(grid / ratio) at ``img_size``).
        maf_stages: per stage, MAF blocks (True) or plain global self-attention blocks (False).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        gld_ratios: Sequence[int] = (8, 4, 2, 1),
        maf_stages: Sequence[bool] = (True, True, True, False),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        per_stage = (embed_dims, depths, num_heads, gld_ratios, maf_stages)
        if len({len(s) for s in per_stage}) != 1:
            raise ValueError("embed_dims, depths, num_heads, gld_ratios and maf_stages need one entry per stage")
        if any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be positive integers, got {depths!r}")
        if any(not isinstance(r, int) or r < 1 for r in gld_ratios):
            raise ValueError(f"gld_ratios must be positive integers, got {gld_ratios!r}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 4 for s in size):
            raise ValueError(f"img_size must be an int >= 4 or a pair of them, got {img_size!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
        self.img_size = img_size
        grid = tuple(_conv_out(s, 7, 4, 2) for s in size)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # timm's linear rule
        stages, start = [], 0
        for i, (dim, depth, heads, ratio, maf) in enumerate(zip(*per_stage, strict=True)):
            if i:
                grid = tuple(_conv_out(g, 3, 2, 1) for g in grid)
            if maf:
                global_grid = tuple(math.ceil(g / ratio) for g in grid)
                mixer = partial(
                    MultiScaleAttentionFusion, num_heads=heads, window_size=window_size, grid=grid,
                    global_grid=global_grid, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                )  # fmt: skip
            else:
                mixer = partial(Attention, num_heads=heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate)
            blocks = [
                MetaBlock(dim, mixer, norm_layer=norm_layer, mlp_ratio=mlp_ratio, drop_path=rates[start + j])
                for j in range(depth)
            ]
            start += depth
            down = ConvDownsample(embed_dims[i - 1], dim, 3, 2, norm_layer) if i else None
            stages.append(Stage(blocks, dim, down))
        stem = _ConvStem(in_chans, embed_dims[0], 7, 4, 2, norm_layer)
        super().__init__(
            stem, stages, stem_stride=4, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
            drop_rate=drop_rate, norm_layer=norm_layer,
        )  # fmt: skip

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # position embeddings of the global tokens and window relative-position tables (as timm's Swin)
        return {n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "relative_position_bias_table"))}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MAFormer:
    return build_with_features(MAFormer, variant, pretrained, **kwargs)


# 32 px: grids 8, 4, 2, 1; four 4x4 windows in stage 1, GLD onto 4x4 / 2x2 / 2x2 tokens, attention in stage 4
_TINY = {
    "embed_dims": (16, 16, 32, 32),
    "depths": (1, 1, 1, 1),
    "num_heads": (2, 2, 2, 2),
    "window_size": 4,
    "gld_ratios": (2, 2, 1, 1),
    "img_size": 32,
}
_SOURCE = (
    "reconstructed: paper table unread; Swin-{} widths/depths/heads, window 7, GLD ratios 8/4/2, "
    "figures of this reconstruction (closed-form count in tests/models/test_maformer.py)"
)


def _spec(arch: dict[str, Any], params_m: float, gmacs: float, swin: str, paper: str) -> VariantSpec:
    return VariantSpec(
        MAFORMER,
        kwargs={**arch, "drop_path_rate": 0.1},
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=_SOURCE.format(swin),
        test_kwargs=_TINY,
        first_conv="stem.proj",
        pool_reduction=32,
        description=f"{paper} (reconstructed config): local windows + GLD global tokens fused by attention.",
    )


VARIANTS = {
    "maformer_small": _spec({}, 34.73, 5.61, "T", "MAFormer-S"),
    "maformer_base": _spec({"depths": (2, 2, 18, 2)}, 63.48, 10.86, "S", "MAFormer-B"),
    "maformer_large": _spec(
        {"embed_dims": (128, 256, 512, 1024), "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
        111.83, 19.04, "B", "MAFormer-L",
    ),
}  # fmt: skip

register_variants(_create, VARIANTS, module=__name__)
