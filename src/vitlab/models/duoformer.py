"""DuoFormer: "DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention Vision Transformer"
(arXiv:2506.12982, MIDL 2025; earlier version arXiv:2407.13920), official code github.com/xiaoyatang/DuoFormer
(released as github.com/xiaoyatang/duoformer_TCGA) (PAPERS.md row 16).

A CNN (timm's ResNet, ``features_only``) gives ``num_scales`` maps at strides 4-32; a 1x1 conv projects each to the
width ``D``. The image is cut into ``p x p`` patches (``p = 32``: one stride-32 cell); every patch gathers the
``(p / s)^2`` cells of each stride-``s`` map under it, coarsest scale first, so a patch holds
``S = 1 + 4 + 16 + 64 = 85`` tokens with four ResNet stages (multi-scale patch tokenization, Sec. 3.1). A scale
token is put in front of each patch's tokens: learned (the official ``scale_token='random'``) or, as the paper's
"Process 2", computed from the hierarchical maps (each map brought down to the patch grid by stride-2 convs and a
max pool, concatenated, fused by four conv-BN-ReLU; ``scale_token="hierarchical"``). Scale attention (local): pre-norm
ViT blocks attend among the ``S + 1`` tokens of each patch, with a learned per-slot position embedding. Patch
attention (global): the scale tokens of all patches plus a class token attend to one another through ``depth``
attention layers; the class token feeds the head. The patch stage is ``layers.IsotropicBackbone`` with this file's
tokenizer as its ``embed_layer``, so position embeddings resample and ``forward_intermediates`` gives the patch
layers' ``(B, D, H / p, W / p)`` maps.

Configurations: the official code builds every model at ``D = 768``, 12 heads, ``depth = 12`` scale blocks and 12
patch layers on a torchvision ResNet-50 or ResNet-18 (the same layout as timm's). The paper's table of parameters
could not be read here, so the references are reconstructed: parameters and MACs counted by hand from the official
module definitions (``models/model_wo_extra_params.py``, ``scale_attention.py``, ``projection_head.py``) at 224 px and
1000 classes (see the comment above ``VARIANTS``).

Deviations from the official code: its patch layers are bare attention (no norm, residual or MLP, as its
``PatchBlock`` says) and are kept so, but the final LayerNorm it computes and then leaves unused is applied before the
head; the class token has no position embedding (official: a 50-slot ``pos_embed``; 768 fewer parameters); tokens
inside a patch are row-major at every scale (official: column-major at stride 16); its hierarchical scale token always
fuses all four stages and its ResNet-18 fusion conv expects 384 input channels (the maps have 960), here it fuses the
used stages with their true widths; inputs whose sides are not multiples of ``p`` are zero-padded on the bottom/right
(official: 224 px only); attention runs through ``F.scaled_dot_product_attention``; optional stochastic depth on the
scale blocks. No official weights are on a hub (checkpoints are Google Drive files), so none are mapped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..layers import Attention, Grid, IsotropicBackbone, MetaBlock, is_fx_tracing
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["DUOFORMER", "VARIANTS", "DuoFormer", "split_patches"]

DUOFORMER = Paper(
    16,
    "DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention Vision Transformer",
    "2506.12982",
    "https://github.com/xiaoyatang/DuoFormer",
)

SCALE_TOKENS = ("learned", "hierarchical")


def split_patches(x: torch.Tensor, cells: int) -> torch.Tensor:
    """``(B, D, Hp * k, Wp * k)`` map -> ``(B, Hp * Wp, k * k, D)``: the ``k x k`` cells under each patch, row-major."""
    B, D, H, W = x.shape
    if not is_fx_tracing() and (H % cells or W % cells):
        raise ValueError(f"a {H}x{W} map does not split into {cells}x{cells} cells per patch")
    x = x.reshape(B, D, H // cells, cells, W // cells, cells).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // cells) * (W // cells), cells * cells, D)


class _LearnedScaleToken(nn.Module):
    """One learned token shared by every patch (official ``scale_token='random'``) -> ``(B, N, 1, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        trunc_normal_(self.token, std=0.02)

    def forward(self, feats: Sequence[torch.Tensor], grid: Grid) -> torch.Tensor:
        # a copy, not an expanded view of the parameter: module hooks (FLOP counters) cannot track such a view
        return self.token.repeat(feats[0].shape[0], grid[0] * grid[1], 1, 1)


def _to_patch_grid(chans: int, factor: int) -> nn.Module:
    # a map ``factor = 2**j`` times finer than the patch grid: j - 1 stride-2 3x3 convs, then a 2x2 max pool
    if factor == 1:
        return nn.Identity()
    steps = factor.bit_length() - 1
    return nn.Sequential(*(nn.Conv2d(chans, chans, 3, 2, 1) for _ in range(steps - 1)), nn.MaxPool2d(2))


class _HierarchicalScaleToken(nn.Module):
    """The paper's scale token from the hierarchical maps (Process 2): each map brought to the patch grid,
    concatenated over channels and fused by ``num_convs`` 3x3 conv-BN-ReLU -> ``(B, N, 1, D)``."""

    def __init__(self, chans: Sequence[int], factors: Sequence[int], dim: int, num_convs: int = 4) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"scale_token_convs must be >= 1, got {num_convs}")
        self.down = nn.ModuleList(_to_patch_grid(c, f) for c, f in zip(chans, factors, strict=True))
        widths = [sum(chans)] + [dim] * num_convs
        self.fuse = nn.Sequential(*(ConvNormAct(i, o, 3, bias=True) for i, o in itertools.pairwise(widths)))

    def forward(self, feats: Sequence[torch.Tensor], grid: Grid) -> torch.Tensor:
        x = self.fuse(torch.cat([down(f) for down, f in zip(self.down, feats, strict=True)], dim=1))  # (B, D, Hp, Wp)
        return x.flatten(2).transpose(1, 2).unsqueeze(2)


