"""DPT's dense head: reassemble a plain ViT's intermediate token maps into a pyramid, fuse it coarse to fine, predict.

Ranftl et al., "Vision Transformers for Dense Prediction" (DPT, arXiv:2103.13413, github.com/isl-org/DPT), Sec. 3:

- **Reassemble** (``resample_conv``): each tapped block's patch map (prefix tokens already dropped, "ignore" readout)
  goes through a 1x1 projection, then a resampling by ``factor``: a transposed convolution (kernel = stride = factor)
  up, nothing at 1, a stride-2 3x3 convolution down (0.5); then a 3x3 convolution to the common ``features`` width.
- **Fusion** (``_FusionBlock``): RefineNet-style, coarse to fine: the running path plus a residual conv unit of the
  next finer map, a second residual unit, a bilinear upsampling to the next map's size, a 1x1 projection.
- **Head** (monocular depth): 3x3 conv to ``features / 2``, bilinear upsampling to the image size, 3x3 conv to 32,
  ReLU, 1x1 conv to ``out_chans``, ReLU (non-negative relative inverse depth, as MiDaS / Depth Anything).

Also ``scale_shift_invariant_loss`` (MiDaS, Ranftl et al. arXiv:1907.01341): the per-image least-squares scale and
shift align the prediction with the target before an L1 on the valid pixels, so a relative-depth head can be trained
on metric data. Used by MonoDINO-DETR (``tasks/detection/monodino_detr.py``); meant for any dense head on a plain ViT.

Deviations: any number of taps with any factors (DPT: four taps at 4, 2, 1, 1/2; Depth Anything's as well);
upsampling goes to the next map's size rather than exactly x2 (odd grids stay aligned); no batch norm (both
official codes default to none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DPTHead", "resample_conv", "scale_shift_invariant_loss"]


def resample_conv(in_chans: int, out_chans: int, factor: float) -> nn.Module:
    """1x1 projection, then DPT's resampling of a map by ``factor`` (an integer >= 1, or 0.5)."""
    proj = nn.Conv2d(in_chans, out_chans, 1)
    if factor == 1:
        return proj
    if factor == 0.5:
        return nn.Sequential(proj, nn.Conv2d(out_chans, out_chans, 3, stride=2, padding=1))
    if factor < 1 or factor != int(factor):
        raise ValueError(f"resampling factor must be an integer >= 1 or 0.5, got {factor!r}")
    f = int(factor)
    return nn.Sequential(proj, nn.ConvTranspose2d(out_chans, out_chans, f, stride=f))


class _ResidualConvUnit(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """Running path (+ residual unit of the new map) -> residual unit -> upsample to ``size`` -> 1x1 conv."""

    def __init__(self, dim: int, first: bool) -> None:
        super().__init__()
        self.rcu1 = None if first else _ResidualConvUnit(dim)
        self.rcu2 = _ResidualConvUnit(dim)
        self.out_conv = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if skip is not None and self.rcu1 is not None:
            x = x + self.rcu1(skip)
        x = F.interpolate(self.rcu2(x), size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Token maps of a plain ViT -> ``(relative depth (B, out_chans, H, W), fused features (B, features, h, w))``.

    Args:
        in_chans: the ViT's width (every tap has it).
        factors: the resampling factor of each tap, first tap (shallowest) first; DPT uses (4, 2, 1, 0.5).
        reassemble_chans: the 1x1 projection width per tap (DPT-Base: 96, 192, 384, 768); default ``features``.
        features: the fusion width (DPT: 256; Depth Anything ViT-S: 64).
        out_chans: the prediction's channels (1 for depth).
        final_relu: end with DPT's ReLU (non-negative depth); False gives a signed output (pointmaps, features).
    """

    def __init__(
        self,
        in_chans: int,
        factors: Sequence[float] = (4, 2, 1, 0.5),
        reassemble_chans: Sequence[int] | None = None,
        features: int = 64,
        out_chans: int = 1,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        chans = list(reassemble_chans or [features] * len(factors))
        if len(chans) != len(factors) or not factors:
            raise ValueError(f"need one reassemble width per factor, got {chans} for factors {tuple(factors)}")
        self.factors = tuple(factors)
        self.reassemble = nn.ModuleList(resample_conv(in_chans, c, f) for c, f in zip(chans, factors, strict=True))
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in chans)
        self.fusion = nn.ModuleList(_FusionBlock(features, first=i == 0) for i in range(len(factors)))
        self.head = nn.ModuleDict(
            {
                "conv1": nn.Conv2d(features, features // 2, 3, padding=1),
                "conv2": nn.Conv2d(features // 2, 32, 3, padding=1),
                "conv3": nn.Conv2d(32, out_chans, 1),
            }
        )
        self.out_chans, self.features, self.final_relu = out_chans, features, final_relu

    def reassembled(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The taps ``(B, in_chans, h, w)`` -> the pyramid ``(B, features, h * factor, w * factor)``, tap order."""
        if len(maps) != len(self.reassemble):
            raise ValueError(f"DPTHead was built for {len(self.reassemble)} taps, got {len(maps)} maps")
        return [rn(rs(m)) for m, rs, rn in zip(maps, self.reassemble, self.layer_rn, strict=True)]

    def forward(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``maps`` the taps, ``image_size`` ``(H, W)`` of the prediction -> (prediction, finest fused map)."""
        pyramid = self.reassembled(maps)
        order = sorted(range(len(pyramid)), key=lambda i: pyramid[i].shape[-1])  # coarse to fine
        x = pyramid[order[0]]
        for step, i in enumerate(order):
            nxt = pyramid[order[step + 1]].shape[-2:] if step + 1 < len(order) else (2 * x.shape[-2], 2 * x.shape[-1])
            x = self.fusion[step](x, None if step == 0 else pyramid[i], tuple(nxt))
        h = F.interpolate(self.head["conv1"](x), size=image_size, mode="bilinear", align_corners=True)
        out = self.head["conv3"](F.relu(self.head["conv2"](h)))
        return (F.relu(out) if self.final_relu else out), x


def scale_shift_invariant_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MiDaS's loss: mean |s * pred + t - target| over ``mask`` pixels, ``(s, t)`` least squares per image.

    ``pred``, ``target`` float and ``mask`` bool, all ``(B, H, W)``; an image with fewer than two valid pixels adds
    nothing, and a batch without any gives 0 (with a graph).
    """
    m = mask.to(pred.dtype)
    n = m.sum((1, 2)).clamp(min=1)
    p_mean, t_mean = (pred * m).sum((1, 2)) / n, (target * m).sum((1, 2)) / n
    pc, tc = (pred - p_mean[:, None, None]) * m, (target - t_mean[:, None, None]) * m
    scale = (pc * tc).sum((1, 2)) / (pc * pc).sum((1, 2)).clamp(min=1e-6)
    aligned = scale[:, None, None] * (pred - p_mean[:, None, None]) + t_mean[:, None, None]
    err = ((aligned - target).abs() * m).sum((1, 2))
    usable = m.sum((1, 2)) >= 2
    return (err * usable).sum() / (m.sum((1, 2)) * usable).sum().clamp(min=1)
