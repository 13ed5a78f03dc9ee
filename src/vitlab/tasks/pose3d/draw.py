"""Skeleton pictures for ``vitlab predict`` of the pose tasks: true and predicted stick figures over the views."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...data.synthetic.humans import PARENTS
from ...layers.camera import project

__all__ = ["PRED_COLOUR", "TRUE_COLOUR", "draw_skeletons", "project_skeletons", "skeleton_rows"]

TRUE_COLOUR = (60, 220, 90)
PRED_COLOUR = (255, 70, 70)


def project_skeletons(joints_cam: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame joints (..., 15, 3) and intrinsics (..., 3, 3) -> pixel coordinates (..., 15, 2); NaN behind the
    lens (``draw_skeletons`` skips such a skeleton)."""
    uv, in_front = project(joints_cam.float(), K.float()[..., None, :, :])
    return torch.where(in_front[..., None], uv, float("nan"))


def draw_skeletons(
    view: torch.Tensor, skeletons: list[tuple[torch.Tensor, tuple[int, int, int]]], scale: int = 4
) -> Image.Image:
    """A uint8 view (3, H, W) enlarged ``scale`` times with each ``(joints_2d (15, 2) pixels, colour)`` drawn as
    limbs and joint dots (pixel centres at +0.5, the camera module's convention)."""
    rgb = view.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    picture = Image.fromarray(rgb.repeat(scale, 0).repeat(scale, 1))
    pen = ImageDraw.Draw(picture)
    for joints, colour in skeletons:
        uv = joints.detach().cpu().float().numpy() * scale
        if not np.isfinite(uv).all():
            continue
        for j, parent in enumerate(PARENTS):
            if parent >= 0:
                pen.line([tuple(uv[parent]), tuple(uv[j])], fill=colour, width=max(1, scale // 2))
        for u, v in uv:
            pen.ellipse([u - 1, v - 1, u + 1, v + 1], fill=colour)
    return picture


def skeleton_rows(pictures: list[list[Image.Image]]) -> Image.Image:
    """Rows of equal-sized pictures pasted into one image (a row per scene, a column per view)."""
    w, h = pictures[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in pictures), h * len(pictures)))
    for i, row in enumerate(pictures):
        for j, tile in enumerate(row):
            sheet.paste(tile, (j * w, i * h))
    return sheet
