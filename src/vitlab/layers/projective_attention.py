"""Projective attention (MvP): deformable sampling around each query's 3-D point projected into every camera view.

Paper: "Direct Multi-view Multi-person 3D Pose Estimation", Wang et al., NeurIPS 2021, arXiv:2111.04076 (Sec. 3.2,
"projective attention"); official code https://github.com/sail-sg/mvp (``ops/modules/projattn.py``), read, not copied.
A query carries a 3-D reference point (its current joint estimate, world frame). The point is projected into each
view with that view's camera (:mod:`.camera`, OpenCV convention); around the projection the query samples
``num_points`` bilinear points per head on the view's feature map, at offsets (in feature-map pixels) and with
softmax weights predicted from the query, exactly the sampling of Deformable DETR
(:func:`.deform_attn.multi_scale_deformable_attention`, with the views folded into the batch). Views in which the
point lies behind the camera or outside the image are masked out. The per-view results are fused by
concatenation over views and a linear layer (``fusion="concat"``, the paper; needs a fixed ``num_views``) or by the
mean over the views that see the point (``fusion="mean"``, an option: order-free, any number of views).
``coords=True`` (with "concat"; an option of the official code, its ``cat_catcoord_catref_proj`` fusion) also
concatenates every view's normalised projected location and the query's 3-D point before the linear layer, so the
query learns where it currently is and the refinement can regress a correction relative to it.

The offsets and weights of view ``v`` are predicted from the query plus the view's (unprojected) feature at the
projected point (``view_conditioned=True``, as the official code, so each view samples where its own image suggests;
False: from the query alone, the same for every view). Both keep ``fusion="mean"`` invariant to the order of views.

Several feature levels (``levels > 1``; the paper's Eq. 4 samples the multi-scale maps of each view, as
Deformable DETR): ``value`` is then a list of ``levels`` per-view maps ``(B, V, dim, h_l, w_l)`` of any
resolutions; every head predicts ``num_points`` offsets (in pixels of that level) and weights per level, the
weights softmax-normalised jointly over levels and points. The view conditioning reads the first level.
``levels=1`` takes one map (a tensor, or a list of one) and is the single-level attention unchanged.

Deviations: a point outside every view gets zeros before the output projection; the official code clamps the
sampling grid to [-1.1, 1.1], here outside samples read zeros.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .camera import CameraError, check_intrinsics, check_pose, invert_pose, project, transform_points
from .deform_attn import deformable_init_, multi_scale_deformable_attention
from .tracing import is_fx_tracing

__all__ = ["FUSIONS", "ProjectiveAttention", "check_view_cameras", "project_to_views"]

FUSIONS = ("concat", "mean")


def check_view_cameras(K: torch.Tensor, cam_to_world: torch.Tensor, batch: int, views: int) -> None:
    """Raise :class:`CameraError` unless ``K`` is ``(batch, views, 3, 3)`` usable intrinsics and ``cam_to_world``
    ``(batch, views, 4, 4)`` rigid poses (a singular K, a non-rotation or a view count that disagrees)."""
    for name, value, tail in (("K", K, (3, 3)), ("cam_to_world", cam_to_world, (4, 4))):
        if not torch.is_tensor(value) or tuple(value.shape) != (batch, views, *tail):
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise CameraError(f"{name} must be {(batch, views, *tail)}: one per view of {views} views; got {got}")
    if torch.compiler.is_compiling() or is_fx_tracing():
        return  # the value checks branch on data; export and compile see the shapes only
    check_intrinsics(K, "K")
    check_pose(cam_to_world, "cam_to_world")


def project_to_views(
    points: torch.Tensor, K: torch.Tensor, cam_to_world: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``(B, Q, 3)`` into ``V`` pinhole views: normalised ``(x, y)`` ``(B, Q, V, 2)`` and visibility.

    ``K`` ``(B, V, 3, 3)`` and ``cam_to_world`` ``(B, V, 4, 4)`` are of images ``image_size = (H, W)``; the
    location is the pixel ``(u, v)`` divided by ``(W, H)`` (0 and 1 are the outer image edges, the convention of
    :func:`.deform_attn.multi_scale_deformable_attention`). Visible ``(B, Q, V)``: in front of the camera and inside
    the image.
    """
    H, W = image_size
    cam = transform_points(invert_pose(cam_to_world)[:, None], points[:, :, None])  # (B, Q, V, 3)
    uv, front = project(cam, K[:, None])
    loc = uv / uv.new_tensor([W, H])
    inside = ((loc >= 0) & (loc <= 1)).all(-1)
    return loc, front & (cam[..., 2] > 1e-6) & inside


