"""Prediction heads shared by the multi-view task models (paper 37, the review "DUSt3R -> VGGT").

- :class:`DenseHead`: token maps -> a dense ``(B, H, W, C)`` prediction. ``"linear"``: DUSt3R's linear head, every
  token of the last tapped layer -> ``patch x patch x C`` values (pixel shuffle). ``"dpt"``: DUSt3R's and VGGT's DPT
  head (:class:`vitlab.layers.dpt.DPTHead`, reused) on several tapped layers of the decoder, signed output. At toy
  scale the taps are resampled by ``dpt_factors`` (2 for the shallowest tap, 0.5 for the deepest when there are
  three or more, 1 between; DPT's own 4, 2, 1, 0.5 would fuse at twice the image size for patch-4 tokens).
- :class:`CameraHead`: VGGT's camera head (Sec. 3.3 of the VGGT paper): a first estimate of the 9-D pose encoding
  from the camera token, then ``iters - 1`` refinements. Each refinement embeds the current estimate (detached),
  modulates the normalised camera tokens with it (shift and scale, adaLN-style), runs a small trunk (one
  transformer block over the frames' camera tokens) and adds a predicted delta. The delta's last layer starts at
  zero, so at initialisation every iteration returns the first estimate. Reconstructed; VGGT's trunk is deeper.
- :class:`TrackHead`: VGGT's tracking head, simplified: a dense feature head per frame, the feature of each query
  pixel of frame 1 (bilinear sample), its cosine correlation with every frame's feature map (learned temperature),
  :func:`soft_argmax` for the track, and a visibility logit from the query feature, the feature found at the
  tracked point and the correlation peak. No iterative refinement (VGGT's CoTracker-style tracker has one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from ...layers.camera import pixel_grid
from ...layers.dpt import DPTHead

__all__ = ["HEADS", "CameraHead", "DenseHead", "TrackHead", "dpt_factors", "query_grid", "soft_argmax"]

HEADS = ("linear", "dpt")


def dpt_factors(taps: int) -> tuple[float, ...]:
    """DPT resampling factors for ``taps`` tapped layers, shallowest first (module docstring)."""
    if taps < 1:
        raise ValueError(f"a DPT head needs at least one tapped layer, got {taps}")
    if taps == 1:
        return (2.0,)
    return (2.0, *([1.0] * (taps - 2)), 0.5 if taps >= 3 else 1.0)


class DenseHead(nn.Module):
    """Tapped token layers ``[(B, N, in_chans)]`` (a square grid of ``side**2`` tokens) -> ``(B, H, W, out_chans)``.

    Args:
        kind: "linear" (the last tap only) or "dpt" (every tap, :class:`~vitlab.layers.dpt.DPTHead`).
        in_chans, out_chans: token width and output channels.
        patch: pixels per token side; taps: how many layers the forward gets; features: DPT's fusion width.
    """

    def __init__(self, kind: str, in_chans: int, out_chans: int, patch: int, taps: int, features: int = 32) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
        self.kind, self.patch, self.taps, self.out_chans = kind, patch, taps, out_chans
        if kind == "linear":
            self.proj = nn.Linear(in_chans, patch * patch * out_chans)
        else:
            self.dpt = DPTHead(in_chans, dpt_factors(taps), features=features, out_chans=out_chans, final_relu=False)

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(taps) != self.taps:
            raise ValueError(f"this head was built for {self.taps} tapped layers, got {len(taps)}")
        B, N, _ = taps[-1].shape
        side, p = math.isqrt(N), self.patch
        if self.kind == "linear":
            x = self.proj(taps[-1]).view(B, side, side, p, p, self.out_chans).permute(0, 1, 3, 2, 4, 5)
            return x.reshape(B, side * p, side * p, self.out_chans)
        maps = [t.transpose(1, 2).reshape(B, t.shape[-1], side, side) for t in taps]
        out, _ = self.dpt(maps, (side * p, side * p))
        return out.permute(0, 2, 3, 1)


class CameraHead(nn.Module):
    """Camera tokens ``(B, V, dim)`` -> the pose encoding after each of ``iters`` iterations ``(B, iters, V, 9)``."""

    def __init__(self, dim: int, iters: int = 1, heads: int = 2) -> None:
        super().__init__()
        if iters < 1:
            raise ValueError(f"camera_iters must be >= 1, got {iters}")
        self.iters = iters
        self.first = nn.Sequential(nn.LayerNorm(dim), Mlp(dim, 2 * dim, 9))
        if iters > 1:
            self.embed = nn.Sequential(nn.Linear(9, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
            self.norm = nn.LayerNorm(dim, elementwise_affine=False)
            self.trunk = Block(dim, heads, mlp_ratio=2.0)
            self.delta = nn.Sequential(nn.LayerNorm(dim), Mlp(dim, 2 * dim, 9))
            nn.init.zeros_(self.delta[1].fc2.weight)  # refinements start as the identity
            nn.init.zeros_(self.delta[1].fc2.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pose = self.first(tokens)
        out = [pose]
        for _ in range(self.iters - 1):
            # the estimate conditions the trunk but is detached there (the loss reaches it through the sum)
            shift, scale = self.embed(pose.detach()).chunk(2, -1)
            h = self.trunk(self.norm(tokens) * (1 + scale) + shift)
            pose = pose + self.delta(h)
            out.append(pose)
        return torch.stack(out, 1)


def query_grid(count: int, size: int) -> torch.Tensor:
    """``count`` (a square) query pixels of a ``size`` x ``size`` frame on a regular grid: centres ``(count, 2)``."""
    k = math.isqrt(count)
    if count < 1 or k * k != count or k > size:
        raise ValueError(f"track_queries must be a square number of at most {size}**2 (a k x k grid), got {count}")
    idx = ((torch.arange(k) + 0.5) * size / k).floor()
    v, u = torch.meshgrid(idx, idx, indexing="ij")
    return torch.stack([u, v], -1).reshape(-1, 2) + 0.5


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Expected pixel centre ``(..., 2)`` (u, v) under ``softmax`` of ``logits`` ``(..., H, W)``."""
    H, W = logits.shape[-2:]
    prob = logits.flatten(-2).softmax(-1)
    grid = pixel_grid(H, W, logits.dtype, logits.device).reshape(H * W, 2)
    return prob @ grid


