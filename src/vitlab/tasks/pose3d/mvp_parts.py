"""MvP's parts (paper 36, :mod:`.mvp`): the decoder layer (self-attention among joint queries, projective or dense
cross-attention to the views, FFN), MPJPE-cost Hungarian matching, the set loss, the AP / MPJPE / recall protocol of
VoxelPose and MvP, and the skeleton picture of ``vitlab predict`` (with :mod:`.draw`'s helpers)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision.ops import sigmoid_focal_loss

from ...layers.camera import invert_pose, project, transform_points
from ...layers.projective_attention import ProjectiveAttention
from .draw import PRED_COLOUR, TRUE_COLOUR, draw_skeletons, project_skeletons, skeleton_rows

__all__ = [
    "ATTENTIONS",
    "MvPDecoderLayer",
    "average_precision",
    "greedy_eval",
    "joint_heatmaps",
    "match_people",
    "set_loss",
    "skeleton_picture",
]

ATTENTIONS = ("projective", "dense")


class MvPDecoderLayer(nn.Module):
    """Post-norm decoder layer (Deformable DETR's): self-attention among all joint queries, cross-attention to the
    views ("projective": :class:`ProjectiveAttention` at the queries' 3-D points; "dense": every token of every
    view, keys carry a learned position embedding), FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, attention: str, num_points: int, fusion: str, views: int,
                 levels: int = 1, coords: bool = False):  # fmt: skip
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention = attention
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        if attention == "projective":
            self.cross = ProjectiveAttention(dim, heads, num_points, fusion, views, levels=levels, coords=coords)
        else:
            self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))

    def forward(self, tgt, pos, points, maps, keys, K, cam_to_world, image_size) -> torch.Tensor:
        """``tgt``/``pos`` (B, Q, dim) content and position, ``points`` (B, Q, 3) world, ``maps`` a list of levels
        (B, V, dim, h_l, w_l), ``keys`` (B, V * sum h_l w_l, dim) the dense attention's keys (tokens + position, the
        order of ``maps``' tokens; None for projective)."""
        q = tgt + pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        q = tgt + pos
        if self.attention == "projective":
            cross = self.cross(q, points, maps, K, cam_to_world, image_size)
        else:
            values = torch.cat([m.flatten(3) for m in maps], -1).transpose(-1, -2).flatten(1, 2)  # (B, V * S, dim)
            cross = self.cross(q, keys, values, need_weights=False)[0]
        tgt = self.norm2(tgt + cross)
        return self.norm3(tgt + self.ffn(tgt))


def joint_heatmaps(
    joints: torch.Tensor,
    mask: torch.Tensor,
    K: torch.Tensor,
    cam_to_world: torch.Tensor,
    image_size: int,
    map_size: tuple[int, int],
    sigma: float = 1.0,
) -> torch.Tensor:
    """2-D joint heatmaps ``(B, V, J, h, w)`` of world ``joints`` (B, P, J, 3) of present people (``mask`` (B, P)):
    per joint the largest Gaussian (``sigma`` map cells) at the people's projections into each view (in front of the
    camera; occlusion is ignored)."""
    h, w = map_size
    w2c = invert_pose(cam_to_world)[:, :, None, None]  # (B, V, 1, 1, 4, 4)
    cam = transform_points(w2c, joints[:, None])  # (B, V, P, J, 3)
    uv, front = project(cam, K[:, :, None, None])
    c = uv * uv.new_tensor([w / image_size, h / image_size])  # map pixels
    gx = torch.arange(w, dtype=uv.dtype, device=uv.device) + 0.5
    gy = torch.arange(h, dtype=uv.dtype, device=uv.device) + 0.5
    dx = (gx - c[..., 0, None]) ** 2  # (B, V, P, J, w)
    dy = (gy - c[..., 1, None]) ** 2  # (B, V, P, J, h)
    g = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma**2))
    keep = (front & (cam[..., 2] > 1e-6) & mask[:, None, :, None])[..., None, None]
    return torch.where(keep, g, 0).amax(2) if g.shape[2] else g.new_zeros(*g.shape[:2], *g.shape[3:])