class _MultiScaleTokenizer(nn.Module):
    """CNN maps -> per-patch multi-scale tokens -> scale attention -> each patch's scale token ``(B, Hp, Wp, D)``.

    The ``embed_layer`` of ``IsotropicBackbone``: built with ``img_size, patch_size, in_chans, embed_dim`` plus this
    family's keywords.
    """

    def __init__(
        self,
        *,
        img_size: Any,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        backbone: str,
        backbone_args: dict[str, Any],
        num_scales: int,
        scale_token: str,
        scale_token_convs: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path_rate: float,
        norm_layer: Any,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, str) or not timm.is_model(backbone):
            raise ValueError(f"backbone must be a timm model name, got {backbone!r}")
        if not isinstance(num_scales, int) or not 1 <= num_scales <= 4:
            raise ValueError(f"num_scales must be an integer in 1..4, got {num_scales!r}")
        if scale_token not in SCALE_TOKENS:
            raise ValueError(f"scale_token must be one of {SCALE_TOKENS}, got {scale_token!r}")
        out_indices = tuple(range(-num_scales, 0))  # the last (coarsest) stages
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=out_indices, in_chans=in_chans, **backbone_args
        )
        chans, reductions = self.backbone.feature_info.channels(), self.backbone.feature_info.reduction()
        if patch_size % max(reductions):
            raise ValueError(
                f"patch_size must be a multiple of the backbone's stride {max(reductions)}, got {patch_size}"
            )
        self.patch_size = patch_size
        self.cells = [patch_size // r for r in reductions][::-1]  # per patch side, coarsest scale first
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in chans[::-1])
        if scale_token == "hierarchical":
            factors = [patch_size // r for r in reductions]
            if any(f & (f - 1) for f in factors):
                raise ValueError(f"scale_token='hierarchical' needs patch_size / stride powers of 2, got {factors}")
            self.scale_token = _HierarchicalScaleToken(chans, factors, embed_dim, scale_token_convs)
        else:
            self.scale_token = _LearnedScaleToken(embed_dim)
        self.num_tokens = 1 + sum(k * k for k in self.cells)  # per patch: scale token + S multi-scale tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, self.num_tokens, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        mixer = partial(Attention, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            MetaBlock(embed_dim, mixer, None, norm_layer, mlp_ratio, rate, proj_drop) for rate in rates
        )
        self.grad_checkpointing = False

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """``(B, C, H, W)`` image -> ``(B, N, 1 + S, D)`` scale token + multi-scale tokens per patch, and the grid."""
        pad_h, pad_w = -x.shape[-2] % self.patch_size, -x.shape[-1] % self.patch_size
        if is_fx_tracing() or pad_h or pad_w:  # (traced, the padding is a proxy: pad, perhaps by nothing)
            x = F.pad(x, (0, pad_w, 0, pad_h))  # whole patches: every scale then nests exactly
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        feats = self.backbone(x)  # finest first
        parts = [split_patches(proj(f), k) for proj, f, k in zip(self.proj, feats[::-1], self.cells, strict=True)]
        x = torch.cat([self.scale_token(feats, grid), *parts], dim=2)
        return x + self.pos_embed, grid

    def attend_scales(self, x: torch.Tensor) -> torch.Tensor:
        """Scale attention: ``(B, N, 1 + S, D)`` -> the same, each patch's tokens attending among themselves."""
        B, N, S, D = x.shape
        x = x.reshape(B * N, S, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, None, use_reentrant=False)
            else:
                x = block(x)
        return x.reshape(B, N, S, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.tokens(x)
        x = self.attend_scales(x)[:, :, 0]  # the scale tokens carry each patch into patch attention
        return x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])  # (B, Hp, Wp, D)


