"""Necks that turn backbone feature maps into a pyramid of maps with one common width.

``SimpleFeaturePyramid`` follows the idea of ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones
for Object Detection", arXiv:2203.16527, https://github.com/facebookresearch/detectron2/tree/main/projects/ViTDet):
an isotropic backbone's single stride-``s`` map becomes a pyramid by transposed convolutions (finer levels) and
max pooling (coarser levels). ``FeaturePyramidNeck`` is the top-down pathway of FPN (Lin et al., arXiv:1612.03144)
for hierarchical backbones. Both take a list of ``(B, C_i, H_i, W_i)`` maps and return one map per declared stride.
Reuses timm's ``LayerNorm2d``. Deviations: odd map sizes are handled by ceil-mode pooling and by upsampling to the
next level's actual size; ``SimpleFeaturePyramid`` optionally takes one map per level (deeper blocks for coarser
levels, as DPT does) instead of only the last one. torchvision's ``FeaturePyramidNetwork`` is not used because
``layers/`` imports only torch and timm and because it carries no stride metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

__all__ = ["FeaturePyramidNeck", "SimpleFeaturePyramid"]

NormLayer = Callable[[int], nn.Module]


def _norm(norm_layer: NormLayer | None, channels: int) -> nn.Module:
    return norm_layer(channels) if norm_layer is not None else nn.Identity()


def _as_stride(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_maps(name: str, features: Sequence[torch.Tensor], channels: Sequence[int]) -> None:
    if len(features) != len(channels):
        raise ValueError(f"{name} expects {len(channels)} feature maps, got {len(features)}")
    for i, (x, c) in enumerate(zip(features, channels, strict=True)):
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"{name}: feature map {i} must be (B, {c}, H, W), got {tuple(x.shape)}")


class SimpleFeaturePyramid(nn.Module):
    """One stride-``in_stride`` map (or one map per level) -> maps at ``out_strides``, ``out_channels`` wide.

    Args:
        in_stride: the input map's stride relative to the image (a ViT's patch size).
        out_strides: the pyramid's strides; each must be ``in_stride`` times a power of two. Default
            ``(s/4, s/2, s, 2s)`` (ViTDet's scale factors 4, 2, 1, 1/2).
        norm_layer: normalisation after each convolution (ViTDet uses LayerNorm over channels).
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        out_channels: int = 256,
        out_strides: Sequence[float] | None = None,
        norm_layer: NormLayer | None = LayerNorm2d,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if out_strides is None:
            out_strides = (in_stride / 4, in_stride / 2, in_stride, in_stride * 2)
        if not out_strides:
            raise ValueError("out_strides must not be empty")
        self.in_channels = in_channels
        self.in_stride = in_stride
        self.out_channels = out_channels
        self.out_strides = tuple(_as_stride(s) for s in out_strides)
        self.levels = nn.ModuleList()
        for stride in self.out_strides:
            steps = math.log2(in_stride / stride) if stride > 0 else math.nan
            if not float(steps).is_integer():
                raise ValueError(f"out_strides must be in_stride {in_stride} times a power of two, got {stride}")
            self.levels.append(self._make_level(int(steps), norm_layer, act_layer))

    def _make_level(self, steps: int, norm_layer: NormLayer | None, act_layer: Callable[[], nn.Module]) -> nn.Module:
        """``steps`` > 0: that many 2x transposed convs (halving channels); < 0: that many 2x max pools."""
        layers: list[nn.Module] = []
        dim = self.in_channels
        for i in range(steps):
            if i > 0:  # norm + activation between deconvolutions, as in ViTDet's 4x branch
                layers += [_norm(norm_layer, dim), act_layer()]
            layers.append(nn.ConvTranspose2d(dim, max(dim // 2, 1), kernel_size=2, stride=2))
            dim = max(dim // 2, 1)
        # ceil mode: a 7x7 map at stride 4 gives 4x4 at stride 8, covering every input pixel
        layers += [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True) for _ in range(-steps)]
        layers += [
            nn.Conv2d(dim, self.out_channels, kernel_size=1, bias=norm_layer is None),
            _norm(norm_layer, self.out_channels),
            nn.Conv2d(self.out_channels, self.out_channels, kernel_size=3, padding=1, bias=norm_layer is None),
            _norm(norm_layer, self.out_channels),
        ]
        return nn.Sequential(*layers)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One map (every level from it) or one map per level -> ``(B, out_channels, H*s_in/s, W*s_in/s)`` each."""
        if len(features) == 1:
            features = list(features) * len(self.levels)
        _check_maps("SimpleFeaturePyramid", features, [self.in_channels] * len(self.levels))
        return [level(x) for level, x in zip(self.levels, features, strict=True)]


class FeaturePyramidNeck(nn.Module):
    """Hierarchical stage maps (channels ``in_channels``, strides ``in_strides``) -> same strides, one width.

    Lateral 1x1 convolutions bring every stage to ``out_channels``; a top-down pass adds each coarser level,
    upsampled (nearest) to the finer level's size; a 3x3 convolution then smooths each level (FPN).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[float],
        out_channels: int = 256,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if not in_channels or len(in_channels) != len(in_strides):
            raise ValueError(f"need one stride per input map, got channels {in_channels} and strides {in_strides}")
        if list(in_strides) != sorted(in_strides):
            raise ValueError(f"in_strides must be ordered fine to coarse, got {tuple(in_strides)}")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.out_strides = tuple(_as_stride(s) for s in in_strides)
        bias = norm_layer is None
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=bias), _norm(norm_layer, out_channels))
            for c in in_channels
        )
        self.output = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias), _norm(norm_layer, out_channels)
            )
            for _ in in_channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Maps fine to coarse -> ``(B, out_channels, H_i, W_i)`` per level (sizes kept)."""
        _check_maps("FeaturePyramidNeck", features, self.in_channels)
        maps = [lateral(x) for lateral, x in zip(self.lateral, features, strict=True)]
        for i in range(len(maps) - 2, -1, -1):
            # size=, not scale_factor=: at odd sizes the coarser map is not exactly half the finer one
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, maps, strict=True)]
