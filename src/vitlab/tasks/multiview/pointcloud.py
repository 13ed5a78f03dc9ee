"""Point-cloud pictures for ``vitlab predict`` of the pointmap tasks (dust3r, vggt): the predicted and the true
pointmaps of every view, in view 1's camera frame, splatted with their pixels' colours from one oblique viewpoint.

The prediction is scale-free (DUSt3R / VGGT normalise their targets), so it is first brought to the truth's scale
by the least-squares factor the ``pointmap_err`` metric uses; both clouds are then drawn from the same orthographic
viewpoint (turned ``yaw`` about view 1's vertical axis and looking ``pitch`` down) framed on the true cloud, so the
two tiles compare point for point.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["cloud_frame", "pointcloud_tiles", "splat_points"]


def _oblique(yaw_deg: float, pitch_deg: float) -> torch.Tensor:
    """Rotation (3, 3) from view 1's OpenCV camera frame (x right, y down, z ahead) to the viewer's frame."""
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    turn = torch.tensor([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
    tilt = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(b), math.sin(b)], [0.0, -math.sin(b), math.cos(b)]])
    return tilt @ turn


def cloud_frame(points: torch.Tensor, yaw_deg: float = 30.0, pitch_deg: float = 55.0) -> tuple[torch.Tensor, ...]:
    """``(centre (3,), rotation (3, 3), half_extent ())`` framing ``points`` (N, 3): the median point at the tile's
    centre, its 2-98 % spread across the tile (robust to a few far points)."""
    if points.ndim != 2 or points.shape[-1] != 3 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (N, 3) tensor, got shape {tuple(points.shape)}")
    R = _oblique(yaw_deg, pitch_deg)
    centre = points.median(0).values
    uv = (points - centre) @ R.T
    lo, hi = torch.quantile(uv[:, :2], torch.tensor([0.02, 0.98]), dim=0)
    half = torch.maximum(hi.abs(), lo.abs()).max().clamp(min=1e-6) * 1.1
    return centre, R, half


def splat_points(
    points: torch.Tensor, colours: torch.Tensor, frame: tuple[torch.Tensor, ...], size: int, radius: int = 1
) -> np.ndarray:
    """Draw ``points`` (N, 3) with uint8 ``colours`` (N, 3) into a (size, size, 3) uint8 tile seen through ``frame``
    (:func:`cloud_frame`): orthographic, each point a (2 radius + 1)^2 square, the nearest point wins each pixel
    (a z-buffer), black where nothing lands."""
    if points.shape != colours.shape or points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points and colours must both be (N, 3), got {tuple(points.shape)}, {tuple(colours.shape)}")
    centre, R, half = frame
    view = (points.float() - centre) @ R.T
    pix = ((view[:, :2] / half + 1) * (size / 2)).floor().long()
    tile = torch.zeros(size * size, 3, dtype=torch.uint8)
    offsets = range(-radius, radius + 1)
    cols = torch.cat([pix[:, 0] + dx for dx in offsets for _ in offsets])
    rows = torch.cat([pix[:, 1] + dy for _ in offsets for dy in offsets])
    depth, rgb = view[:, 2].repeat(len(offsets) ** 2), colours.repeat(len(offsets) ** 2, 1)
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size) & torch.isfinite(depth)
    cell, depth, rgb = (rows * size + cols)[inside], depth[inside], rgb[inside]
    nearest = torch.full((size * size,), math.inf).scatter_reduce(0, cell, depth, "amin")
    wins = depth <= nearest[cell]
    tile[cell[wins]] = rgb[wins]
    return tile.view(size, size, 3).numpy()


def pointcloud_tiles(
    views: torch.Tensor, pred: torch.Tensor, true: torch.Tensor, valid: torch.Tensor, size: int
) -> list[np.ndarray]:
    """``[predicted cloud, true cloud]`` tiles of one scene: uint8 ``views`` (V, 3, H, W), pointmaps ``pred`` and
    ``true`` (V, H, W, 3) in the same (view 1's camera) frame, ``valid`` (V, H, W) the pixels with a true point."""
    if pred.shape != true.shape or pred.shape[:-1] != valid.shape or views.shape[0] != pred.shape[0]:
        raise ValueError(
            f"views {tuple(views.shape)}, pred {tuple(pred.shape)}, true {tuple(true.shape)} and valid "
            f"{tuple(valid.shape)} must describe the same views (V, H, W)"
        )
    p, g = pred.float()[valid], true.float()[valid]
    colours = views.permute(0, 2, 3, 1)[valid]
    if len(g) == 0:
        return [np.zeros((size, size, 3), np.uint8)] * 2
    p = p * (p * g).sum() / (p * p).sum().clamp(min=1e-12)  # the least-squares scale (the pointmap_err metric's)
    frame = cloud_frame(g)
    radius = size // 64  # a pixel per point at the views' own size
    return [splat_points(p, colours, frame, size, radius), splat_points(g, colours, frame, size, radius)]