def sample_at(maps: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(N, Q, C)`` of maps ``(N, C, H, W)`` at pixel coordinates ``uv`` ``(N, Q, 2)``."""
    H, W = maps.shape[-2:]
    size = torch.tensor([W, H], dtype=uv.dtype, device=uv.device)
    grid = (uv / size * 2 - 1)[:, :, None]  # pixel centre convention = align_corners=False
    return F.grid_sample(maps, grid, align_corners=False, padding_mode="border")[..., 0].transpose(1, 2)


class TrackHead(nn.Module):
    """Dense features ``(B, V, H, W, C)`` and query pixels of frame 1 ``(Q, 2)`` -> tracks ``(B, V, Q, 2)`` (pixel
    coordinates in each frame) and visibility logits ``(B, V, Q)`` (module docstring)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))  # cosine -> logits
        self.vis = Mlp(channels + 1, 2 * channels, 1)

    def forward(self, feats: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, V, C = feats.shape[0], feats.shape[1], feats.shape[-1]
        maps = F.normalize(feats, dim=-1).permute(0, 1, 4, 2, 3)  # (B, V, C, H, W)
        q = sample_at(maps[:, 0], queries.expand(B, -1, -1))  # (B, Q, C)
        logits = torch.einsum("bqc,bvchw->bvqhw", q, maps) * self.log_temperature.exp()
        track = soft_argmax(logits)  # (B, V, Q, 2)
        found = sample_at(maps.flatten(0, 1), track.flatten(0, 1)).view(B, V, -1, C)
        peak = logits.flatten(-2).amax(-1, keepdim=True) / self.log_temperature.exp()
        vis = self.vis(torch.cat([q[:, None] * found, peak], -1))[..., 0]
        return track, vis
