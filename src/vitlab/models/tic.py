"""TiC: "TiC: Exploring Vision Transformer in Convolution" (arXiv:2310.04134), github.com/zs670980918/MSA-Conv
(published as github.com/StriveZs/MSA-Conv: the MSA-Conv CUDA operator only; PAPERS.md row 9).

A four-stage hierarchical vision transformer whose token mixer is MSA-Conv (``layers/msa_conv.py``):
self-attention inside sliding convolution windows, so a model built once runs on any input size with
no position embedding and nothing resampled. Blocks are ``MetaBlock``s (LayerNorm -> MSA-Conv -> residual,
LayerNorm -> MLP -> residual); within each stage, even blocks use plain ``k x k`` MSA-Conv windows and odd
blocks add the paper's two capacity mechanisms, the multi-directional cyclic shift and inter-pooling.
Stem: a 4x4 stride-4 conv + LayerNorm (inputs not divisible by 4 are zero-padded); between stages a 3x3
stride-2 conv + LayerNorm (``layers.ConvDownsample``). Head and the timm contract come from
``layers.HierarchicalBackbone``.

Reconstructed, and marked so in the variant table: neither the paper's architecture table nor its text
could be read here, and the official repository publishes no model. The configuration is derived from
the abstract (hierarchical ViT with MSA-Conv, cyclic shift and inter-pooling), the authors' description of
inter-pooling (StriveZs/MSA-Conv issue #2) and the official operator (single-head scale, zero padding): the
tiny/small/base widths, depths and heads are Swin-T/S/B's (the hierarchical baseline the paper compares
with), with 7x7 MSA-Conv windows in place of Swin's 7x7 windows and pooling factor 2 in stages 1-3. The
reference parameter and MAC figures are worked out by hand from that configuration (see the comment above
``VARIANTS``), so the parity test checks the implementation against the configuration, not against the
paper. No weights were released.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ConvDownsample, ConvEmbed, Grid, HierarchicalBackbone, MetaBlock, MSAConv, Stage
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["TIC", "VARIANTS", "TiC"]

TIC = Paper(
    9, "TiC: Exploring Vision Transformer in Convolution", "2310.04134", "https://github.com/zs670980918/MSA-Conv"
)


class _Stem(nn.Module):
    """Non-overlapping ``patch_size`` conv + norm; the image is zero-padded to whole patches (any size)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed = ConvEmbed(in_chans, dim, patch_size, patch_size, 0, norm_layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        p = self.patch_size
        x = self.embed(F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p)))  # (B, H/p, W/p, C)
        return x.flatten(1, 2), (x.shape[1], x.shape[2])


def _per_stage(name: str, value: Any, num_stages: int) -> list[int]:
    values = [value] * num_stages if isinstance(value, int) else list(value)
    if len(values) != num_stages or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be a positive int or one per stage ({num_stages}), got {value!r}")
    return values


class TiC(HierarchicalBackbone):
    """Vision Transformer in Convolution: four stages of MSA-Conv blocks.

    Args:
        img_size: accepted for timm's interface; nothing depends on it (no position embeddings).
        embed_dims, depths, num_heads: per stage.
        kernel_size, dilation: the MSA-Conv window (``dilation`` one per stage or shared).
        pool_sizes: inter-pooling factor of the odd blocks of each stage (1: none).
        shift: multi-directional cyclic shift in the odd blocks of every stage.
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
        kernel_size: int = 7,
        dilation: int | Sequence[int] = 1,
        pool_sizes: int | Sequence[int] = (2, 2, 2, 1),
        shift: bool = True,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        n = len(depths)
        if not n:
            raise ValueError("depths must list at least one stage")
        depths, dims = _per_stage("depths", depths, n), _per_stage("embed_dims", embed_dims, n)
        heads, dilations = _per_stage("num_heads", num_heads, n), _per_stage("dilation", dilation, n)
        pools = _per_stage("pool_sizes", pool_sizes, n)
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # timm's linear rule
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            mixer = partial(MSAConv, num_heads=heads[i], kernel_size=kernel_size, dilation=dilations[i])
            mixer = partial(mixer, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
            # even blocks: plain windows; odd blocks: cyclic shift + inter-pooling (the capacity mechanisms)
            mixers = [mixer if j % 2 == 0 else partial(mixer, pool_size=pools[i], shift=shift) for j in range(depth)]
            blocks = [
                MetaBlock(
                    dim, mix, None, norm_layer, mlp_ratio, rates[sum(depths[:i]) + j], proj_drop_rate, mixer_name="attn"
                )
                for j, mix in enumerate(mixers)
            ]
            downsample = ConvDownsample(dims[i - 1], dim, 3, 2, norm_layer) if i else None
            stages.append(Stage(blocks, dim, downsample))
        super().__init__(
            _Stem(in_chans, dims[0], patch_size, norm_layer),
            stages,
            stem_stride=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            norm_layer=norm_layer,
        )
        self.img_size = img_size


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> TiC:
    return build_with_features(TiC, variant, pretrained, **kwargs)


# Four stages at 32 px (8x8 down to 1x1 tokens): plain, shifted and pooled blocks, padding to whole cells.
_TINY = {"embed_dims": (16, 16, 32, 32), "depths": (2, 1, 2, 1), "num_heads": (1, 2, 4, 4)}
_TINY |= {"kernel_size": 3, "img_size": 32}

_SOURCE = "reconstructed: Swin-{} layout with 7x7 MSA-Conv windows (paper table unread); figures by hand"


def _spec(arch: dict[str, Any], params_m: float, gmacs: float, size: str) -> VariantSpec:
    return VariantSpec(
        TIC,
        kwargs=arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=_SOURCE.format(size),
        test_kwargs=_TINY,
        first_conv="stem.embed.proj",
        pool_reduction=32,
        fx_traceable=False,
        fx_reason="MSAConv sizes its blocks from the grid in Python and gathers key halos with as_strided",
        description=f"TiC-{size} (reconstructed configuration), MSA-Conv 7x7, ImageNet-1k 224 px.",
    )


# Hand count, widths C_s, depths d_s, grids N_s = (56², 28², 14², 7²) at 224 px, k = 7, pooling f = 2 in the
# odd blocks of stages 1-3. Params: stem 48*C0 + 3*C0; per block 12C² + 13C (+ 2*(4C + C) pooling conv);
# downsample 9*C_in*C_out + 3*C_out; final norm 2*C3; head 1000*C3 + 1000.
# MACs: stem 48*C0*N0; per block N*(12C² + 2*49*C) (+ 2C*N pooling conv); downsample 9*C_in*C_out*N_out;
# head 1000*C3. T: 30.21M / 4.71G, S: 51.53M / 8.96G, B: 91.19M / 15.82G.
VARIANTS = {
    "tic_tiny_224": _spec({}, 30.21, 4.71, "T"),
    "tic_small_224": _spec({"depths": (2, 2, 18, 2)}, 51.53, 8.96, "S"),
    "tic_base_224": _spec(
        {"embed_dims": (128, 256, 512, 1024), "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
        91.19,
        15.82,
        "B",
    ),
}

register_variants(_create, VARIANTS, module=__name__)