def _pose_cost(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean absolute joint error ``(Q, P)`` between people ``(Q, J, 3)`` and ``(P, J, 3)``."""
    return (pred[:, None] - gt[None]).abs().mean((-1, -2))


@torch.no_grad()
def match_people(
    logits: torch.Tensor, joints: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, w_class: float, w_pose: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hungarian matching per scene: cost ``w_pose * mean L1 of the joints - w_class * sigmoid(logit)``.

    ``logits`` (B, Q), ``joints`` (B, Q, J, 3), ``gt`` (B, P, J, 3), ``mask`` (B, P) -> per scene ``(query_idx,
    person_idx)`` int64, one pair per present person.
    """
    from scipy.optimize import linear_sum_assignment  # scipy stays out of `import vitlab`

    out = []
    for b in range(logits.shape[0]):
        people = mask[b].nonzero().flatten()
        cost = w_pose * _pose_cost(joints[b].float(), gt[b, people].float())
        cost = cost - w_class * logits[b].float().sigmoid()[:, None]
        if not bool(torch.isfinite(cost).all()):
            raise ValueError(f"matching cost of scene {b} is NaN or infinite: check the predicted joints and logits")
        q, p = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(q, dtype=torch.long), people.cpu()[torch.as_tensor(p, dtype=torch.long)]))
    return out


def set_loss(
    logits: torch.Tensor,
    joints: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor,
    w_class: float = 2.0,
    w_pose: float = 5.0,
    alpha: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's set loss: ``(focal classification, L1 joints)``, each summed over scenes and divided by the
    number of people; ``joints`` and ``gt`` in the same (normalised) units."""
    pairs = match_people(logits, joints, gt, mask, w_class, w_pose)
    target = torch.zeros_like(logits)
    l1 = logits.new_zeros(())
    for b, (q, p) in enumerate(pairs):
        target[b, q] = 1.0
        l1 = l1 + (joints[b, q] - gt[b, p]).abs().mean((-1, -2)).sum()
    people = mask.sum().clamp_min(1).to(logits.dtype)
    focal = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=2.0, reduction="sum")
    return focal / people, l1 / people


def greedy_eval(
    joints: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per predicted person of one scene its score, the MPJPE to its closest present true person and that person's
    index (VoxelPose / MvP protocol): ``joints`` (Q, J, 3), ``scores`` (Q,), ``gt`` (P, J, 3), ``mask`` (P,)."""
    err = (joints[:, None].float() - gt[None].float()).norm(dim=-1).mean(-1)  # (Q, P)
    err = err.masked_fill(~mask[None], float("inf"))
    best, idx = err.min(1) if err.shape[1] else (torch.full_like(scores, float("inf")), torch.zeros_like(scores))
    return scores.float(), best, idx.long()


def average_precision(scores: np.ndarray, errors: np.ndarray, keys: np.ndarray, total: int, threshold: float):
    """AP at an MPJPE ``threshold``, recall and the mean error of the true positives: predictions sorted by score,
    a prediction is a true positive when its error is below ``threshold`` and its person (``keys``) is not taken yet.

    AP is the area under the precision envelope over recall (all points, as VoxelPose's ``_eval_list_to_ap``).
    """
    order = np.argsort(-scores, kind="stable")
    taken: set[int] = set()
    tp = np.zeros(len(order))
    tp_err = []
    for i, k in enumerate(order):
        if errors[k] < threshold and int(keys[k]) not in taken:
            taken.add(int(keys[k]))
            tp[i] = 1
            tp_err.append(errors[k])
    if total == 0 or len(order) == 0:
        return 0.0, 0.0, float("nan")
    ctp = np.cumsum(tp)
    recall = ctp / total
    precision = ctp / np.arange(1, len(order) + 1)
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    ap = float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())
    return ap, float(recall[-1]), float(np.mean(tp_err)) if tp_err else float("nan")


def skeleton_picture(views: torch.Tensor, K: torch.Tensor, cam_to_world: torch.Tensor, pred: torch.Tensor,
                     valid: torch.Tensor, gt: torch.Tensor | None = None, gt_mask: torch.Tensor | None = None,
                     scale: int = 4) -> Image.Image:  # fmt: skip
    """One row per scene, one tile per view (``draw``'s helpers): the uint8 ``views`` (B, V, 3, H, W) with the true
    people (``gt`` (B, P, J, 3) world where ``gt_mask``) in green and the predicted ones ``pred`` (B, Q, J, 3) world
    where ``valid`` (B, Q) in red, projected with each view's camera, enlarged ``scale`` times."""
    w2c = invert_pose(cam_to_world.float())
    rows = []
    for b in range(views.shape[0]):
        people = [(pred[b][valid[b]], PRED_COLOUR)]
        if gt is not None and gt_mask is not None:
            people.insert(0, (gt[b][gt_mask[b]], TRUE_COLOUR))
        tiles = []
        for v in range(views.shape[1]):
            drawn = []
            for joints, colour in people:
                cam = transform_points(w2c[b, v], joints.detach().cpu().float())
                drawn += [(uv, colour) for uv in project_skeletons(cam, K[b, v])]
            tiles.append(draw_skeletons(views[b, v], drawn, scale))
        rows.append(tiles)
    return skeleton_rows(rows)
