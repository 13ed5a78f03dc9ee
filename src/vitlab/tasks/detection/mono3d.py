"""Monocular 3-D detection helpers: LID depth bins, geometric depth, heading bins, 3-D losses and centre-distance AP.

- **LID** (linear-increasing discretisation; Tang et al. arXiv:2005.13423, as MonoDETR, Zhang et al.
  arXiv:2203.13310, github.com/ZrrSkywalker/MonoDETR, uses it for its depth map): bin ``i`` spans
  ``[d_min + s i (i + 1) / 2, d_min + s (i + 1) (i + 2) / 2)`` with ``s = 2 (d_max - d_min) / (N (N + 1))``, so
  bins widen linearly with depth; depths outside ``[d_min, d_max)`` fall into one extra bin ``N``. Deviation: a bin's
  value is the midpoint of its edges (MonoDETR's ``bin_value`` formula gives the lower edge); the extra bin's is
  ``d_max``, as there.
- **Geometric depth** (MonoDETR / MonoDINO-DETR): ``z = f_y * H_3d / h_2d`` for an upright object of height ``H_3d``
  whose 2-D box is ``h_2d`` pixels tall (exact for a billboard facing the camera).
- **Heading**: MonoDETR's 12 bins + residual of the observation angle ``alpha = yaw - atan2(x, z)``; yaw comes back
  from the projected centre column: ``yaw = alpha + atan2(u - c_x, f_x)`` (KITTI's convention, ours too).
- **Losses**: the Laplacian aleatoric-uncertainty depth loss ``sqrt(2) exp(-s / 2) |z - z*| + s / 2`` with
  ``s = log sigma^2``; a focal loss on LID bins of a dense depth map, over valid pixels (depth > 0) only.
- **Centre-distance AP** (nuScenes, Caesar et al. arXiv:1903.11027): per class, predictions by descending score each
  take the nearest unmatched ground-truth object of their class if its bird's-eye (x, z) distance is within the
  threshold; AP is the area under the (monotone) precision-recall curve, averaged over classes with ground truth.
  Deviation: all-point interpolated AP without nuScenes' 10 % recall / precision clipping. Greedy matching only
  interacts within an image, so ``Mono3DMetrics`` (``metrics3d.py``, which imports torchmetrics) does it per image at
  ``update`` and syncs over ranks by concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "alpha_to_yaw",
    "average_precision",
    "center_distance_matches",
    "check_intrinsics",
    "geometric_depth",
    "heading_decode",
    "heading_encode",
    "laplacian_depth_loss",
    "lid_bins",
    "lid_focal_loss",
    "lid_index",
    "toy_scenes",
    "yaw_to_alpha",
]


def lid_bins(num_bins: int, d_min: float, d_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LID ``(edges (N + 1,), values (N + 1,))``: the N bins' edges, then each bin's depth and ``d_max`` for bin N."""
    if not isinstance(num_bins, int) or num_bins < 1 or not 0 <= d_min < d_max:
        raise ValueError(f"LID needs num_bins >= 1 and 0 <= d_min < d_max, got {num_bins}, {d_min}, {d_max}")
    step = 2 * (d_max - d_min) / (num_bins * (num_bins + 1))
    i = torch.arange(num_bins + 1, dtype=torch.float64)
    edges = d_min + step * i * (i + 1) / 2
    values = torch.cat([(edges[:-1] + edges[1:]) / 2, edges.new_tensor([d_max])])
    return edges.float(), values.float()


def lid_index(depth: torch.Tensor, num_bins: int, d_min: float, d_max: float) -> torch.Tensor:
    """The LID bin (int64, same shape) of each depth; N outside ``[d_min, d_max)``, -1 where depth <= 0 (no depth)."""
    step = 2 * (d_max - d_min) / (num_bins * (num_bins + 1))
    d = depth.double()
    index = (-0.5 + 0.5 * torch.sqrt((1 + 8 * (d - d_min) / step).clamp(min=0))).floor()
    index = torch.where((d < d_min) | (d >= d_max) | ~torch.isfinite(d), num_bins, index).long().clamp(max=num_bins)
    return torch.where(depth > 0, index, -1)


def geometric_depth(height_3d: torch.Tensor, box_height_px: torch.Tensor, fy: torch.Tensor | float) -> torch.Tensor:
    """``f_y H_3d / h_2d``: depth from the object's 3-D height and its 2-D box height (pixels, at least 1)."""
    return fy * height_3d / box_height_px.clamp(min=1.0)


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.atan2(angle.sin(), angle.cos())