class ProjectiveAttention(nn.Module):
    """Queries ``(B, Q, dim)`` with 3-D reference points read ``V`` views' feature maps ``(B, V, dim, h, w)`` (or a
    list of ``levels`` such maps of different resolutions).

    Args:
        num_heads, num_points: attention heads and sampled points per head, level and view.
        fusion: "concat" (concatenate the views, then a linear layer; the paper) or "mean" (order-free).
        num_views: the views "concat" fuses (required for it; ignored by "mean").
        view_conditioned: offsets and weights from the query plus the view's feature at the projection.
        levels: the feature levels per view (1: one map).
        coords: with "concat", the views' projected locations and the 3-D point join the fused features.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_points: int = 4,
        fusion: str = "concat",
        num_views: int | None = None,
        view_conditioned: bool = True,
        levels: int = 1,
        coords: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion == "concat" and (num_views is None or num_views < 1):
            raise ValueError(f"fusion='concat' needs num_views >= 1 (its linear layer is num_views * dim wide), "
                             f"got {num_views!r}")  # fmt: skip
        if coords and fusion != "concat":
            raise ValueError(f"coords=True needs fusion='concat' (the locations of fixed views), got {fusion!r}")
        if num_heads < 1 or dim % num_heads or num_points < 1 or levels < 1:
            raise ValueError(f"need num_heads dividing dim, num_points >= 1 and levels >= 1, got {num_heads}/{dim}, "
                             f"{num_points}, {levels}")  # fmt: skip
        self.dim, self.num_heads, self.num_points, self.levels, self.coords = dim, num_heads, num_points, levels, coords
        self.fusion, self.num_views, self.view_conditioned = fusion, num_views, view_conditioned
        self.sampling_offsets = nn.Linear(dim, num_heads * levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        fused = (dim + 2 * coords) * num_views + 3 * coords if fusion == "concat" else dim
        self.output_proj = nn.Linear(fused, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        deformable_init_(self, self.num_heads, self.levels, self.num_points)  # Deformable DETR's, every level

    def forward(
        self,
        query: torch.Tensor,
        points: torch.Tensor,
        value: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
        K: torch.Tensor,
        cam_to_world: torch.Tensor,
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """``query`` (B, Q, dim), world ``points`` (B, Q, 3), ``value`` maps (B, V, dim, h, w) (or a list of
        ``levels`` of them, any ``h_l, w_l``), cameras of the ``image_size`` images ``K`` (B, V, 3, 3),
        ``cam_to_world`` (B, V, 4, 4) -> (B, Q, dim)."""
        if query.ndim != 3 or query.shape[-1] != self.dim or points.shape != (*query.shape[:2], 3):
            raise ValueError(f"query must be (B, Q, {self.dim}) and points (B, Q, 3), got "
                             f"{tuple(query.shape)}, {tuple(points.shape)}")  # fmt: skip
        B, Q = query.shape[:2]
        maps = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(maps) != self.levels:
            raise ValueError(f"value must hold levels={self.levels} feature map(s) per view, got {len(maps)}")
        for i, m in enumerate(maps):
            if not torch.is_tensor(m) or m.ndim != 5 or m.shape[:3] != (B, maps[0].shape[1], self.dim):
                got = tuple(m.shape) if torch.is_tensor(m) else type(m).__name__
                raise ValueError(f"value level {i} must be (B={B}, V, {self.dim}, h, w) view maps (the same V at "
                                 f"every level), got {got}")  # fmt: skip
        V = maps[0].shape[1]
        if self.fusion == "concat" and self.num_views != V:
            raise CameraError(f"value holds {V} views but this projective attention fuses num_views={self.num_views}")
        check_view_cameras(K, cam_to_world, B, V)
        H, L, P, D = self.num_heads, self.levels, self.num_points, self.dim // self.num_heads
        shapes = [(int(m.shape[3]), int(m.shape[4])) for m in maps]
        loc, visible = project_to_views(points, K, cam_to_world, image_size)  # (B, Q, V, 2), (B, Q, V)
        # every level's tokens, flattened row-major and concatenated (multi_scale_deformable_attention's layout)
        v = self.value_proj(torch.cat([m.flatten(3) for m in maps], -1).transpose(-1, -2))  # (B, V, sum hw, dim)
        loc = loc.transpose(1, 2)  # (B, V, Q, 2)
        q = query[:, None].expand(B, V, Q, self.dim)
        if self.view_conditioned:  # + the view's feature (first level) at the projected point
            grid = (2 * loc - 1).reshape(B * V, Q, 1, 2).to(maps[0].dtype)
            at = F.grid_sample(maps[0].flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            q = q + at[..., 0].transpose(1, 2).reshape(B, V, Q, self.dim)
        # offsets are in pixels of their level: divide by each level's (w, h)
        scale = query.new_tensor([(w, h) for h, w in shapes])[:, None]  # (L, 1, 2)
        offsets = self.sampling_offsets(q).view(B * V, Q, H, L, P, 2) / scale
        weights = self.attention_weights(q).view(B * V, Q, H, L * P).softmax(-1).view(B * V, Q, H, L, P)
        # views join the batch: every (scene, view) is one "image" of L levels
        locations = loc.reshape(B * V, Q, 1, 1, 1, 2) + offsets
        out = multi_scale_deformable_attention(v.reshape(B * V, -1, H, D), shapes, locations, weights)
        out = out.view(B, V, Q, self.dim).transpose(1, 2) * visible[..., None].to(out.dtype)  # (B, Q, V, dim)
        if self.fusion == "concat":
            if self.coords:  # (x, y) in [0, 1] per view and the world point, the official code's catcoord_catref
                loc = loc.transpose(1, 2).to(out.dtype)
                return self.output_proj(torch.cat([torch.cat([out, loc], -1).flatten(2), points.to(out.dtype)], -1))
            return self.output_proj(out.flatten(2))
        count = visible.sum(-1, keepdim=True).clamp_min(1).to(out.dtype)
        return self.output_proj(out.sum(2) / count)
