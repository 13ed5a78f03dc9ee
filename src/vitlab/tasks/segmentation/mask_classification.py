"""Mask classification (MaskFormer / Mask2Former): matching queries to target masks, the set loss, and inference.

Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", arXiv:2112.01527 (official code
https://github.com/facebookresearch/Mask2Former), after DETR's set prediction (arXiv:2005.12872). The matching cost is
``2 * class + 5 * BCE + 5 * dice`` (class: minus the softmax probability of the target class); the loss is
cross-entropy over all queries (no-object weight 0.1) plus sigmoid BCE and dice on the matched masks, normalised by
the number of target masks, summed over the final and every auxiliary prediction. ``semantic_inference`` and
``panoptic_inference`` are Mask2Former's rules for turning (class, mask) pairs into maps. Used by
``mask2former.Mask2Former``.

Deviation: costs and losses use every pixel of the predicted masks upsampled to the targets' size, instead of
12544 importance-sampled points (64 px images have 4096 pixels). Panoptic inference gives pixels that no segment
claims to category ``fill`` (the background) instead of void: torchmetrics' PQ skips target segments that are mostly
void in the prediction, which would reward predicting nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskMatcher", "MaskSetCriterion", "panoptic_inference", "semantic_inference"]


def _pairwise_mask_costs(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid BCE and dice loss of every (prediction, target) pair: logits ``(Q, P)``, targets ``(M, P)``."""
    bce = (F.softplus(-pred) @ target.T + F.softplus(pred) @ (1 - target).T) / pred.shape[-1]
    p = pred.sigmoid()
    dice = 1 - (2 * p @ target.T + 1) / (p.sum(-1)[:, None] + target.sum(-1)[None] + 1)
    return bce, dice


