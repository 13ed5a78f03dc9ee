"""timm's model contract, implemented once per topology: ``IsotropicBackbone`` and ``HierarchicalBackbone``.

A paper family subclasses one of them and builds its blocks (``block_fn``) or stem and stages; the
classifier head, pooling, ``forward_intermediates``, feature info, grad checkpointing and weight-decay
groups then come from here instead of being rewritten per family (STYLE.md B.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .block import Grid, Stage, tokens_to_map
from .tracing import is_fx_tracing

__all__ = ["HierarchicalBackbone", "IsotropicBackbone"]

# timm wraps it for FX in its own module only; calls from here must be graph nodes too (sizes are proxies)
torch.fx.wrap("resample_abs_pos_embed")


def _check_common(num_classes: int, in_chans: int, global_pool: str, pools: tuple[str, ...]) -> None:
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    if global_pool not in pools:
        raise ValueError(f"global_pool must be one of {pools}, got {global_pool!r}")


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class _ContractMixin:
    """Head handling shared by both topologies (the head is ``Linear(num_features, num_classes)``)."""

    num_features: int
    num_classes: int
    global_pool: str
    _pools: tuple[str, ...]  # '' (timm's "no pooling") returns the unpooled ``forward_features`` output
    _head_on_unpooled: bool  # a classifier on the unpooled output: per token, or refused (on a map)
    _trunk: str  # the attribute holding the blocks or stages

    def _check_unpooled_head(self, num_classes: int, global_pool: str) -> None:
        if not global_pool and num_classes > 0 and not self._head_on_unpooled:
            raise ValueError(
                "global_pool='' keeps the (B, C, H, W) map, which the linear head cannot classify: use num_classes=0"
            )

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        global_pool = self.global_pool if global_pool is None else global_pool
        _check_common(num_classes, 1, global_pool, self._pools)
        self._check_unpooled_head(num_classes, global_pool)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks/stages, norm and head that ``forward_intermediates(indices)`` does not need."""
        trunk = getattr(self, self._trunk)
        take, max_index = feature_take_indices(len(trunk), indices)
        setattr(self, self._trunk, trunk[: max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


class IsotropicBackbone(_ContractMixin, nn.Module):
    """Patch embedding, optional class token and learned position embedding, ``depth`` blocks on one grid.

    Args:
        block_fn: ``block_fn(index, drop_path)`` builds block ``index``; blocks take ``(x, grid)`` where ``x``
            holds the class token first when ``class_token`` (``num_prefix_tokens`` = 1).
        pos_embed: learn an absolute position embedding for the patch grid (resampled to other grids).
        embed_layer: ``embed_layer(img_size=, patch_size=, in_chans=, embed_dim=)`` returning ``(B, H, W, C)``;
            default timm's ``PatchEmbed`` with dynamic image size, padding the input to whole patches.
        global_pool: ``"token"``, ``"avg"``, or ``""`` for the unpooled tokens ``(B, P + N, C)`` (timm's ViT).
    """

    _pools = ("token", "avg", "")
    _head_on_unpooled = True  # timm's ViT: global_pool='' with a head gives per-token logits
    _trunk = "blocks"

    def __init__(
        self,
        block_fn: Callable[[int, float], nn.Module],
        depth: int,
        embed_dim: int,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        class_token: bool = True,
        pos_embed: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        embed_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_classes, in_chans, global_pool, self._pools)
        img_size = to_2tuple(img_size)
        if not all(isinstance(s, int) and s >= patch_size for s in img_size):
            raise ValueError(f"img_size must be integers >= patch_size {patch_size}, got {img_size!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if embed_layer is None:
            # any input size: the image is zero-padded on the right and bottom to whole patches (timm's ViT
            # dynamic_img_pad); a size that is a multiple of the patch is unchanged
            self.patch_embed = PatchEmbed(
                img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False,
                dynamic_img_pad=True,
            )  # fmt: skip
        else:
            self.patch_embed = embed_layer(
                img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        num_patches = self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim)) if pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*(block_fn(i, rates[i]) for i in range(depth)))
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": patch_size, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init for linears and embeddings; families with special parameters extend it."""
        self.apply(_init_linear)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _pos_embed_for(self, grid: Grid) -> torch.Tensor:
        """The position embedding ``(1, H*W, C)`` for a token grid, resampled when it is not the built one."""
        if is_fx_tracing() or self.grid != tuple(grid):  # traced sizes are proxies: resample decides when run
            return resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=self.grid, num_prefix_tokens=0)
        return self.pos_embed

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.patch_embed(x)  # (B, H, W, C)
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        if self.pos_embed is not None:
            x = x + self._pos_embed_for((H, W))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x), (H, W)

    def _tokens_to_map(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Block output -> ``(B, C, H, W)`` feature map at the patch stride (families with other layouts override)."""
        return tokens_to_map(x, grid, self.num_prefix_tokens)

    def _run_block(self, block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, grid, use_reentrant=False)
        return block(x, grid)

    def _run_blocks(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if getattr(self.blocks, "threads_state", False):  # token reduction (vitlab.reduce) runs them itself
            return self.blocks(x)
        for block in self.blocks:
            x = self._run_block(block, x, grid)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> normed tokens ``(B, P + H'*W', C)``, class token first."""
        x, grid = self._embed(x)
        return self.norm(self._run_blocks(x, grid))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        # global_pool='': every token (B, P + N, C), prefix tokens included, as timm's ViT
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **embed_kwargs: Any,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normed tokens and the chosen blocks' outputs as ``(B, C, H, W)`` maps (prefix tokens dropped).

        ``embed_kwargs`` go to the family's ``_embed`` (ChannelViT's ``channels``).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if getattr(self.blocks, "threads_state", False):
            raise ValueError(
                "forward_intermediates runs the blocks one by one, but a plug-in runs them as one here "
                "(token reduction removes the token grid; a path ensemble keeps two streams): remove it first"
            )
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x, **embed_kwargs)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, grid)
            if i in take:
                intermediates.append(self._tokens_to_map(self.norm(x) if norm else x, grid))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


