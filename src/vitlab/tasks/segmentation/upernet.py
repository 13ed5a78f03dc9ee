"""UperNet's decode head (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", arXiv:1807.10221).

The head most ViT segmentation papers report with (ViT-Adapter, ViT-CoMer, BEiT, Swin on ADE20K): a pyramid
pooling module (PSPNet) on the coarsest map, an FPN top-down path over the others, every level brought to the
finest one and fused by a 3x3 conv before a 1x1 classifier. Sizes follow mmsegmentation's ``UPerHead`` (pool
scales 1, 2, 3, 6; conv + BatchNorm + ReLU units without conv bias; dropout 0.1 before the classifier), so
parameter counts compare with the papers' tables. The auxiliary FCN head of those recipes is not built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UperNetHead"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UperNetHead(nn.Module):
    """Maps (fine to coarse, ``in_channels[i]`` wide) -> class logits ``(B, num_classes, H, W)`` at ``size``.

    Args:
        in_channels: channels of each input map, finest first.
        channels: the head's width (512 in the papers' ADE20K recipes).
        pool_scales: output sizes of the pyramid pooling on the coarsest map.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("UperNetHead needs at least one input map")
        *fine, coarse = in_channels
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(_conv_bn_relu(coarse, channels, 1) for _ in self.pool_scales)
        self.ppm_fuse = _conv_bn_relu(coarse + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in fine)
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in fine)
        self.fuse = _conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def _pyramid_pool(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, scale)), size=size, mode="bilinear", align_corners=False)
            for scale, conv in zip(self.pool_scales, self.ppm, strict=True)
        ]
        return self.ppm_fuse(torch.cat([x, *pooled], dim=1))

    def forward(self, maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(maps) != len(self.lateral) + 1:
            raise ValueError(f"UperNetHead expects {len(self.lateral) + 1} maps, got {len(maps)}")
        levels = [conv(m) for conv, m in zip(self.lateral, maps[:-1], strict=True)]
        levels.append(self._pyramid_pool(maps[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one, upsampled
            levels[i - 1] = levels[i - 1] + F.interpolate(
                levels[i], size=levels[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(level) for conv, level in zip(self.smooth, levels[:-1], strict=True)] + [levels[-1]]
        fine = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=fine, mode="bilinear", align_corners=False) for o in outs[1:]]
        logits = self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