class DuoFormer(IsotropicBackbone):
    """CNN multi-scale tokens, scale attention within each patch, then patch attention across patches.

    Args:
        backbone: a timm CNN name, built with ``features_only``; ``backbone_args`` go to its constructor.
        num_scales: how many of its last stages give tokens (4: strides 4-32).
        scale_token: ``"hierarchical"`` (the paper's Process 2) or ``"learned"`` (official ``'random'``).
        scale_token_convs: conv-BN-ReLU layers fusing the hierarchical maps into the scale token.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the width, and ``depth`` scale blocks and patch layers.
        patch_size: side of one patch in pixels, a multiple of the backbone's coarsest stride.
        drop_path_rate: stochastic depth over the scale blocks (the patch layers have no residual).
        Other keywords: ``IsotropicBackbone``'s (``img_size``, ``in_chans``, ``num_classes``, ``drop_rate``, ...).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_args: dict[str, Any] | None = None,
        num_scales: int = 4,
        scale_token: str = "hierarchical",
        scale_token_convs: int = 4,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int = 32,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        norm_layer = kwargs.pop("norm_layer", None) or partial(nn.LayerNorm, eps=1e-6)
        embed = partial(
            _MultiScaleTokenizer,
            backbone=backbone,
            backbone_args=dict(backbone_args or {}),
            num_scales=num_scales,
            scale_token=scale_token,
            scale_token_convs=scale_token_convs,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
        )

        def patch_layer(i: int, drop_path: float) -> nn.Module:
            # official PatchBlock: attention alone, no norm, MLP or residual
            return Attention(embed_dim, num_heads, qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)

        super().__init__(
            patch_layer, depth, embed_dim, patch_size=patch_size, norm_layer=norm_layer, embed_layer=embed, **kwargs
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        extra = {"patch_embed.pos_embed"}
        if isinstance(self.patch_embed.scale_token, _LearnedScaleToken):
            extra.add("patch_embed.scale_token.token")
        return super().no_weight_decay() | extra

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.patch_embed.grad_checkpointing = enable


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> DuoFormer:
    return build_with_features(DuoFormer, variant, pretrained, **kwargs)


# Registry tests: the variant's backbone at 1 block and 8-64 channels per stage, 16 wide, one scale block and patch
# layer, 32 px (one patch of 1 + 4 + 16 + 64 tokens plus the scale token; 48 px pads to 2 x 2 patches).
_TINY_CNN = {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8}
_TINY = {"backbone_args": _TINY_CNN, "embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 32}
_SOURCE = "reconstructed: official duoformer_TCGA config ({}), counted by hand at 224 px (paper table unread)"


def _spec(arch: dict[str, Any], params_m: float, gmacs: float, config: str, desc: str) -> VariantSpec:
    return VariantSpec(
        DUOFORMER,
        kwargs=arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=_SOURCE.format(config),
        test_kwargs=_TINY,
        first_conv="patch_embed.backbone.conv1",
        description=desc,
    )


# References, by hand from the official modules (D = 768, 12 scale blocks + 12 patch layers, 49 patches of T tokens):
# params = trunk (R50 23.508M, R18 11.177M) + sum(C_i*D + D) projections + scale token (learned D, or hierarchical:
# stride-2 convs 2*(C0^2*9 + C0) + (C1^2*9 + C1) and fusion (sum C)*D*9 + 3*D*D*9 + 4*3*D) + 12*(12*D^2 + 13*D)
# scale blocks + 12*(4*D^2 + 4*D) patch layers + T*D + D + 50*D + 2*D + (1000*D + 1000)
# = 186.755M (R50, 4 scales, hierarchical), 140.087M (R50, 2 scales, learned), 148.987M (R18, 4 scales, hierarchical).
# MACs = trunk (R50 4.09G, R18 1.81G) + projections + hierarchical-token convs + 12*49*(12*T*D^2 + 2*T^2*D)
# + 12*(4*50*D^2 + 2*50^2*D) + 1000*D; T = 86 (4 scales) or 6 (2 scales): 374.4G / 30.8G / 369.3G.
VARIANTS = {
    "duoformer_resnet50_224": _spec(
        {}, 186.76, 374.4, "ResNet-50, 4 scales, hierarchical scale token", "DuoFormer, ResNet-50, 4 scales"
    ),
    "duoformer_resnet50_s2_224": _spec(
        {"num_scales": 2, "scale_token": "learned"},
        140.09,
        30.8,
        "ResNet-50, 2 scales, scale_token='random' (main_toy.py)",
        "DuoFormer, ResNet-50, 2 scales (strides 16, 32), learned scale token",
    ),
    "duoformer_resnet18_224": _spec(
        {"backbone": "resnet18"},
        148.99,
        369.3,
        "ResNet-18, 4 scales, hierarchical scale token",
        "DuoFormer, ResNet-18, 4 scales",
    ),
}

register_variants(_create, VARIANTS, module=__name__)
