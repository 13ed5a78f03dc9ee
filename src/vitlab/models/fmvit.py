"""FMViT: "FMViT: A multiple-frequency mixing Vision Transformer" (arXiv:2311.05707),
github.com/tany0699/FMViT (PAPERS.md row 11).

A CNN-Transformer hybrid for deployment (TensorRT / CoreML) that mixes high-frequency features (convolutions)
with low-frequency features (attention over a pooled map) inside one block, built from three deploy-friendly
parts, each a multi-branch training form that folds into plain convolutions for inference:

- gMLP (convolutional multi-group reparameterisation): each 1x1 conv of the MLP is a sum of parallel 1x1 convs
  with different group counts (``rep_groups``), each with BatchNorm; ``reparameterize()`` expands the grouped
  kernels to block-diagonal dense ones and adds them into one 1x1 conv (``_MultiGroupConv1x1``).
- RLMHSA (reparameterisable lightweight MHSA): keys and values come from an average-pooled map (``sr_ratio``,
  lightweight), the projections are multi-group 1x1 convs, and the pre-norm and pooled-map BatchNorms fold
  into the q / kv projections at deploy time.
- CFB (convolutional fusion block): a RepVGG-style grouped 3x3 + 1x1 + identity branch conv (timm's
  ``MobileOneBlock``), a multi-group 1x1 projection, then a BatchNorm + gMLP, all fused at deploy time.
- FMB (frequency mixing block): RLMHSA on ``mix_ratio`` of the output channels (low frequency), a CFB-style
  conv mixer on the rest (high frequency), both concatenated, then a gMLP.

``FMViT.reparameterize()`` turns the training form into the deploy form in place; in eval mode both compute the
same function (tests/models/test_fmvit.py), and the deploy form has fewer modules and parameters.

Reconstruction (read this before citing numbers): only the abstract of the paper could be read here, and the
official repository holds a README and a licence, no code. The macro layout is therefore reconstructed from
Next-ViT (arXiv:2207.05501, bytedance/Next-ViT, as in timm's ``nextvit.py``), whose deployment framing, target
platforms and baselines the FMViT abstract follows: the same stem (64-32-64), four stages with strides 4/8/16/32,
per-stage widths, the "N conv blocks then one transformer block" stacking pattern, head size 32, pooling ratios
8/4/2/1 and a 0.75 attention share, with CFB in place of Next-ViT's NCB and FMB in place of its NTB.
``fmvit_small/base/large`` follow Next-ViT-S/B/L depths. The reference parameter / MAC figures in ``VARIANTS``
are this reconstruction's own counts (training form, measured on the meta device; see the comment there), not
the paper's table, which could not be read; ``rep_groups=(1, 4)`` is likewise a choice, not a published value.

Deviations from Next-ViT's code beyond the FMViT parts: the pooling for keys/values is a 2-D average pool over
the map (Next-ViT pools consecutive tokens in raster order with a 1-D pool); attention goes through
``F.scaled_dot_product_attention`` (``layers.attend``); blocks exchange ``(B, N, C)`` tokens with their grid
(vitlab's contract) and work on maps inside. The stem turns its input channels-last, so every map is a free view
of the tokens (speed only: 1.2-1.3x on CPU; same function). ``benchmarks/zoo.py`` times the deploy form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models.fastvit import MobileOneBlock
from timm.models.nextvit import merge_pre_bn

from ..layers import HierarchicalBackbone, Stage, attend, is_fx_tracing, map_to_tokens, tokens_to_map
from ..layers.block import Grid
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["FMVIT", "VARIANTS", "FMViT"]

FMVIT = Paper(
    11,
    "FMViT: A multiple-frequency mixing Vision Transformer",
    "2311.05707",
    "https://github.com/tany0699/FMViT",
    kind="B+T",
)


def _fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x))`` for a bias-free conv: scale the output channels, shift by the BN."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class _MultiGroupConv1x1(nn.Module):
    """gMLP's linear layer: ``sum_g BN_g(conv1x1_groups=g(x))`` on ``(B, C, H, W)``; one dense 1x1 conv at deploy.

    A grouped 1x1 kernel is a block-diagonal dense kernel, so every branch adds into one ``(out, in)`` matrix.
    """

    def __init__(self, in_chs: int, out_chs: int, groups: Sequence[int] = (1, 4)) -> None:
        super().__init__()
        if 1 not in groups or any(g < 1 or in_chs % g or out_chs % g for g in groups):
            # the dense branch (groups=1) is the conv; the grouped ones are extra training-time branches
            raise ValueError(f"rep_groups must hold 1 and divisors of {in_chs} and {out_chs}, got {tuple(groups)}")
        self.in_chs, self.out_chs = in_chs, out_chs
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, groups=g, bias=False), nn.BatchNorm2d(out_chs)) for g in groups
        )
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return sum(branch(x) for branch in self.branches)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.fused is not None:
            return
        weight, bias = 0.0, 0.0
        for conv, bn in self.branches:
            w, b = _fuse_conv_bn(conv.weight, bn)
            g = conv.groups  # (out, in/g) per group -> block-diagonal (out, in)
            dense = torch.block_diag(*w.reshape(g, self.out_chs // g, self.in_chs // g))
            weight, bias = weight + dense, bias + b
        ref = self.branches[0][0].weight
        self.fused = nn.Conv2d(self.in_chs, self.out_chs, 1, device=ref.device, dtype=ref.dtype)
        self.fused.weight.copy_(weight.reshape(self.out_chs, self.in_chs, 1, 1))
        self.fused.bias.copy_(bias)
        del self.branches


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, act: bool = False) -> nn.Module:
    """Conv + BN (+ ReLU) that fuses at deploy time (a single-branch ``MobileOneBlock``)."""
    act_layer = nn.ReLU if act else nn.Identity
    return MobileOneBlock(in_chs, out_chs, kernel_size, stride, use_scale_branch=False, act_layer=act_layer)


def _project(in_chs: int, out_chs: int) -> nn.Module:
    return _conv_bn(in_chs, out_chs) if in_chs != out_chs else nn.Identity()


class _GroupMlp(nn.Sequential):
    """gMLP: multi-group 1x1 conv -> ReLU -> multi-group 1x1 conv, on ``(B, C, H, W)``."""

    def __init__(self, dim: int, hidden: int, groups: Sequence[int], drop: float = 0.0) -> None:
        fc1, fc2 = _MultiGroupConv1x1(dim, hidden, groups), _MultiGroupConv1x1(hidden, dim, groups)
        super().__init__()
        self.fc1, self.act, self.drop1, self.fc2, self.drop2 = fc1, nn.ReLU(), nn.Dropout(drop), fc2, nn.Dropout(drop)


class _ConvMixer(nn.Sequential):
    """The high-frequency mixer: grouped 3x3 (+1x1 +identity branches, RepVGG-style) -> ReLU -> multi-group 1x1."""

    def __init__(self, dim: int, head_dim: int, groups: Sequence[int]) -> None:
        super().__init__()
        self.conv = MobileOneBlock(dim, dim, 3, group_size=head_dim, act_layer=nn.ReLU)
        self.proj = _MultiGroupConv1x1(dim, dim, groups)


class _RLMHSA(nn.Module):
    """Attention with keys/values from a ``sr_ratio``-pooled map; q/kv/proj are multi-group 1x1 convs.

    ``(B, C, H, W) -> (B, C, H, W)``; ``sr_norm`` (BN of the pooled map) folds into ``kv`` at deploy time.
    """

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, groups: Sequence[int], attn_drop: float = 0.0):
        super().__init__()
        if sr_ratio < 1:
            raise ValueError(f"sr_ratios must be >= 1, got {sr_ratio}")
        self.num_heads, self.head_dim, self.attn_drop = dim // head_dim, head_dim, attn_drop
        self.q = _MultiGroupConv1x1(dim, dim, groups)
        self.kv = _MultiGroupConv1x1(dim, 2 * dim, groups)
        pool = nn.AvgPool2d(sr_ratio, sr_ratio, ceil_mode=True, count_include_pad=False)
        self.pool = pool if sr_ratio > 1 else nn.Identity()
        self.sr_norm = nn.BatchNorm2d(dim) if sr_ratio > 1 else nn.Identity()
        self.proj = _MultiGroupConv1x1(dim, dim, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.q(x).reshape(B, self.num_heads, self.head_dim, H * W).transpose(-1, -2)  # (B, h, N, d)
        kv = self.kv(self.sr_norm(self.pool(x))).reshape(B, 2, self.num_heads, self.head_dim, -1)
        k, v = kv.transpose(-1, -2).unbind(1)  # (B, h, M, d) each
        x = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(-1, -2).reshape(B, C, H, W))


class _CFB(nn.Module):
    """Convolutional fusion block: ``x + mixer(x)`` then ``x + gMLP(BN(x))`` (BN folds into gMLP.fc1)."""

    def __init__(self, in_dim: int, dim: int, head_dim: int, mlp_ratio: float, groups: Sequence[int], drop_path: float):
        super().__init__()
        self.patch_embed = _project(in_dim, dim)
        self.mixer = _ConvMixer(dim, head_dim, groups)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = _GroupMlp(dim, int(dim * mlp_ratio), groups)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = self.patch_embed(tokens_to_map(x, grid))
        x = x + self.drop_path1(self.mixer(x))
        x = x + self.drop_path2(self.mlp(self.norm(x)))
        return map_to_tokens(x)[0]

    def fold_norms(self) -> None:
        if isinstance(self.norm, nn.Identity):
            return
        merge_pre_bn(self.mlp.fc1.fused, self.norm)
        self.norm = nn.Identity()


class _FMB(nn.Module):
    """Frequency mixing block: RLMHSA (low frequency) on ``mix_ratio`` of the channels, a conv mixer (high
    frequency) on a projection of its output to the rest, concatenated, then ``x + gMLP(BN(x))``."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        head_dim: int,
        sr_ratio: int,
        mix_ratio: float,
        mlp_ratio: float,
        groups: Sequence[int],
        drop_path: float,
    ) -> None:
        super().__init__()
        self.attn_dim = max(head_dim, int(dim * mix_ratio / head_dim + 0.5) * head_dim)
        conv_dim = dim - self.attn_dim
        if conv_dim < head_dim or conv_dim % head_dim:
            raise ValueError(f"FMB width {dim} leaves {conv_dim} conv channels; need a positive multiple of {head_dim}")
        self.patch_embed = _project(in_dim, self.attn_dim)
        self.norm1 = nn.BatchNorm2d(self.attn_dim)
        self.attn = _RLMHSA(self.attn_dim, head_dim, sr_ratio, groups)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.projection = _conv_bn(self.attn_dim, conv_dim)
        self.mixer = _ConvMixer(conv_dim, head_dim, groups)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = _GroupMlp(dim, int(dim * mlp_ratio), groups)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = self.patch_embed(tokens_to_map(x, grid))
        x = x + self.drop_path1(self.attn(self.norm1(x)))  # low frequency
        h = self.projection(x)
        h = h + self.drop_path2(self.mixer(h))  # high frequency
        x = torch.cat([x, h], dim=1)
        x = x + self.drop_path3(self.mlp(self.norm2(x)))
        return map_to_tokens(x)[0]

    def fold_norms(self) -> None:
        if isinstance(self.norm1, nn.Identity):
            return
        merge_pre_bn(self.attn.q.fused, self.norm1)
        if isinstance(self.attn.sr_norm, nn.BatchNorm2d):  # pooling commutes with norm1's per-channel affine map
            merge_pre_bn(self.attn.kv.fused, self.norm1, self.attn.sr_norm)
        else:
            merge_pre_bn(self.attn.kv.fused, self.norm1)
        merge_pre_bn(self.mlp.fc1.fused, self.norm2)
        self.norm1, self.attn.sr_norm, self.norm2 = nn.Identity(), nn.Identity(), nn.Identity()


