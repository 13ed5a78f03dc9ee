"""The WaveViT-style hierarchical topology that SpectFormer-H and SVT-H share, written once.

A conv stem (stride 4), stages whose first ``num_early_stages`` mix tokens with the family's own mixer and
the rest with attention (PVTv2 conv FFNs throughout), then a CaiT-style class-attention block on a
mean-initialised class token, a norm, and the classifier plus the token-labelling auxiliary head, combined
at inference as ``head(cls) + 0.5 * max over tokens of aux_head(tokens)`` (both official codebases).
A family passes its mixer (``early_mixer(dim, grid_size=(H, W))``); nothing else differs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, Mlp, to_2tuple

from .attention import Attention, attend
from .backbone import HierarchicalBackbone
from .block import ConvDownsample, Grid, MetaBlock, Stage, map_to_tokens
from .mlp import ConvFfn

__all__ = ["ClassAttentionBackbone", "ClassAttentionBlock", "ConvStem", "NormConvDownsample"]


class ConvStem(nn.Module):
    """7x7/2 and two 3x3 conv-BN-ReLU, a 3x3/2 projection and a norm: image -> ``(tokens, grid)``, stride 4."""

    stride = 4

    def __init__(self, in_chans: int, hidden_dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            ConvNormAct(in_chans, hidden_dim, 7, stride=2, padding=3, act_layer=nn.ReLU),
            ConvNormAct(hidden_dim, hidden_dim, 3, padding=1, act_layer=nn.ReLU),
            ConvNormAct(hidden_dim, hidden_dim, 3, padding=1, act_layer=nn.ReLU),
        )
        self.proj = nn.Conv2d(hidden_dim, out_dim, 3, 2, 1)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x, grid = map_to_tokens(self.proj(self.conv(x)))
        return self.norm(x), grid


class NormConvDownsample(ConvDownsample):
    """The previous stage's closing norm (official ``norm{i}``), then the 3x3/2 conv + norm downsample."""

    def __init__(self, in_dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__(in_dim, out_dim, 3, 2, norm_layer)
        self.pre_norm = norm_layer(in_dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        return super().forward(self.pre_norm(x), grid)


class ClassAttentionBlock(nn.Module):
    """CaiT-style class attention: only the first token queries all tokens, then an MLP on it alone."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = norm_layer(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        u = self.norm1(x)
        q = self.q(u[:, :1]).view(B, 1, self.num_heads, -1).transpose(1, 2)  # (B, nh, 1, hd)
        k, v = self.kv(u).view(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, N, hd)
        cls = x[:, :1] + self.proj(attend(q, k, v).transpose(1, 2).reshape(B, 1, C))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


def _stage_grids(img_size: tuple[int, int], num_stages: int) -> list[Grid]:
    # every conv has stride 2 and "same" padding: each halves the grid, rounding up (224 -> 56, 28, 14, 7)
    h, w = math.ceil(img_size[0] / 4), math.ceil(img_size[1] / 4)
    return [(math.ceil(h / 2**i), math.ceil(w / 2**i)) for i in range(num_stages)]


class ClassAttentionBackbone(HierarchicalBackbone):
    """Conv stem, early stages with ``early_mixer``, attention stages, class-attention head (module docstring).

    ``forward_features`` returns the last stage's map (the shared backbone's contract); ``forward_head`` runs
    the class-attention block, ``head_norm`` and the classifier(s).

    Args:
        early_mixer: ``early_mixer(dim, grid_size=(H, W))`` builds the mixer of the first stages; ``grid_size`` is
            the stage's grid at ``img_size``.
        num_early_stages: how many leading stages use it (the rest use attention).
        use_aux_head: the token-labelling head on the patch tokens, added to the logits as officially.
        stem_norm_layer: the stem's norm (default ``norm_layer``).
    """

    _pools = ("token", "")

    def __init__(
        self,
        early_mixer: Callable[..., nn.Module],
        num_early_stages: int,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dims: Sequence[int] = (64, 128, 320, 448),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (2, 4, 10, 14),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        stem_hidden_dim: int = 32,
        qkv_bias: bool = True,
        use_aux_head: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        stem_norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        n = len(embed_dims)
        if not n or any(len(t) != n for t in (depths, num_heads, mlp_ratios)):
            raise ValueError(
                f"embed_dims, depths, num_heads and mlp_ratios need one entry per stage, got "
                f"{embed_dims!r}, {depths!r}, {num_heads!r}, {mlp_ratios!r}"
            )
        if any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be positive integers, got {depths!r}")
        if not 0 <= num_early_stages <= n:
            raise ValueError(f"num_early_stages must be in [0, {n}], got {num_early_stages!r}")
        img_size = to_2tuple(img_size)
        if not all(isinstance(s, int) and s >= 4 for s in img_size):
            raise ValueError(f"img_size must be integers >= 4, got {img_size!r}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        grids = _stage_grids(img_size, n)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, as officially
        ffn = partial(ConvFfn, dw_residual=False)  # PVTv2 form: fc1 -> dwconv -> GELU -> fc2
        stages = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            if i < num_early_stages:
                mixer = partial(early_mixer, grid_size=grids[i])
            else:
                mixer = partial(Attention, num_heads=num_heads[i], qkv_bias=qkv_bias)
            rates_i = rates[sum(depths[:i]) : sum(depths[:i]) + depth]
            blocks = [MetaBlock(dim, mixer, ffn, norm_layer, mlp_ratios[i], r) for r in rates_i]
            down = NormConvDownsample(embed_dims[i - 1], dim, norm_layer) if i else None
            stages.append(Stage(blocks, dim, down))
        stem = ConvStem(in_chans, stem_hidden_dim, embed_dims[0], stem_norm_layer or norm_layer)
        super().__init__(
            stem,
            stages,
            stem_stride=ConvStem.stride,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            norm_layer=lambda _: nn.Identity(),  # the closing norm follows the class-attention block
        )
        self.img_size = img_size
        self.cls_block = ClassAttentionBlock(embed_dims[-1], num_heads[-1], mlp_ratios[-1], norm_layer)
        self.head_norm = norm_layer(embed_dims[-1])
        self.use_aux_head = use_aux_head
        self.aux_head = self._make_head(num_classes) if use_aux_head and num_classes > 0 else None
        self.init_weights()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = self._make_head(num_classes) if self.use_aux_head and num_classes > 0 else None

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """``HierarchicalBackbone``'s; pruning the head also drops the class-attention block and its norm, which
        only the head reads (the model then returns the unpooled map, ``global_pool=''``, as timm's pruned models)."""
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.cls_block, self.head_norm = nn.Identity(), nn.Identity()
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, H, W)`` last-stage map -> logits (or the normed class token with ``pre_logits``).

        ``global_pool=''`` (timm's "no pooling", ``num_classes=0``) returns the map before class attention.
        """
        if not self.global_pool:
            return self.head_drop(x)
        tokens, _ = map_to_tokens(x)
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # class token = mean token (official)
        x = self.head_norm(self.cls_block(x))
        out = self.head_drop(x[:, 0])
        if pre_logits:
            return out
        logits = self.head(out)
        if self.aux_head is not None:
            logits = logits + 0.5 * self.aux_head(x[:, 1:]).amax(dim=1)  # token labelling's inference rule
        return logits
