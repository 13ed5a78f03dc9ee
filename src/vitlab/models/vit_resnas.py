"""ViT-ResNAS: "Searching for Efficient Multi-Stage Vision Transformers" (arXiv:2109.00642),
github.com/yilunliao/vit-search (PAPERS.md row 19).

A multi-stage ViT: a conv stem (the official ``network_def`` type 4: conv 3x3/2, two residual conv 3x3, then a
``p/2`` patch conv) gives ``H/p x W/p`` tokens plus a class token; each later stage starts with a **residual
spatial reduction** (Sec. 3.1): LayerNorm, a ``(s+1) x (s+1)`` conv with stride ``s`` on the token map, a new
position embedding, and the class token through a linear layer; the residual path is the input average-pooled by
``s`` and zero-padded in channels to the wider width (class token: zero-padded only). Blocks are pre-norm
Transformer blocks whose attention width ``heads x head_dim`` and MLP hidden width are free per block, as the
searched networks have them. The architecture is data: a ``ResNASSpec`` (per stage a width and per block heads,
head dim and MLP hidden), readable from the official ``network_def`` tuples (``parse_network_def``).

Variants: ``vit_resnas_tiny_224`` and ``vit_resnas_small_224`` are the searched networks of the official scripts
``scripts/vit-sr-nas/searched_net/tiny.sh`` and ``small_mac@2.9G.sh`` (their ``network_def`` is kept below as the
parity reference); their MAC budgets in the official search scripts are 1.7944 G and 2.9 G. The paper's own table
of parameters could not be read here, so no ``ref_params_m`` is declared; ``tests/models/test_vit_resnas.py``
checks the structure against the ``network_def`` and the counted MACs against the search budgets.
``vit_resnas_nano_28`` is vitlab's Fashion-MNIST size (patch 4: 7x7 -> 4x4 -> 2x2 tokens), not a paper's.

Deviations: the official training head ``patch_head`` (for token labelling / patch mixup) is a training-recipe
part and is not built; the official model has no position-embedding resampling (fixed 224 input) - here position
embeddings resample so other sizes run; on odd grids the residual average pool uses ``ceil_mode`` (no padding
counted) so both paths give ``ceil(H/s)`` rows, at even grids this is the paper's pooling exactly. The supernet and
search are in ``vitlab.search``. ``reduction="conv"`` builds the plain strided-conv reduction (no residual), the
paper's ablation.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices

from ..layers import MetaBlock, Stage, attend, map_to_tokens, tokens_to_map
from ..layers.tracing import is_fx_tracing
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = [
    "RESNAS",
    "VARIANTS",
    "BlockSpec",
    "ResNASAttention",
    "ResNASSpec",
    "ResidualSpatialReduction",
    "StageSpec",
    "ViTResNAS",
    "count_macs",
    "parse_network_def",
    "to_network_def",
]

RESNAS = Paper(
    19,
    "Searching for Efficient Multi-Stage Vision Transformers",
    "2109.00642",
    "https://github.com/yilunliao/vit-search",
    kind="B+T",
)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
_EPS = 1e-6  # the official MaskedLayerNorm's eps
torch.fx.wrap("resample_abs_pos_embed")


@dataclass(frozen=True)
class BlockSpec:
    """One Transformer block: attention ``heads x head_dim`` wide, MLP ``mlp_hidden`` wide."""

    heads: int
    head_dim: int
    mlp_hidden: int


@dataclass(frozen=True)
class StageSpec:
    """One stage: its token width and its blocks (a stage after the first starts with a spatial reduction)."""

    dim: int
    blocks: tuple[BlockSpec, ...]


@dataclass(frozen=True)
class ResNASSpec:
    """A whole network: stages, the stem's patch size and its mid channels (0: a plain patch conv)."""

    stages: tuple[StageSpec, ...]
    patch_size: int = 14
    stem_chans: int = 24
    reduction_stride: int = 2

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("ResNASSpec.stages must not be empty")
        for s, stage in enumerate(self.stages):
            if stage.dim < 1 or any(b.heads < 1 or b.head_dim < 1 or b.mlp_hidden < 1 for b in stage.blocks):
                raise ValueError(f"ResNASSpec stage {s}: widths, heads, head dims and MLP widths must be >= 1")
            if s and stage.dim < self.stages[s - 1].dim:
                raise ValueError(
                    f"ResNASSpec stage {s}: width {stage.dim} < previous {self.stages[s - 1].dim}; the residual "
                    "reduction zero-pads channels, so widths must not shrink"
                )
        if self.patch_size < 2 or self.patch_size % 2 or self.reduction_stride < 1:
            raise ValueError(f"ResNASSpec.patch_size must be even and >= 2, got {self.patch_size}")


