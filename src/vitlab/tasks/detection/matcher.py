"""Hungarian matching of a set predictor's queries to the ground-truth boxes (DETR's bipartite assignment).

DETR (Carion et al., "End-to-End Object Detection with Transformers", arXiv:2005.12872) scores every
(query, target) pair and solves the one-to-one assignment of least total cost with the Hungarian algorithm;
Deformable DETR (Zhu et al., arXiv:2010.04159, https://github.com/fundamentalvision/Deformable-DETR) swaps the
softmax class cost for a focal-style one on sigmoid scores, with weights class 2, L1 5, GIoU 2 (ViDT's too).
The cost is ``cost_class * focal + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``; the assignment is scipy's
``linear_sum_assignment``. Deviations: the focal terms use ``softplus`` (exact log-sigmoid) instead of
``log(p + 1e-8)``; targets are checked (labels in range, boxes finite) and a NaN cost is an error rather than a
crash inside scipy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "check_targets"]


def check_targets(targets: Sequence[Mapping[str, torch.Tensor]], batch_size: int, num_classes: int) -> None:
    """Raise a ``ValueError`` naming the image unless ``targets`` are ``batch_size`` dicts of labels and boxes.

    Each dict holds ``"labels"`` int64 ``(M,)`` in ``0..num_classes - 1`` and ``"boxes"`` float ``(M, 4)``
    normalised (cx, cy, w, h), finite.
    """
    if not isinstance(targets, Sequence) or len(targets) != batch_size:
        got = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per image), got {got}")
    for b, t in enumerate(targets):
        if not isinstance(t, Mapping) or "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{b}] must be a dict with 'labels' and 'boxes', got {type(t).__name__}")
        labels, boxes = t["labels"], t["boxes"]
        if not torch.is_tensor(labels) or labels.ndim != 1 or labels.dtype != torch.long:
            got = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"targets[{b}]['labels'] must be int64 (M,), got {got}")
        if not torch.is_tensor(boxes) or boxes.shape != (len(labels), 4) or not boxes.is_floating_point():
            got = f"{boxes.dtype} {tuple(boxes.shape)}" if torch.is_tensor(boxes) else type(boxes).__name__
            raise ValueError(f"targets[{b}]['boxes'] must be float ({len(labels)}, 4) normalised cxcywh, got {got}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0]
            raise ValueError(f"targets[{b}] has label {int(bad)}; expected 0..{num_classes - 1} for K={num_classes}")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"targets[{b}]['boxes'] holds a NaN or infinite value")


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def _check_predictions(pred_logits: torch.Tensor, pred_boxes: torch.Tensor) -> None:
    if not torch.is_tensor(pred_logits) or pred_logits.ndim != 3:
        got = tuple(pred_logits.shape) if torch.is_tensor(pred_logits) else type(pred_logits).__name__
        raise ValueError(f"pred_logits must be (B, Q, K), got {got}")
    if not torch.is_tensor(pred_boxes) or pred_boxes.shape != (*pred_logits.shape[:2], 4):
        got = tuple(pred_boxes.shape) if torch.is_tensor(pred_boxes) else type(pred_boxes).__name__
        raise ValueError(f"pred_boxes must be (B, Q, 4) = {(*pred_logits.shape[:2], 4)} for pred_logits, got {got}")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets per image, least total cost (no learnable parameters).

    ``forward(pred_logits (B, Q, K), pred_boxes (B, Q, 4), targets)`` -> per image ``(query_idx, target_idx)``,
    two int64 CPU tensors of length ``min(Q, M)`` = ``M``, sorted by query index.

    Args:
        cost_class: weight of the focal-style class cost (sigmoid scores; no "no-object" class).
        cost_bbox: weight of the L1 distance between normalised (cx, cy, w, h) boxes.
        cost_giou: weight of the negative generalised IoU.
        focal_alpha, focal_gamma: the focal loss's balance and focusing parameters.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(
                f"matcher costs must be >= 0 and not all 0, got class={cost_class}, bbox={cost_bbox}, giou={cost_giou}"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Per image the float32 cost ``(Q, M)`` of assigning query ``q`` to target ``m`` (what ``forward`` solves)."""
        _check_predictions(pred_logits, pred_boxes)
        B, Q, K = pred_logits.shape
        check_targets(targets, B, K)
        logits = pred_logits.detach().flatten(0, 1).float()  # (B*Q, K)
        boxes = pred_boxes.detach().flatten(0, 1).float()  # (B*Q, 4)
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)  # (T,)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes).view(-1, 4)  # (T, 4)

        # focal loss of calling the query positive minus that of calling it negative; -log(p) = softplus(-x)
        p = logits.sigmoid()
        pos = self.focal_alpha * (1 - p) ** self.focal_gamma * F.softplus(-logits)
        neg = (1 - self.focal_alpha) * p**self.focal_gamma * F.softplus(logits)
        terms = {
            "class": (pos - neg)[:, labels],  # (B*Q, T)
            "bbox": torch.cdist(boxes, tgt_boxes, p=1),
            "giou": -generalized_box_iou(_xyxy(boxes), _xyxy(tgt_boxes)),
        }
        cost = self.cost_class * terms["class"] + self.cost_bbox * terms["bbox"] + self.cost_giou * terms["giou"]
        sizes = [len(t["labels"]) for t in targets]
        per_image = [c[b] for b, c in enumerate(cost.view(B, Q, -1).split(sizes, dim=-1))]
        for b, c in enumerate(per_image):
            if not bool(torch.isfinite(c).all()):
                rows = slice(b * Q, (b + 1) * Q)
                cols = slice(sum(sizes[:b]), sum(sizes[: b + 1]))
                culprits = [name for name, v in terms.items() if not bool(torch.isfinite(v[rows, cols]).all())]
                raise ValueError(
                    f"matching cost of image {b} is NaN or infinite (from the {'/'.join(culprits)} cost): "
                    "check pred_logits / pred_boxes for NaN and for degenerate boxes"
                )
        return per_image

    @torch.no_grad()
    def forward(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(query_idx, target_idx)`` per image; an image without targets gets two empty tensors."""
        from scipy.optimize import linear_sum_assignment  # imported here: scipy stays out of `import vitlab`

        indices = []
        for b, c in enumerate(self.cost_matrix(pred_logits, pred_boxes, targets)):
            Q, M = c.shape
            if M > Q:
                raise ValueError(
                    f"image {b} has {M} targets but the model makes only {Q} queries; every target needs a query "
                    "(use more queries or fewer objects per image)"
                )
            rows, cols = linear_sum_assignment(c.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )
