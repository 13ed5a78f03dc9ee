"""Multi-HMR's parts (paper 35, :mod:`.multihmr`): focal-normalised log-nearness, the CenterNet centre target and
focal loss, 3x3 max-pool NMS, greedy 2-D matching, the 2-D reprojection loss, the Human Prediction Head's block and
a facing (yaw) diagnostic for the evaluation (:func:`yaw_errors`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ...layers.camera import axis_angle_to_matrix

__all__ = [
    "MAX_DEPTH",
    "HPHBlock",
    "centre_focal_loss",
    "centre_target",
    "depth_to_nearness",
    "match_detections",
    "nearness_to_depth",
    "peak_nms",
    "person_errors",
    "project_people",
    "reprojection_loss",
    "yaw_errors",
]

MAX_DEPTH = 50.0
MIN_JOINT_Z = 0.1  # metres: a predicted joint at or behind the camera projects as if 10 cm in front of it


def depth_to_nearness(z: torch.Tensor, focal: torch.Tensor, f_ref: float) -> torch.Tensor:
    """Log-nearness normalised by focal length: ``log(f / (f_ref z))``."""
    return torch.log(focal / (f_ref * z.clamp_min(1e-6)))


def nearness_to_depth(n: torch.Tensor, focal: torch.Tensor, f_ref: float) -> torch.Tensor:
    """The inverse of :func:`depth_to_nearness`: ``z = f / f_ref exp(-n)``, clipped at 50 m."""
    return (focal / f_ref * torch.exp(-n)).clamp(max=MAX_DEPTH)


def project_people(
    joints_rel: torch.Tensor, depth: torch.Tensor, centre: torch.Tensor, K: torch.Tensor
) -> torch.Tensor:
    """Pixels of people's camera-frame joints: the root ``depth * K^-1 [centre, 1]`` plus the root-relative joints,
    projected with ``K``. ``joints_rel`` (B, Q, J, 3) m, ``depth`` (B, Q) m, ``centre`` (B, Q, 2) px, ``K`` (B, 3, 3)
    -> (B, Q, J, 2). Joint depths are clamped at :data:`MIN_JOINT_Z` so a bad guess gives a large, finite error."""
    uv1 = torch.cat([centre, torch.ones_like(centre[..., :1])], -1)
    root = (uv1 @ torch.linalg.inv(K).transpose(-1, -2)) * depth[..., None]  # (B, Q, 3)
    pts = root[:, :, None] + joints_rel
    pts = torch.cat([pts[..., :2], pts[..., 2:].clamp_min(MIN_JOINT_Z)], -1)
    pix = pts @ K[:, None].transpose(-1, -2)  # (B, Q, J, 3)
    return pix[..., :2] / pix[..., 2:]


def reprojection_loss(
    joints_rel: torch.Tensor,
    depth: torch.Tensor,
    centre: torch.Tensor,
    K: torch.Tensor,
    joints_2d: torch.Tensor,
    visible: torch.Tensor,
    img_size: float,
) -> torch.Tensor:
    """Multi-HMR's 2-D loss (§3.3: the projected body against the 2-D annotation): L1 between the projection of
    the predicted people (:func:`project_people`) and the true 2-D joints ``joints_2d`` (B, Q, J, 2) px, averaged
    over u, v and over the ``visible`` (B, Q, J) joints of the batch, divided by ``img_size`` (an error in image
    widths). Invisible joints (and their possibly non-finite targets) do not count; no visible joint gives 0."""
    uv = project_people(joints_rel, depth, centre, K)
    vis = visible.bool()
    target = torch.where(vis[..., None], joints_2d, uv.detach())  # NaN-safe: masked joints copy the prediction
    err = (uv - target).abs().mean(-1)
    return (err * vis).sum() / (vis.sum().clamp_min(1) * img_size)


def centre_target(centres: torch.Tensor, mask: torch.Tensor, side: int, stride: float, sigma: float) -> torch.Tensor:
    """CenterNet target ``(B, side, side)``: per cell the largest Gaussian (``sigma`` cells) of the people's centres,
    exactly 1 in the cell holding a centre; ``centres`` (B, P, 2) pixels, ``mask`` (B, P)."""
    c = centres / stride  # token units
    cell = c.floor().clamp(0, side - 1)
    grid = torch.arange(side, dtype=centres.dtype, device=centres.device) + 0.5
    d2 = (grid[None, None, None, :] - (cell[..., 0, None, None] + 0.5)) ** 2
    d2 = d2 + (grid[None, None, :, None] - (cell[..., 1, None, None] + 0.5)) ** 2
    g = torch.exp(-d2 / (2 * sigma**2)) * mask[..., None, None]
    return g.amax(1) if g.shape[1] else centres.new_zeros(centres.shape[0], side, side)


def centre_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's focal loss (sum over cells / number of peaks, at least 1); peaks are cells where target == 1."""
    pos = target >= 1.0
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    pos_term = -((1 - p) ** alpha) * log_p
    neg_term = -((1 - target) ** beta) * p**alpha * log_1mp
    total = torch.where(pos, pos_term, neg_term).sum()
    return total / pos.sum().clamp_min(1)


