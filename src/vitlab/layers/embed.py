"""Patch and convolutional embeddings.

``ConvEmbed`` is CvT's convolutional token embedding ("CvT: Introducing Convolutions to Vision
Transformers", arXiv:2103.15808, Sec. 3.1, github.com/microsoft/CvT): an overlapping strided
convolution followed by a norm over channels. Unlike a ViT patch embedding it needs no fixed input
size and keeps the 2-D layout, so hierarchical models use it as their stem and between stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import to_2tuple

__all__ = ["ConvEmbed"]


class ConvEmbed(nn.Module):
    """Overlapping strided convolution, then a norm over channels.

    Input ``(B, in_chans, H, W)``; output ``(B, H', W', embed_dim)`` (``output_fmt="NHWC"``, the grid
    stays in the shape) or ``(B, embed_dim, H', W')`` (``"NCHW"``), where
    ``H' = (H + 2 * padding - patch_size) // stride + 1``.

    Args:
        patch_size: convolution kernel size; larger than ``stride`` makes the patches overlap.
        norm_layer: built as ``norm_layer(embed_dim)`` and applied over channels; ``None`` for no norm.
        output_fmt: ``"NHWC"`` or ``"NCHW"``.
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 64,
        patch_size: int | tuple[int, int] = 7,
        stride: int | tuple[int, int] = 4,
        padding: int | tuple[int, int] = 2,
        norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
        output_fmt: str = "NHWC",
    ) -> None:
        super().__init__()
        if output_fmt not in ("NHWC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NHWC' or 'NCHW', got {output_fmt!r}")
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.output_fmt = output_fmt
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.stride, to_2tuple(padding))
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H', W', C): the norm runs over channels
        return x if self.output_fmt == "NHWC" else x.permute(0, 3, 1, 2)
