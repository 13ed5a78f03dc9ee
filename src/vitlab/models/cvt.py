"""CvT: "CvT: Introducing Convolutions to Vision Transformers" (arXiv:2103.15808),
github.com/microsoft/CvT (PAPERS.md row 2).

timm has no CvT, so this file builds it. Three stages, each a convolutional token embedding
(``layers.ConvEmbed``: overlapping strided conv + LayerNorm, Sec. 3.1) followed by pre-norm
transformer blocks whose attention projects q/k/v through a depthwise conv + BatchNorm, with stride
2 for k/v (convolutional projection, Sec. 3.2). There are no position embeddings, so a model runs at
any input size; the CLS token joins in the last stage only. Weights of the official repo and of
HF transformers' ``CvtForImageClassification`` load through ``checkpoint_filter_fn``.

Deviations: attention goes through ``F.scaled_dot_product_attention`` (equal in eval), with the
official scale ``embed_dim ** -0.5`` (not ``head_dim ** -0.5``), kept for weight parity. The official
code uses QuickGELU; the default here is exact GELU, as in HF's port of the weights
(``act_layer="quick_gelu"`` matches the official repo). Stochastic depth follows timm's linear rule
over all blocks rather than the official per-stage one.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_act_layer, trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..layers import ConvEmbed
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["CVT", "VARIANTS", "CvT", "checkpoint_filter_fn"]

CVT = Paper(
    2,
    "CvT: Introducing Convolutions to Vision Transformers",
    "2103.15808",
    "https://github.com/microsoft/CvT",
)

Grid = tuple[int, int]


def _tokens_to_map(x: torch.Tensor, grid: Grid, num_prefix_tokens: int = 0) -> torch.Tensor:
    """``(B, P + H*W, C)`` tokens -> ``(B, C, H, W)`` map, dropping the ``P`` prefix (CLS) tokens."""
    B, _, C = x.shape
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(B, C, grid[0], grid[1])


class _DwConvBn(nn.Sequential):
    """Depthwise conv + BatchNorm on a ``(B, C, H, W)`` map: one convolutional projection."""

    def __init__(self, dim: int, kernel_size: int, stride: int) -> None:
        conv = nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim, bias=False)
        super().__init__(OrderedDict(conv=conv, bn=nn.BatchNorm2d(dim)))


class _ConvProjAttention(nn.Module):
    """Multi-head attention over q/k/v from depthwise-conv projections of the token map (Sec. 3.2).

    Input ``(B, P + H*W, C)`` with ``P`` prefix (CLS) tokens, which bypass the convolutions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        kernel_size: int = 3,
        stride_kv: int = 2,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = dim**-0.5  # NOTE: the official scale uses the full width (see module docstring)
        self.attn_drop = attn_drop
        self.conv_proj_q = _DwConvBn(dim, kernel_size, 1)
        self.conv_proj_k = _DwConvBn(dim, kernel_size, stride_kv)
        self.conv_proj_v = _DwConvBn(dim, kernel_size, stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _project(self, conv: nn.Module, linear: nn.Module, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([prefix, conv(x).flatten(2).transpose(1, 2)], dim=1)  # (B, P + H'*W', C)
        B, T, C = t.shape
        return linear(t).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hd)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, N, C = x.shape
        prefix = x[:, : self.num_prefix_tokens]
        x = _tokens_to_map(x, grid, self.num_prefix_tokens)
        q = self._project(self.conv_proj_q, self.proj_q, prefix, x)
        k = self._project(self.conv_proj_k, self.proj_k, prefix, x)
        v = self._project(self.conv_proj_v, self.proj_v, prefix, x)
        dropout_p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class _ConvProjBlock(nn.Module):
    """Pre-norm transformer block around ``_ConvProjAttention``, with timm's child names."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_drop: float,
        attn_drop: float,
        drop_path: float,
        act_layer: Callable[..., nn.Module],
        norm_layer: Callable[[int], nn.Module],
        **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = _ConvProjAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, **attn_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class _CvTStage(nn.Module):
    """Convolutional token embedding, optional CLS token, then blocks: ``(B, C, H, W) -> (tokens, grid)``."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        patch_size: int,
        stride: int,
        padding: int,
        use_cls_token: bool,
        drop_path_rates: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
        pos_drop_rate: float = 0.0,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = 1 if use_cls_token else 0
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, stride, padding, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls_token else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.ModuleList(
            _ConvProjBlock(
                dim, drop_path=r, norm_layer=norm_layer, num_prefix_tokens=self.num_prefix_tokens, **block_kwargs
            )
            for r in drop_path_rates
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.patch_embed(x)  # (B, H, W, C)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, (H, W), use_reentrant=False)
            else:
                x = block(x, (H, W))
        return x, (H, W)


class CvT(nn.Module):
    """Convolutional vision Transformer: conv token embedding + conv-projection attention per stage.

    Args:
        img_size: accepted for timm's interface; nothing depends on it (no position embeddings).
        patch_sizes, patch_strides, patch_padding: the token embedding's conv per stage.
        kernel_size: the q/k/v depthwise convolutions' kernel; ``stride_kv`` subsamples k and v.
        use_cls_token: add a CLS token to the last stage (the paper); otherwise pool by averaging.
        global_pool: ``"token"`` (the CLS token), ``"avg"`` or ``""`` (all tokens, unpooled); default: ``"token"``
            when there is one.
        act_layer: MLP activation, a class or a timm name (``"gelu"``, ``"quick_gelu"``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str | None = None,
        embed_dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2),
        patch_padding: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_kv: int = 2,
        use_cls_token: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: str | Callable[..., nn.Module] = "gelu",
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        num_stages = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(patch_sizes) == len(patch_strides) == num_stages):
            raise ValueError("embed_dims, depths, num_heads, patch_sizes and patch_strides need one entry per stage")
        self.img_size = img_size
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = "token" if use_cls_token else "avg"
        self.global_pool = self._check_pool(global_pool, use_cls_token)
        self.num_prefix_tokens = 1 if use_cls_token else 0
        self.num_features = self.head_hidden_size = embed_dims[-1]
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, timm's rule
        kw = {"mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "kernel_size": kernel_size, "stride_kv": stride_kv}
        kw.update(pos_drop_rate=pos_drop_rate, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate)
        kw["act_layer"] = get_act_layer(act_layer)
        stages, chans, reduction, self.feature_info = [], in_chans, 1, []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            cls_i = use_cls_token and i == num_stages - 1  # CLS token in the last stage only (Sec. 3)
            rates_i = rates[sum(depths[:i]) : sum(depths[:i]) + depth]
            embed = (patch_sizes[i], patch_strides[i], patch_padding[i])
            stages.append(_CvTStage(chans, dim, *embed, cls_i, rates_i, norm_layer, num_heads=num_heads[i], **kw))
            chans, reduction = dim, reduction * patch_strides[i]
            self.feature_info.append({"num_chs": dim, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.ModuleList(stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)

    @staticmethod
    def _check_pool(global_pool: str, has_cls_token: bool) -> str:
        if global_pool not in ("token", "avg", "") or (global_pool == "token" and not has_cls_token):
            raise ValueError(
                f"global_pool must be 'avg', '' (no pooling) or, with a CLS token, 'token'; got {global_pool!r}"
            )
        return global_pool

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)", (0,)), (r"^norm", (99999,))]
        return {"stem": r"^stages\.0\.patch_embed", "blocks": r"^stages\.(\d+)" if coarse else blocks}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool, self.num_prefix_tokens > 0)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The final tokens and each chosen stage's output as a ``(B, C, H, W)`` map (CLS token removed).

        ``indices``: the last n stages if an int, all if None, else those listed. ``norm`` applies the
        final norm to the last stage's map.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"CvT returns intermediates as NCHW maps only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates, grid = [], (x.shape[-2], x.shape[-1])
        for i, stage in enumerate(stages):
            x, grid = stage(_tokens_to_map(x, grid) if i else x)
            if i in take_indices:
                y = self.norm(x) if norm and i == len(self.stages) - 1 else x
                intermediates.append(_tokens_to_map(y, grid, stage.num_prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages, norm and head that ``forward_intermediates(indices)`` does not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` image -> normed last-stage tokens ``(B, P + H'*W', C)``, CLS first."""
        x, grid = self.stages[0](x)
        for stage in self.stages[1:]:
            x, grid = stage(_tokens_to_map(x, grid))  # only the last stage has a CLS token
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        # global_pool='': every token (B, P + N, C), as timm's ViT
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Key renames onto ours, applied in order: HF transformers' CvtForImageClassification names.
_HF_RENAMES = (
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.", r"stages.\1.patch_embed."),
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    (r"patch_embed\.normalization\.", "patch_embed.norm."),
    (r"^cvt\.encoder\.stages\.(\d+)\.", r"stages.\1."),
    (r"^stages\.(\d+)\.layers\.", r"stages.\1.blocks."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.attention\.convolution_projection_([qkv])[a-z]*\.convolution_projection\.", r".attn.conv_proj_\1."),
    (r"(conv_proj_[qkv])\.convolution\.", r"\1.conv."),
    (r"(conv_proj_[qkv])\.normalization\.", r"\1.bn."),
    (r"\.attention\.attention\.projection_([qkv])[a-z]*\.", r".attn.proj_\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),  # after the attention output above
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
)
# The official repo (lib/models/cls_cvt.py) names everything as we do, except ``stage{i}.`` for ``stages.{i}.``.
_OFFICIAL_RENAMES = ((r"^stage(\d+)\.", r"stages.\1."),)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, Any]:
    """Map an official CvT or an HF ``CvtForImageClassification`` state dict onto this file's names."""
    state_dict = state_dict.get("state_dict", state_dict)
    keys = list(state_dict)
    if any(k.startswith("cvt.encoder.") for k in keys):
        renames = _HF_RENAMES
    elif any(re.match(r"^(module\.)?stage\d+\.", k) for k in keys):
        renames = _OFFICIAL_RENAMES
    else:
        renames = ()
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> CvT:
    return build_with_features(CvT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


# Three stages at 32 px (8x8, 4x4 and 2x2 tokens): every part, CLS token and k/v stride included.
_TINY = {"embed_dims": (16, 32, 48), "depths": (1, 1, 2), "num_heads": (1, 2, 3), "img_size": 32}


def _spec(
    arch: dict[str, Any], params_m: float, gmacs: float, source: str, hub: str, img_size: int = 224
) -> VariantSpec:
    return VariantSpec(
        CVT,
        kwargs=arch,
        img_size=img_size,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_params_rounding=1.0,  # the paper gives whole millions
        ref_source=source,
        test_kwargs=_TINY,
        hf_hub_id=hub,
        first_conv="stages.0.patch_embed.proj",
    )


_CVT_13 = {"embed_dims": (64, 192, 384), "depths": (1, 2, 10), "num_heads": (1, 3, 6)}
_CVT_21 = {"embed_dims": (64, 192, 384), "depths": (1, 4, 16), "num_heads": (1, 3, 6)}
_CVT_W24 = {"embed_dims": (192, 768, 1024), "depths": (2, 2, 20), "num_heads": (3, 12, 16)}

# CvT Table 2 (architectures) and Table 3 (params, FLOPs = multiply-accumulates; the official README
# repeats them). Hub weights are HF transformers' ports of the official checkpoints.
VARIANTS = {
    "cvt_13_224": _spec(_CVT_13, 20.0, 4.5, "CvT Table 3 (CvT-13)", "microsoft/cvt-13"),
    "cvt_21_224": _spec(_CVT_21, 32.0, 7.1, "CvT Table 3 (CvT-21)", "microsoft/cvt-21"),
    "cvt_13_384": _spec(_CVT_13, 20.0, 16.3, "CvT Table 3 (CvT-13↑384)", "microsoft/cvt-13-384", 384),
    "cvt_21_384": _spec(_CVT_21, 32.0, 24.9, "CvT Table 3 (CvT-21↑384)", "microsoft/cvt-21-384", 384),
    "cvt_w24_384": _spec(_CVT_W24, 277.0, 193.2, "CvT Table 3 (CvT-W24↑384)", "microsoft/cvt-w24-384-22k", 384),
}

register_variants(_create, VARIANTS, module=__name__)