def parse_network_def(network_def: str | tuple, patch_size: int = 14, stem_chans: int = 24) -> ResNASSpec:
    """A ``ResNASSpec`` from an official ``network_def`` (a tuple, or its string as in the official scripts).

    Entries: ``(0 or 4, dim)`` patch/conv stem, ``(1, (dim, heads, head_dim), (dim, hidden), on)`` block,
    ``(3, in, out)`` residual spatial reduction, ``(2, dim, classes)`` head. Blocks with ``on = 0`` are left out.
    """
    nd = ast.literal_eval(network_def) if isinstance(network_def, str) else network_def
    if not isinstance(nd, tuple | list) or len(nd) < 2 or nd[0][0] not in (0, 4) or nd[-1][0] != 2:
        raise ValueError("network_def must start with a (0|4, dim) stem entry and end with a (2, dim, classes) head")
    stem_chans = 0 if nd[0][0] == 0 else stem_chans
    stages, dim, blocks = [], nd[0][1], []
    for i, entry in enumerate(nd[1:-1], start=1):
        if entry[0] == 1:
            (d_attn, heads, head_dim), (d_mlp, hidden), on = entry[1], entry[2], entry[3]
            if d_attn != dim or d_mlp != dim:
                raise ValueError(f"network_def entry {i}: block width {d_attn}/{d_mlp} != stage width {dim}")
            if on:
                blocks.append(BlockSpec(heads, head_dim, hidden))
        elif entry[0] == 3:
            if entry[1] != dim:
                raise ValueError(f"network_def entry {i}: reduction input {entry[1]} != stage width {dim}")
            stages.append(StageSpec(dim, tuple(blocks)))
            dim, blocks = entry[2], []
        else:
            raise ValueError(f"network_def entry {i}: unknown type {entry[0]!r} (expected 1 block or 3 reduction)")
    if nd[-1][1] != dim:
        raise ValueError(f"network_def head input {nd[-1][1]} != last stage width {dim}")
    stages.append(StageSpec(dim, tuple(blocks)))
    return ResNASSpec(tuple(stages), patch_size=patch_size, stem_chans=stem_chans)


def to_network_def(spec: ResNASSpec, num_classes: int = 1000) -> tuple:
    """The official ``network_def`` tuple of ``spec`` (the inverse of ``parse_network_def``)."""
    out: list[tuple] = [(4 if spec.stem_chans else 0, spec.stages[0].dim)]
    for i, st in enumerate(spec.stages):
        if i:
            out.append((3, spec.stages[i - 1].dim, st.dim))
        out += [(1, (st.dim, b.heads, b.head_dim), (st.dim, b.mlp_hidden), 1) for b in st.blocks]
    return (*out, (2, spec.stages[-1].dim, num_classes))


class _ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _ConvStem(nn.Module):
    """Official type-4 stem: conv 3x3/2, two conv 3x3 with a residual, a ``p/2 x p/2`` patch conv (stride p)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, mid: int) -> None:
        super().__init__()
        self.conv1 = _ConvBnAct(in_chans, mid, 2)
        self.conv2 = _ConvBnAct(mid, mid)
        self.conv3 = _ConvBnAct(mid, mid)
        self.proj = nn.Conv2d(mid, dim, patch_size // 2, patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.proj(x + self.conv3(self.conv2(x)))


class ResNASAttention(nn.Module):
    """Self-attention whose inner width ``heads x head_dim`` is free (not ``dim``); timm's ``qkv``/``proj`` names."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


def _resampled(pos: torch.Tensor, grid: tuple[int, int], built: tuple[int, int]) -> torch.Tensor:
    if is_fx_tracing() or tuple(grid) != built:
        return resample_abs_pos_embed(pos, new_size=grid, old_size=built, num_prefix_tokens=0)
    return pos


