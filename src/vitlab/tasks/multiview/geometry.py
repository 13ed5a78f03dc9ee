"""Pointmap objectives and metrics shared by the multi-view task models (paper 37, DUSt3R -> VGGT).

All functions take pointmaps ``(B, V, H, W, 3)`` in one frame (view 1's camera frame, OpenCV convention of
:mod:`vitlab.layers.camera`) and a bool ``valid`` mask ``(B, V, H, W)``; per-sample results are ``(B,)``.

- :func:`normalise_pointmaps`: divide each sample by the mean distance of its valid points to the origin (both
  views together; DUSt3R's ``norm_mode='avg_dis'``).
- :func:`pointmap_loss`: DUSt3R's ``ConfLoss(Regr3D(L21))``: the Euclidean distance between the normalised
  prediction and ground truth, times the confidence, minus ``alpha * log(confidence)``; averaged over the valid
  pixels of each view (over the whole batch) and summed over the views. ``conf=None``: the plain distance.
- :func:`scale_invariant_error`: ``sum |s* P - G| / sum |G|`` over valid pixels, ``s*`` the least-squares scale.
- :func:`depth_errors`: AbsRel and delta < 1.25 after aligning the scale by the median ratio.
- :func:`umeyama`: the similarity (s, R, t) that best maps points ``src`` to ``dst`` (weighted Procrustes).
- :func:`rotation_angle_deg`: the angle of ``R_a^T R_b`` in degrees.
- :func:`track_ground_truth`: where query pixels of frame 1 land in every frame and whether they are seen there
  (VGGT's track targets from depth and cameras).
"""

from __future__ import annotations

import torch

from ...layers.camera import check_intrinsics, check_pose, invert_pose, project, transform_points, unproject

__all__ = [
    "depth_errors",
    "normalise_pointmaps",
    "pointmap_loss",
    "rotation_angle_deg",
    "scale_invariant_error",
    "track_ground_truth",
    "umeyama",
]