class MaskMatcher(nn.Module):
    """One-to-one assignment of queries to target masks per image (scipy's Hungarian solver).

    Cost: ``-cost_class * softmax(logits)[label] + cost_mask * BCE + cost_dice * dice``, the masks compared at the
    targets' size. ``forward(pred_logits (B, Q, K + 1), pred_masks (B, Q, h, w), targets)`` -> per image
    ``(query_idx, target_idx)``.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, target: torch.Tensor):
        """``(Q, M)`` cost for one image: ``logits (Q, K + 1)``, ``masks (Q, H, W)``, ``labels (M,)``, ``target
        (M, H, W)``."""
        bce, dice = _pairwise_mask_costs(masks.flatten(1).float(), target.flatten(1).float())
        prob = logits.float().softmax(-1)[:, labels]
        return -self.cost_class * prob + self.cost_mask * bce + self.cost_dice * dice

    @torch.no_grad()
    def forward(self, pred_logits, pred_masks, targets: Sequence[Mapping[str, torch.Tensor]]) -> list:
        from scipy.optimize import linear_sum_assignment  # imported here: scipy stays out of `import vitlab`

        out = []
        for b, t in enumerate(targets):
            Q, M = pred_logits.shape[1], len(t["labels"])
            if M > Q:
                raise ValueError(f"image {b} has {M} segments but the model makes only {Q} queries")
            masks = pred_masks[b]
            if masks.shape[-2:] != t["masks"].shape[-2:]:
                masks = F.interpolate(masks[None], size=t["masks"].shape[-2:], mode="bilinear", align_corners=False)[0]
            cost = self.cost_matrix(pred_logits[b], masks, t["labels"], t["masks"])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return out


class MaskSetCriterion(nn.Module):
    """Mask2Former's set loss over the final and every auxiliary prediction.

    ``targets``: per image ``{"labels": (M,) int64 in 0..K-1, "masks": (M, H, W) bool}``. Returns ``{"loss",
    "loss_ce", "loss_mask", "loss_dice"}`` (the parts of the final prediction, unweighted).
    """

    def __init__(
        self,
        num_classes: int,
        no_object_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = (class_weight, mask_weight, dice_weight)
        self.matcher = MaskMatcher(class_weight, mask_weight, dice_weight)
        empty = torch.ones(num_classes + 1)
        empty[-1] = no_object_weight
        self.register_buffer("class_weights", empty, persistent=False)

    def _parts(self, logits, masks, targets, num_masks: float) -> torch.Tensor:
        """``(ce, bce, dice)`` of one prediction layer."""
        indices = self.matcher(logits, masks, targets)
        device = logits.device
        b_idx = torch.cat([torch.full_like(rows, b) for b, (rows, _) in enumerate(indices)]).to(device)
        q_idx = torch.cat([rows for rows, _ in indices]).to(device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=device)
        classes[b_idx, q_idx] = torch.cat([t["labels"][c] for t, (_, c) in zip(targets, indices, strict=True)]).to(
            device
        )
        ce = F.cross_entropy(logits.transpose(1, 2), classes, self.class_weights.to(logits.dtype))
        # only the matched masks go up to the targets' size (one gather, so one backward)
        size = targets[0]["masks"].shape[-2:]
        p = F.interpolate(masks[b_idx, q_idx][:, None], size=size, mode="bilinear", align_corners=False).flatten(1)
        g = torch.cat([t["masks"][c] for t, (_, c) in zip(targets, indices, strict=True)]).flatten(1).to(p)
        bce = F.binary_cross_entropy_with_logits(p, g, reduction="none").mean(1).sum() / num_masks
        s = p.sigmoid()
        dice = (1 - (2 * (s * g).sum(1) + 1) / (s.sum(1) + g.sum(1) + 1)).sum() / num_masks
        return torch.stack([ce, bce, dice])

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]) -> dict:
        num_masks = max(sum(len(t["labels"]) for t in targets), 1)
        layers = [outputs, *outputs.get("aux_outputs", [])]
        parts = [self._parts(o["pred_logits"], o["pred_masks"], targets, num_masks) for o in layers]
        weights = torch.tensor(self.weights, dtype=parts[0].dtype, device=parts[0].device)
        loss = sum((p * weights).sum() for p in parts)
        return {"loss": loss, "loss_ce": parts[0][0], "loss_mask": parts[0][1], "loss_dice": parts[0][2]}


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``(B, K, H, W)``: ``softmax(class)[:-1]`` times ``sigmoid(mask)``, summed over queries."""
    return torch.einsum("bqk,bqhw->bkhw", pred_logits.softmax(-1)[..., :-1], pred_masks.sigmoid())


@torch.no_grad()
def panoptic_inference(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    things: Sequence[int],
    object_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    fill: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former's panoptic merge -> ``(category (B, H, W), instance (B, H, W))`` int64.

    Queries scoring above ``object_threshold`` (not no-object) compete per pixel by score x mask probability; a
    query keeps the pixels it wins inside its own mask if they are at least ``overlap_threshold`` of that mask.
    Thing segments get instance ids 1, 2, ...; stuff segments of one class merge (instance 0); unclaimed pixels
    get category ``fill``, instance 0.
    """
    B, _, H, W = pred_masks.shape
    K = pred_logits.shape[-1] - 1
    scores, labels = pred_logits.softmax(-1).max(-1)
    category = torch.full((B, H, W), fill, dtype=torch.long, device=pred_masks.device)
    instance = torch.zeros_like(category)
    is_thing = torch.zeros(K + 1, dtype=torch.bool)
    is_thing[list(things)] = True
    for b in range(B):
        keep = (labels[b] != K) & (scores[b] > object_threshold)
        if not bool(keep.any()):
            continue
        prob = pred_masks[b, keep].sigmoid()
        owner = (scores[b, keep, None, None] * prob).argmax(0)  # (H, W): index of the winning kept query
        next_id = 1
        for k, c in enumerate(labels[b, keep].tolist()):
            won, own = owner == k, prob[k] >= 0.5
            segment = won & own
            area, own_area = int(won.sum()), int(own.sum())
            if area == 0 or own_area == 0 or not bool(segment.any()) or area / own_area < overlap_threshold:
                continue
            category[b][segment] = c
            if is_thing[c]:
                instance[b][segment] = next_id
                next_id += 1
    return category, instance