class ResidualSpatialReduction(nn.Module):
    """Sec. 3.1: ``(B, 1 + H*W, C_in)`` -> ``(B, 1 + ceil(H/s)*ceil(W/s), C_out)``.

    Main path: LayerNorm, then a ``(s+1)``-kernel stride-``s`` conv on the map (+ position embedding) and a linear
    layer on the class token. ``residual=True`` (the paper) adds the input, average-pooled by ``s`` and zero-padded
    from ``C_in`` to ``C_out`` channels; ``residual=False`` is the plain strided-conv reduction.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], stride: int = 2, residual: bool = True):
        super().__init__()
        if residual and out_dim < in_dim:
            raise ValueError(f"out_dim {out_dim} must be >= in_dim {in_dim} for the zero-padded residual")
        self.in_dim, self.out_dim, self.stride, self.residual = in_dim, out_dim, stride, residual
        self.norm = nn.LayerNorm(in_dim, eps=_EPS)
        self.conv = nn.Conv2d(in_dim, out_dim, stride + 1, stride, stride // 2)
        self.token_proj = nn.Linear(in_dim, out_dim)
        self.grid = (-(-grid[0] // stride), -(-grid[1] // stride))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], out_dim))

    def shortcut(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The residual path alone: pooled patch tokens and the class token, zero-padded to ``out_dim``."""
        pooled = F.avg_pool2d(
            tokens_to_map(x, grid, 1), self.stride, self.stride, ceil_mode=True, count_include_pad=False
        )
        res = torch.cat([x[:, :1], map_to_tokens(pooled)[0]], dim=1)
        return F.pad(res, (0, self.out_dim - x.shape[-1]))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        y = self.norm(x)
        patches, new_grid = map_to_tokens(self.conv(tokens_to_map(y, grid, 1)))
        patches = patches + _resampled(self.pos_embed, new_grid, self.grid)
        out = torch.cat([self.token_proj(y[:, :1]), patches], dim=1)
        return (out + self.shortcut(x, grid) if self.residual else out), new_grid