def yaw_to_alpha(yaw: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Observation angle (what the object looks like) of a yaw at camera-frame position ``(x, z)``."""
    return _wrap(yaw - torch.atan2(x, z))


def alpha_to_yaw(alpha: torch.Tensor, u: torch.Tensor, cx: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """Yaw of an observation angle seen at pixel column ``u`` (the ray's angle is ``atan2(u - c_x, f_x)``)."""
    return _wrap(alpha + torch.atan2(u - cx, fx))


def heading_encode(angle: torch.Tensor, num_bins: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle -> (bin int64, residual to the bin's centre); bin k is centred on ``2 pi k / num_bins``."""
    width = 2 * math.pi / num_bins
    shifted = torch.remainder(angle + width / 2, 2 * math.pi)
    index = (shifted / width).floor().long().clamp(max=num_bins - 1)
    return index, shifted - width / 2 - index * width


def heading_decode(logits: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """Bin logits and residuals ``(..., num_bins)`` -> the angle of the best bin, wrapped to (-pi, pi]."""
    index = logits.argmax(-1, keepdim=True)
    width = 2 * math.pi / logits.shape[-1]
    return _wrap(index.squeeze(-1) * width + residuals.gather(-1, index).squeeze(-1))


def laplacian_depth_loss(depth: torch.Tensor, log_variance: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-object Laplacian negative log-likelihood (up to a constant) of ``target`` under ``(depth, log sigma^2)``."""
    return math.sqrt(2) * torch.exp(-0.5 * log_variance) * (depth - target).abs() + 0.5 * log_variance


def lid_focal_loss(
    logits: torch.Tensor, depth: torch.Tensor, num_bins: int, d_min: float, d_max: float, gamma: float = 2.0,
    alpha: float = 0.25,
) -> torch.Tensor:  # fmt: skip
    """Mean focal loss of ``logits`` ``(B, N + 1, h, w)`` against the LID bins of ``depth`` ``(B, H, W)``.

    The depth is read at the centre of each of the ``h x w`` cells; pixels without depth (<= 0) add nothing, and a
    batch without any gives 0 (with a graph).
    """
    h, w = logits.shape[-2:]
    H, W = depth.shape[-2:]
    rows = ((torch.arange(h, device=depth.device) + 0.5) * H / h).long().clamp(max=H - 1)
    cols = ((torch.arange(w, device=depth.device) + 0.5) * W / w).long().clamp(max=W - 1)
    target = lid_index(depth[:, rows][:, :, cols], num_bins, d_min, d_max)
    valid = target >= 0
    logp = F.log_softmax(logits.float(), 1).gather(1, target.clamp(min=0)[:, None])[:, 0]
    focal = -alpha * (1 - logp.exp()) ** gamma * logp
    return (focal * valid).sum() / valid.sum().clamp(min=1)


def center_distance_matches(
    pred_centers: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, gt_centers: torch.Tensor,
    gt_labels: torch.Tensor, thresholds: Sequence[float],
) -> torch.Tensor:  # fmt: skip
    """One image's greedy matching: ``(P, T)`` bool, prediction p is a true positive at threshold t (metres).

    Predictions by descending score take the nearest unmatched ground truth of their label by bird's-eye (x, z)
    distance; a match farther than the threshold makes a false positive (nuScenes' rule).
    """
    P, T = len(scores), len(thresholds)
    tp = torch.zeros(P, T, dtype=torch.bool)
    if P == 0 or len(gt_labels) == 0:
        return tp
    dist = torch.cdist(pred_centers[:, [0, 2]].double().cpu(), gt_centers[:, [0, 2]].double().cpu())
    same = labels.cpu()[:, None] == gt_labels.cpu()[None]
    order = scores.cpu().argsort(descending=True, stable=True)
    for t, threshold in enumerate(thresholds):
        taken = torch.zeros(len(gt_labels), dtype=torch.bool)
        for p in order.tolist():
            d = torch.where(same[p] & ~taken, dist[p], math.inf)
            j = int(d.argmin())
            if float(d[j]) <= threshold:
                tp[p, t] = taken[j] = True
    return tp


def average_precision(scores: torch.Tensor, tp: torch.Tensor, num_gt: int) -> float:
    """All-point interpolated AP (0..1) of detections (``scores``, true-positive flags ``tp``) over ``num_gt``."""
    if num_gt <= 0:
        raise ValueError("average precision needs at least one ground-truth object")
    hits = tp[scores.argsort(descending=True, stable=True)].double()
    if len(hits) == 0:
        return 0.0
    recall = hits.cumsum(0) / num_gt
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * envelope).sum())


def check_intrinsics(batch: Mapping[str, Any], batch_size: int) -> torch.Tensor:
    """``batch["intrinsics"]``, checked: float (B, 3, 3), finite, positive focal lengths, invertible."""
    K = batch.get("intrinsics")
    if not torch.is_tensor(K):
        raise ValueError(
            "batch has no 'intrinsics': a monocular 3-D detector needs each image's camera, float (B, 3, 3)"
        )
    if K.shape != (batch_size, 3, 3) or not K.is_floating_point():
        raise ValueError(f"batch['intrinsics'] must be float ({batch_size}, 3, 3), got {K.dtype} {tuple(K.shape)}")
    bad = ~torch.isfinite(K).all((1, 2)) | (K[:, 0, 0] <= 0) | (K[:, 1, 1] <= 0) | (torch.linalg.det(K).abs() < 1e-9)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"batch['intrinsics'][{b}] is singular or has a non-positive focal length: {K[b].tolist()}")
    return K


def toy_scenes(
    batch_size: int, size: int, in_chans: int, num_classes: int, max_objects: int, g: torch.Generator
) -> dict[str, Any]:
    """A tiny deterministic 3-D batch (task example batches): 1-3 boards standing on the ground (y = 1.3 m below the
    camera) per image, the last image empty; keys as FMNIST-Scenes-3D's (image, depth, intrinsics, boxes, labels,
    boxes3d, centers2d). Depth is the board's z on its 2-D box (painter's order) and the ground's below the horizon."""

    S, C, cam_h = size, in_chans, 1.3
    K = torch.tensor([[float(S), 0, S / 2], [0, float(S), 0.3 * S], [0, 0, 1]])
    rows = torch.arange(S, dtype=torch.float32)[:, None] + 0.5
    ground = torch.where(rows > K[1, 2], K[1, 1] * cam_h / (rows - K[1, 2]).clamp(min=1e-3), torch.zeros(()))
    ground = torch.where(ground <= 100, ground, torch.zeros(())).expand(S, S)
    palette = torch.randn(num_classes + 1, C, 1, 1, generator=g)
    batch: dict[str, Any] = {k: [] for k in ("boxes", "labels", "boxes3d", "centers2d")}
    images, depths = [], []
    for b in range(batch_size):
        image, depth = palette[-1].expand(C, S, S).clone(), ground.clone()
        n = 0 if batch_size > 1 and b == batch_size - 1 else int(torch.randint(1, 4, (1,), generator=g))
        n = min(n, max_objects)
        r = torch.rand(n, 5, generator=g)
        z, h, yaw = 4 + 8 * r[:, 0], 0.8 + r[:, 1], (r[:, 2] - 0.5)
        u, w = S * (0.25 + 0.5 * r[:, 3]), h * (0.5 + 0.3 * r[:, 4])
        centre = torch.stack([(u - K[0, 2]) * z / K[0, 0], cam_h - h / 2, z], -1)
        order = z.argsort(descending=True)  # painter's order: far first
        boxes = torch.zeros(n, 4)
        for i in order.tolist():  # the billboard's four corners, projected
            sx = torch.tensor([-0.5, 0.5, -0.5, 0.5]) * w[i]
            sy = torch.tensor([-0.5, -0.5, 0.5, 0.5]) * h[i]
            pts = centre[i] + torch.stack([sx * yaw[i].cos(), sy, -sx * yaw[i].sin()], -1)
            uv = (pts @ K.T)[:, :2] / pts[:, 2:]
            boxes[i] = torch.cat([uv.min(0).values, uv.max(0).values]).clamp(0, S)
            x1, y1, x2, y2 = (round(float(c)) for c in boxes[i])
            image[:, y1:y2, x1:x2] = palette[i % num_classes]
            depth[y1:y2, x1:x2] = z[i]
        labels = torch.arange(n) % num_classes
        batch["boxes"].append(boxes)
        batch["labels"].append(labels)
        batch["boxes3d"].append(torch.cat([centre, w[:, None], h[:, None], torch.full((n, 1), 0.1), yaw[:, None]], -1))
        batch["centers2d"].append((centre @ K.T)[:, :2] / centre[:, 2:])
        images.append(image + 0.1 * torch.randn(image.shape, generator=g))
        depths.append(depth)
    return {
        "image": torch.stack(images),
        "depth": torch.stack(depths),
        "intrinsics": K.expand(batch_size, 3, 3).clone(),
        **batch,
    }