_EPS = 1e-8


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def normalise_pointmaps(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``points (B, V, H, W, 3)`` divided per sample by the mean norm of its valid points (all views together)."""
    w = valid.to(points.dtype)
    mean_dist = (points.norm(dim=-1) * w).sum(_dims(w)) / w.sum(_dims(w)).clamp_min(1)
    return points / mean_dist.clamp_min(_EPS).view(-1, *([1] * (points.ndim - 1)))


def pointmap_loss(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, conf: torch.Tensor | None = None, alpha: float = 0.2
) -> torch.Tensor:
    """The (confidence-weighted) normalised regression loss (module docstring); invariant to the scale of ``gt``."""
    err = (normalise_pointmaps(pred, valid) - normalise_pointmaps(gt, valid)).norm(dim=-1)  # (B, V, H, W)
    per_pixel = err if conf is None else err * conf - alpha * conf.log()
    w = valid.to(err.dtype)
    per_view = (per_pixel * w).sum((0, 2, 3)) / w.sum((0, 2, 3)).clamp_min(1)
    return per_view.sum()


def scale_invariant_error(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per sample ``sum |s* pred - gt| / sum |gt|`` over valid pixels, ``s* = argmin_s sum |s pred - gt|^2``.

    Invariant to the scale of ``pred`` (and, being relative, to a common scale of both).
    """
    w = valid.to(pred.dtype)
    dims = _dims(w)
    scale = ((pred * gt).sum(-1) * w).sum(dims) / ((pred * pred).sum(-1) * w).sum(dims).clamp_min(_EPS)
    scaled = pred * scale.view(-1, *([1] * (pred.ndim - 1)))
    return ((scaled - gt).norm(dim=-1) * w).sum(dims) / (gt.norm(dim=-1) * w).sum(dims).clamp_min(_EPS)


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample AbsRel and fraction with ``max(d/g, g/d) < 1.25`` of depths ``(B, ...)`` on valid pixels.

    The prediction is scaled by ``median(gt) / median(pred)`` first (over the sample's valid pixels), so both are
    invariant to the prediction's scale; non-positive predicted depths count as ``1e-6``. Samples without a valid
    pixel give 0.
    """
    absrel, delta = [], []
    for p, g, m in zip(pred.flatten(1), gt.flatten(1), valid.flatten(1), strict=True):
        if not bool(m.any()):
            absrel.append(pred.new_zeros(())), delta.append(pred.new_zeros(()))
            continue
        p, g = p[m].clamp_min(1e-6), g[m]
        p = p * (g.median() / p.median())
        absrel.append(((p - g).abs() / g).mean())
        delta.append((torch.maximum(p / g, g / p) < 1.25).to(pred.dtype).mean())
    return torch.stack(absrel), torch.stack(delta)


def umeyama(
    src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale ``(B,)``, rotation ``(B, 3, 3)`` and translation ``(B, 3)`` minimising ``sum w |s R src + t - dst|^2``.

    ``src``, ``dst`` ``(B, N, 3)``; ``weights`` ``(B, N)`` (default all 1). Umeyama's closed form, in float64, with
    the reflection fix (det R = +1).
    """
    src, dst = src.double(), dst.double()
    w = torch.ones(src.shape[:2], dtype=src.dtype, device=src.device) if weights is None else weights.double()
    total = w.sum(1, keepdim=True).clamp_min(_EPS)
    mu_s = (w[..., None] * src).sum(1) / total
    mu_d = (w[..., None] * dst).sum(1) / total
    cs, cd = src - mu_s[:, None], dst - mu_d[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", w, cd, cs) / total[..., None]
    U, S, Vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    D = torch.ones_like(S)
    D[:, 2] = torch.where(sign == 0, torch.ones_like(sign), sign)
    R = U @ torch.diag_embed(D) @ Vh
    var_s = (w * (cs * cs).sum(-1)).sum(1) / total[:, 0]
    scale = (S * D).sum(1) / var_s.clamp_min(_EPS)
    t = mu_d - scale[:, None] * (R @ mu_s[..., None]).squeeze(-1)
    return scale, R, t


def rotation_angle_deg(Ra: torch.Tensor, Rb: torch.Tensor) -> torch.Tensor:
    """The angle (degrees) of the rotation between ``Ra`` and ``Rb`` ``(..., 3, 3)``."""
    rel = Ra.double().transpose(-1, -2) @ Rb.double()
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = rel - rel.transpose(-1, -2)  # 2 sin(angle) [axis]_x: atan2 stays accurate near 0 where arccos does not
    sin = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], -1).norm(dim=-1) / 2
    return torch.rad2deg(torch.atan2(sin, cos))


def track_ground_truth(
    queries: torch.Tensor,
    depth: torch.Tensor,
    valid: torch.Tensor,
    K: torch.Tensor,
    cam_to_world: torch.Tensor,
    tol: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground-truth tracks of query pixels of frame 1 through ``V`` pinhole frames.

    ``queries`` ``(Q, 2)`` or ``(B, Q, 2)`` pixel coordinates (u, v) in frame 1; ``depth`` z-depth and ``valid``
    ``(B, V, H, W)``; ``K`` ``(B, V, 3, 3)``; ``cam_to_world`` ``(B, V, 4, 4)``. Each query is unprojected with frame
    1's depth at its pixel, moved into every frame's camera and projected (:mod:`vitlab.layers.camera`). Returns the
    tracks ``(B, V, Q, 2)``, ``visible`` ``(B, V, Q)``: the query has a valid depth, lands in front of the camera and
    inside the image, on a valid pixel whose depth (nearest pixel) is within ``tol`` (relative) of the point's own
    z (otherwise something occludes it), and ``query_valid`` ``(B, Q)`` (frame 1 has a depth there).
    """
    B, V, H, W = depth.shape
    if (
        tuple(valid.shape) != (B, V, H, W)
        or tuple(K.shape) != (B, V, 3, 3)
        or tuple(cam_to_world.shape) != (B, V, 4, 4)
    ):
        raise ValueError(
            f"track_ground_truth needs valid {(B, V, H, W)}, K {(B, V, 3, 3)}, cam_to_world {(B, V, 4, 4)} for depth "
            f"{(B, V, H, W)}; got {tuple(valid.shape)}, {tuple(K.shape)}, {tuple(cam_to_world.shape)}"
        )
    check_intrinsics(K, "K")
    check_pose(cam_to_world, "cam_to_world")
    if queries.ndim not in (2, 3) or queries.shape[-1] != 2:
        raise ValueError(f"queries must be (Q, 2) or (B, Q, 2) pixel coordinates, got {tuple(queries.shape)}")
    q = queries.to(depth.dtype).expand(B, -1, -1)
    col, row = q[..., 0].floor().long(), q[..., 1].floor().long()
    if bool(((col < 0) | (col >= W) | (row < 0) | (row >= H)).any()):
        raise ValueError(f"queries must lie inside the {W} x {H} frame (pixel coordinates u, v), got {queries}")
    b = torch.arange(B, device=depth.device)[:, None]
    d1, ok1 = depth[b, 0, row, col], valid[b, 0, row, col]  # (B, Q)
    points, _ = unproject(q, K[:, :1], None, None, torch.where(ok1, d1, torch.ones_like(d1)))  # frame 1's camera
    to_frame = invert_pose(cam_to_world) @ cam_to_world[:, :1]  # camera 1 -> camera v (B, V, 4, 4)
    local = transform_points(to_frame[:, :, None], points[:, None])  # (B, V, Q, 3)
    uv, front = project(local, K[:, :, None])
    z = local[..., 2]
    inside = front & (z > 1e-6) & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    c = uv[..., 0].floor().long().clamp(0, W - 1)
    r = uv[..., 1].floor().long().clamp(0, H - 1)
    bv = (torch.arange(B, device=depth.device)[:, None, None], torch.arange(V, device=depth.device)[None, :, None])
    dv, okv = depth[bv[0], bv[1], r, c], valid[bv[0], bv[1], r, c]
    visible = inside & okv & ok1[:, None] & ((z - dv).abs() <= tol * dv)
    return uv, visible, ok1
