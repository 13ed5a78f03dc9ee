"""The MetaFormer spine (arXiv:2111.11418): ``MetaBlock``, ``Stage`` and ``ConvDownsample``.

Blocks and mixers exchange tokens as ``(B, N, C)`` plus ``grid = (H, W)`` when the tokens form a grid.
A mixer is any module ``mixer(dim)`` with ``forward(x, grid) -> x`` (same shape); papers add mixers, not
copies of blocks. Child names follow timm's ``Block`` (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ...), so
timm checkpoints load and ``vitlab.reduce`` finds the parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .tracing import is_fx_tracing

__all__ = ["ConvDownsample", "Grid", "MetaBlock", "Stage", "map_to_tokens", "tokens_to_map"]

Grid = tuple[int, int]


def tokens_to_map(x: torch.Tensor, grid: Grid, num_prefix_tokens: int = 0) -> torch.Tensor:
    """``(B, P + H*W, C)`` tokens -> ``(B, C, H, W)`` map, dropping the ``P`` prefix tokens."""
    B, N, C = x.shape
    if not is_fx_tracing() and N - num_prefix_tokens != grid[0] * grid[1]:
        raise ValueError(f"{N - num_prefix_tokens} grid tokens do not fill grid {tuple(grid)}")
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(B, C, grid[0], grid[1])


def map_to_tokens(x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    """``(B, C, H, W)`` map -> ``((B, H*W, C) tokens, (H, W))``."""
    return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


def _call(module: nn.Module, x: torch.Tensor, grid: Grid | None) -> torch.Tensor:
    # feed-forward parts that need the token grid (conv FFNs) say so with ``uses_grid = True``
    return module(x, grid) if getattr(module, "uses_grid", False) else module(x)


class MetaBlock(nn.Module):
    """``x + mixer(norm1(x))`` then ``x + mlp(norm2(x))``, each with optional layer scale and drop path.

    Args:
        mixer: ``mixer(dim)`` builds the token mixer (``forward(x, grid)``).
        mlp: ``mlp(dim, hidden)`` builds the channel MLP; default timm's ``Mlp`` with GELU.
        layer_scale: initial value of per-channel residual scales (None: no layer scale).
        mixer_name: child name of the mixer; default ``attn`` for ``Attention`` (timm's name), else ``mixer``.
    """

    def __init__(
        self,
        dim: int,
        mixer: Callable[[int], nn.Module],
        mlp: Callable[[int, int], nn.Module] | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        layer_scale: float | None = None,
        mixer_name: str | None = None,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.norm1 = norm_layer(dim)
        token_mixer = mixer(dim)
        self.mixer_name = mixer_name or ("attn" if isinstance(token_mixer, Attention) else "mixer")
        self.add_module(self.mixer_name, token_mixer)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = mlp(dim, hidden) if mlp is not None else Mlp(dim, hidden, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def token_mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x), grid)))
        return x + self.drop_path2(self.ls2(_call(self.mlp, self.norm2(x), grid)))


class ConvDownsample(nn.Module):
    """Strided conv between stages on the token map, then a norm: ``(x, grid) -> (x', grid')``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int = 3,
        stride: int = 2,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, kernel_size // 2)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        x, grid = map_to_tokens(self.conv(tokens_to_map(x, grid)))
        return self.norm(x), grid


class Stage(nn.Module):
    """An optional downsample then blocks, all on ``(x, grid)``; ``dim`` is the output width.

    ``stride`` is the downsample's spatial stride (1 without one); the backbones read it for
    ``feature_info``.
    """

    def __init__(self, blocks: Sequence[nn.Module], dim: int, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.stride = getattr(downsample, "stride", 1) if downsample is not None else 1
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        if not isinstance(self.downsample, nn.Identity):
            x, grid = self.downsample(x, grid)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x = block(x, grid)
        return x, grid