class _Stem(nn.Sequential):
    """Next-ViT's stem: four 3x3 conv-BN-ReLU, strides 2, 1, 1, 2: image -> ``(tokens, grid)`` at stride 4."""

    def __init__(self, in_chans: int, chs: Sequence[int]) -> None:
        c0, c1, c2 = chs
        specs = ((in_chans, c0, 2), (c0, c1, 1), (c1, c2, 1), (c2, c2, 2))
        super().__init__(*(_conv_bn(i, o, 3, s, act=True) for i, o, s in specs))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        # channels-last from the first conv on: every later map is then a free view of the (B, N, C) tokens, the
        # 1x1 convs run as NHWC and the attention's q/k/v keep a unit last stride (SDPA's fused CPU kernel)
        return map_to_tokens(super().forward(x.contiguous(memory_format=torch.channels_last)))


class _Downsample(nn.Module):
    """2x2 average pool (ceil) then 1x1 conv-BN between stages: ``(x, grid) -> (x', grid')``."""

    stride = 2

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.conv = _conv_bn(in_dim, out_dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        return map_to_tokens(self.conv(self.pool(tokens_to_map(x, grid))))


class _TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of ``(B, N, C)`` tokens (the final norm, BN as in Next-ViT)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if not is_fx_tracing():  # traced, ``input.dim()`` is a proxy
            super()._check_input_dim(input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class FMViT(HierarchicalBackbone):
    """FMViT: stem, then per stage CFBs with an FMB after every ``fmb_every[i]``-th block (0: none).

    Args:
        depths: blocks per stage. widths: CFB widths. fmb_widths: FMB output widths.
        fmb_every: the period of FMBs in each stage (Next-ViT's hybrid strategy: 0, 4, 5, 3).
        sr_ratios: key/value pooling ratio of RLMHSA per stage. head_dim: channels per head and per conv group.
        mix_ratio: the RLMHSA share of an FMB's output channels. rep_groups: gMLP's branch group counts.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        stem_chs: Sequence[int] = (64, 32, 64),
        depths: Sequence[int] = (3, 4, 10, 3),
        widths: Sequence[int] = (96, 192, 384, 768),
        fmb_widths: Sequence[int] = (96, 256, 512, 1024),
        fmb_every: Sequence[int] = (0, 4, 5, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        head_dim: int = 32,
        mix_ratio: float = 0.75,
        cfb_mlp_ratio: float = 3.0,
        fmb_mlp_ratio: float = 2.0,
        rep_groups: Sequence[int] = (1, 4),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        n = len(depths)
        if not (len(widths) == len(fmb_widths) == len(fmb_every) == len(sr_ratios) == n) or len(stem_chs) != 3:
            raise ValueError("depths, widths, fmb_widths, fmb_every and sr_ratios need one entry per stage")
        if any(w % head_dim for w in (*widths, *fmb_widths)):
            raise ValueError(f"widths and fmb_widths must be multiples of head_dim {head_dim}")
        if not 0.0 < mix_ratio < 1.0:
            raise ValueError(f"mix_ratio must be in (0, 1), got {mix_ratio}")
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        stages, dim, k = [], stem_chs[-1], 0
        for i, depth in enumerate(depths):
            down = _Downsample(dim, widths[i]) if i > 0 else None
            dim, blocks = widths[i] if i > 0 else dim, []
            for j in range(depth):
                if fmb_every[i] and (j + 1) % fmb_every[i] == 0:
                    args = (head_dim, sr_ratios[i], mix_ratio, fmb_mlp_ratio, rep_groups, rates[k])
                    blocks.append(_FMB(dim, fmb_widths[i], *args))
                    dim = fmb_widths[i]
                else:
                    blocks.append(_CFB(dim, widths[i], head_dim, cfb_mlp_ratio, rep_groups, rates[k]))
                    dim = widths[i]
                k += 1
            stages.append(Stage(blocks, dim, down))
        super().__init__(
            _Stem(in_chans, stem_chs),
            stages,
            stem_stride=4,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            norm_layer=_TokenBatchNorm,
        )
        self.img_size = img_size  # accepted for timm's interface; any input size works (no position encodings)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every multi-branch conv and BatchNorm into plain convs, in place (the deploy form; eval-equal)."""
        for m in list(self.modules()):
            if isinstance(m, (MobileOneBlock, _MultiGroupConv1x1)):
                m.reparameterize()
        for m in self.modules():
            if isinstance(m, (_CFB, _FMB)):  # after the fusion above: BNs fold into the fused 1x1 convs
                m.fold_norms()


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> FMViT:
    return build_with_features(FMViT, variant, pretrained, **kwargs)


# The registry-wide contract tests build this: two stages at 32 px (8x8 then 4x4 tokens), every block type,
# key/value pooling (sr 2) and the stride-2 transition included.
_TINY = {
    "stem_chs": (16, 8, 16),
    "depths": (1, 2),
    "widths": (16, 32),
    "fmb_widths": (16, 48),
    "fmb_every": (0, 2),
    "sr_ratios": (2, 1),
    "head_dim": 8,
    "img_size": 32,
}
_SOURCE = "reconstructed: Next-ViT-{} layout with FMViT's CFB/FMB/gMLP/RLMHSA (paper table unread); own count"


def _spec(depths: tuple[int, ...], size: str, params_m: float, gmacs: float) -> VariantSpec:
    return VariantSpec(
        FMVIT,
        kwargs={"depths": depths},
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=_SOURCE.format(size),
        test_kwargs=_TINY,
        first_conv="stem.0.conv_kxk.0.conv",
        pool_reduction=32,
        description=f"FMViT on the Next-ViT-{size} layout (reconstructed; training form, reparameterize() for deploy)",
    )


# Reference figures (224 px, 1000 classes): this reconstruction's training form as counted on meta. The
# multi-group branches (groups 1 and 4) add a quarter to every 1x1 conv of gMLP / RLMHSA / the conv mixer, and
# each 3x3 mixer has a 1x1 and an identity branch. The deploy form (``reparameterize()``) has 31.74M / 44.78M /
# 57.83M parameters and 5.79 / 8.27 / 10.75 GMACs, Next-ViT-S/B/L's published 31.7M / 44.8M / 57.8M and
# 5.8 / 8.3 / 10.8G (timm's nextvit_* count the same MACs); tests/models/test_fmvit.py checks fmvit_small's.
VARIANTS = {
    "fmvit_small": _spec((3, 4, 10, 3), "S", 39.07, 6.96),
    "fmvit_base": _spec((3, 4, 20, 3), "B", 55.20, 10.01),
    "fmvit_large": _spec((3, 4, 30, 3), "L", 71.34, 13.05),
}

register_variants(_create, VARIANTS, module=__name__)