def peak_nms(scores: torch.Tensor, k: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3x3 max-pool NMS on ``scores`` (B, h, w) in [0, 1] -> the ``k`` best peaks: flat indices (B, k), their
    scores (B, k) and validity (score >= ``threshold`` and a local maximum) (B, k)."""
    peaks = scores * (F.max_pool2d(scores[:, None], 3, 1, 1)[:, 0] == scores)
    top, idx = peaks.flatten(1).topk(k, dim=1)
    return idx, top, top >= threshold


def match_detections(pred: torch.Tensor, valid: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, radius: float):
    """Greedy matching by 2-D distance, closest pairs first: ``pred`` (Q, 2), ``gt`` (P, 2) -> list of (q, p) pairs
    with distance <= ``radius``."""
    dist = torch.cdist(pred.float(), gt.float())
    dist = dist.masked_fill(~valid[:, None] | ~mask[None, :], float("inf"))
    pairs = []
    for _ in range(min(int(valid.sum()), int(mask.sum()))):
        flat = int(dist.argmin())
        q, p = divmod(flat, dist.shape[1])
        if not dist[q, p] <= radius:
            break
        pairs.append((q, p))
        dist[q, :], dist[:, p] = float("inf"), float("inf")
    return pairs


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.q, self.kv = heads, nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class HPHBlock(nn.Module):
    """Pre-norm block of the Human Prediction Head: self-attention among persons, cross-attention to tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.norm_ctx, self.cross_attn = nn.LayerNorm(dim), nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        Q = q.shape[1]
        # persons attend to the valid persons, always to themselves (no empty row)
        mask = valid[:, None, :] | torch.eye(Q, dtype=torch.bool, device=q.device)[None]
        y = self.norm1(q)
        q = q + self.self_attn(y, y, mask)
        q = q + self.cross_attn(self.norm2(q), self.norm_ctx(tokens))
        return q + self.mlp(self.norm3(q))


def person_errors(pred_rel: torch.Tensor, gt_rel: torch.Tensor, pred_root: torch.Tensor, gt_root: torch.Tensor):
    """One matched person's errors in mm: root-relative MPJPE, PA-MPJPE (joints after the similarity transform that
    best fits them to the truth, Umeyama), root depth |z| and root position (MRPE); joints (15, 3), roots (3,) in m."""
    from ..multiview.geometry import umeyama

    scale, R, t = umeyama(pred_rel[None], gt_rel[None])
    aligned = (scale[:, None, None] * pred_rel[None].double() @ R.transpose(-1, -2) + t[:, None])[0]
    return {
        "mpjpe": 1000 * float((pred_rel - gt_rel).norm(dim=-1).mean()),
        "pa_mpjpe": 1000 * float((aligned - gt_rel.double()).norm(dim=-1).mean()),
        "depth": 1000 * float((pred_root[2] - gt_root[2]).abs()),
        "mrpe": 1000 * float((pred_root - gt_root).norm()),
    }


def yaw_errors(pred_rel: torch.Tensor, gt_rel: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    """What global orientation (facing) a prediction gets right: a diagnostic for the camera-frame MPJPE.

    ``pred_rel``, ``gt_rel`` (N, 15, 3) root-relative joints, ``up`` (N, 3) the world's up axis in the same frame.
    Returns per person ``yaw`` (N,) radians in [0, pi]: the angle about ``up`` between the predicted and the true
    left direction (left minus right hip plus left minus right shoulder, both taken horizontal; 90 deg is chance for
    facings uniform in 360 deg), ``mpjpe_yaw`` (N,) metres: the MPJPE after the rotation about ``up`` that best
    fits the prediction to the truth (closed form: the angle of the summed horizontal cross and dot products), and
    that turned prediction ``aligned`` (N, 15, 3)."""
    if pred_rel.shape != gt_rel.shape or pred_rel.shape[1:] != (15, 3) or up.shape != (pred_rel.shape[0], 3):
        raise ValueError(f"yaw_errors needs pred_rel, gt_rel (N, 15, 3) and up (N, 3), got {tuple(pred_rel.shape)}, "
                         f"{tuple(gt_rel.shape)}, {tuple(up.shape)}")  # fmt: skip
    up = up / up.norm(dim=-1, keepdim=True)

    def horizontal(v: torch.Tensor) -> torch.Tensor:
        return v - (v * up[:, None]).sum(-1, keepdim=True) * up[:, None]

    def left(j: torch.Tensor) -> torch.Tensor:  # joints 3 / 6: shoulders, 9 / 12: hips (humans.JOINTS)
        return horizontal((j[:, 3] - j[:, 6] + j[:, 9] - j[:, 12])[:, None])[:, 0]

    lp, lg = left(pred_rel), left(gt_rel)
    yaw = torch.atan2((torch.cross(lp, lg, dim=-1) * up).sum(-1), (lp * lg).sum(-1)).abs()
    hp, hg = horizontal(pred_rel), horizontal(gt_rel)
    best = torch.atan2((torch.cross(hp, hg, dim=-1) * up[:, None]).sum((-1, -2)), (hp * hg).sum((-1, -2)))
    aligned = pred_rel @ axis_angle_to_matrix(up * best[:, None]).transpose(-1, -2)
    return {"yaw": yaw, "mpjpe_yaw": (aligned - gt_rel).norm(dim=-1).mean(-1), "aligned": aligned}