def _stem_grid(img_size: tuple[int, int], patch_size: int, conv_stem: bool) -> tuple[int, int]:
    if not conv_stem:
        return img_size[0] // patch_size, img_size[1] // patch_size
    return tuple((-(-s // 2)) // (patch_size // 2) for s in img_size)  # conv 3x3/2 (ceil), then p/2 patches


class ViTResNAS(nn.Module):
    """Multi-stage ViT with residual spatial reduction; the architecture is a ``ResNASSpec``.

    Args:
        spec: the network (or ``network_def``: an official tuple / string, parsed with ``patch_size``/``stem_chans``).
        reduction: ``"residual"`` (the paper) or ``"conv"`` (plain strided conv between stages, the ablation).
        global_pool: ``"token"`` (class token, the paper), ``"avg"`` or ``""`` (all tokens).
    """

    def __init__(
        self,
        spec: ResNASSpec | None = None,
        network_def: str | tuple | None = None,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        reduction: str = "residual",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_size: int | None = None,
        stem_chans: int | None = None,
    ) -> None:
        super().__init__()
        if (spec is None) == (network_def is None):
            raise ValueError("give exactly one of spec or network_def")
        if spec is None:
            spec = parse_network_def(network_def, patch_size or 14, 24 if stem_chans is None else stem_chans)
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
        if reduction not in ("residual", "conv"):
            raise ValueError(f"reduction must be 'residual' or 'conv', got {reduction!r}")
        img_size = to_2tuple(img_size)
        if not all(isinstance(s, int) and s >= spec.patch_size for s in img_size):
            raise ValueError(f"img_size must be integers >= patch_size {spec.patch_size}, got {img_size!r}")
        self.spec, self.reduction, self.num_classes = spec, reduction, num_classes
        self.global_pool = self._check_pool(global_pool)
        self.num_prefix_tokens = 1
        dims = [s.dim for s in spec.stages]
        self.num_features = self.head_hidden_size = self.embed_dim = dims[-1]
        if spec.stem_chans:
            self.stem = _ConvStem(in_chans, dims[0], spec.patch_size, spec.stem_chans)
        else:
            self.stem = nn.Conv2d(in_chans, dims[0], spec.patch_size, spec.patch_size)
        self.grid = grid = _stem_grid(img_size, spec.patch_size, spec.stem_chans > 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], dims[0]))  # class slot, as official
        total = sum(len(s.blocks) for s in spec.stages)
        rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
        norm = partial(nn.LayerNorm, eps=_EPS)
        stages, self.feature_info, red = [], [], spec.patch_size
        for i, st in enumerate(spec.stages):
            down = None
            if i:
                down = ResidualSpatialReduction(
                    dims[i - 1], st.dim, grid, spec.reduction_stride, reduction == "residual"
                )
                grid, red = down.grid, red * spec.reduction_stride
            blocks = [
                MetaBlock(
                    st.dim,
                    partial(ResNASAttention, num_heads=b.heads, head_dim=b.head_dim),
                    mlp=partial(_mlp, hidden=b.mlp_hidden),
                    norm_layer=norm,
                    drop_path=next(rates),
                    mixer_name="attn",
                )
                for b in st.blocks
            ]
            stages.append(Stage(blocks, st.dim, down))
            self.feature_info.append({"num_chs": st.dim, "reduction": red, "module": f"stages.{i}"})
        self.stages = nn.ModuleList(stages)
        self.norm = norm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("pos_embed") or name == "cls_token":
                trunc_normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _check_pool(global_pool: str) -> str:
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        return global_pool

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("pos_embed") or n == "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)", (0,)), (r"^norm", (99999,))]
        return {"stem": r"^cls_token|^pos_embed|^stem", "blocks": r"^stages\.(\d+)" if coarse else blocks}

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
            self.global_pool = self._check_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> ``(B, 1 + H*W, C_0)`` tokens (class token first, position embedding added) and the grid."""
        x, grid = map_to_tokens(self.stem(x))
        pos = self.pos_embed
        x = x + _resampled(pos[:, 1:], grid, self.grid)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), grid

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normed tokens and each chosen stage's output as a ``(B, C, H, W)`` map (class token dropped)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x, grid = self.embed(x)
        intermediates, last = [], len(self.stages) - 1
        for i, stage in enumerate(stages):
            x, grid = stage(x, grid)
            if i in take:
                intermediates.append(tokens_to_map(self.norm(x) if norm and i == last else x, grid, 1))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> normed last-stage tokens ``(B, 1 + H'*W', C)``, class token first."""
        x, grid = self.embed(x)
        for stage in self.stages:
            x, grid = stage(x, grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _mlp(dim: int, _ratio_hidden: int, hidden: int) -> nn.Module:
    return Mlp(dim, hidden)  # the searched hidden width, not MetaBlock's dim * mlp_ratio


def count_macs(spec: ResNASSpec, img_size: int | tuple[int, int], in_chans: int = 3, num_classes: int = 1000) -> int:
    """Multiply-accumulates of one image, counted as ``vitlab.bench`` counts (matmuls, convs, attention)."""
    H, W = to_2tuple(img_size)
    dims = [s.dim for s in spec.stages]
    macs = 0
    if spec.stem_chans:
        m, h, w = spec.stem_chans, -(-H // 2), -(-W // 2)
        macs += h * w * 9 * (in_chans * m + 2 * m * m)
    grid = _stem_grid((H, W), spec.patch_size, spec.stem_chans > 0)
    k = spec.patch_size // 2 if spec.stem_chans else spec.patch_size
    macs += grid[0] * grid[1] * k * k * (spec.stem_chans or in_chans) * dims[0]
    s = spec.reduction_stride
    for i, st in enumerate(spec.stages):
        if i:
            grid = (-(-grid[0] // s), -(-grid[1] // s))
            macs += grid[0] * grid[1] * (s + 1) ** 2 * dims[i - 1] * st.dim + dims[i - 1] * st.dim
        n = 1 + grid[0] * grid[1]
        for b in st.blocks:
            inner = b.heads * b.head_dim
            macs += n * st.dim * 4 * inner + 2 * n * n * inner + 2 * n * st.dim * b.mlp_hidden
    return macs + dims[-1] * num_classes


# The official searched networks (scripts/vit-sr-nas/searched_net/tiny.sh, small_mac@2.9G.sh), verbatim data.
TINY_NETWORK_DEF = (
    "((4, 176), (1, (176, 3, 32), (176, 704), 1), (1, (176, 3, 32), (176, 576), 1), (1, (176, 3, 32), (176, 640), 1), "
    "(1, (176, 4, 32), (176, 576), 1), (1, (176, 4, 32), (176, 704), 1), (3, 176, 352), "
    "(1, (352, 10, 48), (352, 1408), 1), (1, (352, 8, 48), (352, 1408), 1), (1, (352, 8, 48), (352, 1280), 1), "
    "(1, (352, 8, 48), (352, 1408), 1), (1, (352, 10, 48), (352, 1280), 1), (1, (352, 10, 48), (352, 1024), 1), "
    "(3, 352, 704), (1, (704, 10, 64), (704, 2560), 1), (1, (704, 10, 64), (704, 1792), 1), "
    "(1, (704, 10, 64), (704, 2816), 1), (1, (704, 8, 64), (704, 2816), 1), (1, (704, 8, 64), (704, 2560), 1), "
    "(2, 704, 1000))"
)
SMALL_NETWORK_DEF = (
    "((4, 220), (1, (220, 5, 32), (220, 880), 1), (1, (220, 5, 32), (220, 880), 1), (1, (220, 7, 32), (220, 800), 1), "
    "(1, (220, 5, 32), (220, 720), 1), (1, (220, 5, 32), (220, 720), 1), (1, (220, 5, 32), (220, 720), 1), "
    "(3, 220, 440), (1, (440, 10, 48), (440, 1760), 1), (1, (440, 10, 48), (440, 1440), 1), "
    "(1, (440, 10, 48), (440, 1920), 1), (1, (440, 10, 48), (440, 1600), 1), (1, (440, 12, 48), (440, 1600), 1), "
    "(1, (440, 12, 48), (440, 1440), 1), (3, 440, 880), (1, (880, 16, 64), (880, 3200), 1), "
    "(1, (880, 12, 64), (880, 3200), 1), (1, (880, 16, 64), (880, 2880), 1), (1, (880, 12, 64), (880, 2240), 1), "
    "(1, (880, 14, 64), (880, 2560), 1), (2, 880, 1000))"
)
# Fashion-MNIST nano (vitlab's size): the largest network of benchmarks/vit_resnas.py's search space.
NANO_NETWORK_DEF = (
    (4, 64),
    *((1, (64, 2, 32), (64, 128), 1),) * 2,
    (3, 64, 128),
    *((1, (128, 4, 32), (128, 256), 1),) * 2,
    (3, 128, 256),
    *((1, (256, 8, 32), (256, 512), 1),) * 2,
    (2, 256, 10),
)
_TEST_DEF = ((4, 16), (1, (16, 2, 8), (16, 32), 1), (3, 16, 32), (1, (32, 2, 8), (32, 48), 1), (2, 32, 10))


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ViTResNAS:
    spec = kwargs.get("spec")
    if spec is None:
        nd = kwargs.get("network_def")
        spec = parse_network_def(nd, kwargs.get("patch_size") or 14, kwargs.get("stem_chans", 24)) if nd else None
    out_indices = kwargs.pop("out_indices", tuple(range(len(spec.stages))) if spec else (0, 1, 2))
    return build_with_features(ViTResNAS, variant, pretrained, out_indices=out_indices, **kwargs)


_common = dict(
    first_conv="stem.conv1.0",
    test_kwargs={"network_def": _TEST_DEF, "patch_size": 4, "stem_chans": 8, "img_size": 32},
)
VARIANTS = {
    "vit_resnas_tiny_224": VariantSpec(
        RESNAS,
        kwargs={"network_def": TINY_NETWORK_DEF},
        ref_source="official searched_net/tiny.sh network_def; search budget 1.7944 GMACs",
        description="ViT-ResNAS-Tiny, the searched network of the official tiny.sh",
        **_common,
    ),
    "vit_resnas_small_224": VariantSpec(
        RESNAS,
        kwargs={"network_def": SMALL_NETWORK_DEF},
        ref_source="official searched_net/small_mac@2.9G.sh network_def; search budget 2.9 GMACs",
        description="ViT-ResNAS-Small, the searched network of the official small_mac@2.9G.sh",
        **_common,
    ),
    "vit_resnas_nano_28": VariantSpec(
        RESNAS,
        kwargs={
            "network_def": NANO_NETWORK_DEF,
            "patch_size": 4,
            "stem_chans": 16,
            "img_size": 28,
            "in_chans": 1,
            "num_classes": 10,
        },
        img_size=28,
        in_chans=1,
        num_classes=10,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        ref_source="vitlab small-image size (no paper table)",
        description="ViT-ResNAS nano for 28 px (the Fashion-MNIST search space's largest network)",
        **_common,
    ),
}

register_variants(_create, VARIANTS, module=__name__)