class HierarchicalBackbone(_ContractMixin, nn.Module):
    """A stem, then stages that each may downsample, a final norm and a pooled linear head.

    Args:
        stem: ``stem(image) -> (tokens (B, N, C0), grid)``.
        stages: ``Stage`` modules run in order on ``(tokens, grid)``.
        stem_stride: the stem's total spatial stride (for ``feature_info``).
        global_pool: ``"avg"``, ``"max"``, or ``""`` (with ``num_classes=0``) for the unpooled map ``(B, C, H, W)``.
    """

    _pools = ("avg", "max", "")
    _head_on_unpooled = False  # timm's ConvNeXt: global_pool='' only without a classifier
    _trunk = "stages"

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[Stage],
        *,
        stem_stride: int,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        _check_common(num_classes, in_chans, global_pool, self._pools)
        self._check_unpooled_head(num_classes, global_pool)
        if not stages:
            raise ValueError("stages must not be empty")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.num_features = self.head_hidden_size = stages[-1].dim
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        self.feature_info, reduction = [], stem_stride
        for i, stage in enumerate(stages):
            reduction *= stage.stride
            self.feature_info.append({"num_chs": stage.dim, "reduction": reduction, "module": f"stages.{i}"})
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks = r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))]
        return {"stem": r"^stem", "blocks": blocks}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> the normed last-stage map ``(B, C, H', W')``."""
        x, grid = self.stem(x)
        for stage in self.stages:
            x, grid = stage(x, grid)
        return tokens_to_map(self.norm(x), grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        elif self.global_pool == "max":
            x = x.amax(dim=(2, 3))
        # global_pool='': the map itself (B, C, H, W); num_classes is 0 then
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normed map and each chosen stage's output map; ``norm`` normalises the last stage's map."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x, grid = self.stem(x)
        intermediates = []
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x, grid = stage(x, grid)
            if i in take:
                intermediates.append(tokens_to_map(self.norm(x) if norm and i == last else x, grid))
        if intermediates_only:
            return intermediates
        return tokens_to_map(self.norm(x), grid), intermediates
