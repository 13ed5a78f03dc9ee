"""DETR's set criterion with Deformable DETR's focal classification: the loss of the detection task models.

DETR (Carion et al., "End-to-End Object Detection with Transformers", arXiv:2005.12872) matches queries to
targets one-to-one (``HungarianMatcher``) and scores the matched pairs, with the same loss on every decoder
layer's output ("auxiliary decoding losses"). Deformable DETR (Zhu et al., arXiv:2010.04159,
https://github.com/fundamentalvision/Deformable-DETR) classifies with a sigmoid focal loss over all queries and
classes (no "no-object" class), normalised by the number of target boxes; ViDT and the other DETR-style models
here reuse that recipe. Boxes are normalised (cx, cy, w, h); L1 and GIoU losses run on matched pairs only.
``targets_from_batch`` turns the scene batch schema (``data/synthetic/scenes.py``: pixel xyxy boxes, thing-class
labels) into the criterion's targets. Deviations: no two-stage encoder loss (``enc_outputs``) and no
cardinality log; the components come back detached, for logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .matcher import HungarianMatcher, _check_predictions, check_targets

__all__ = ["DEFAULT_WEIGHTS", "SetCriterion", "targets_from_batch"]

# Deformable DETR's / ViDT's loss coefficients (the matcher's costs use the same numbers)
DEFAULT_WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return size[0], size[1]


def targets_from_batch(
    batch: Mapping[str, Any], image_size: int | tuple[int, int], num_classes: int
) -> list[dict[str, torch.Tensor]]:
    """The scene schema's per-image ``"boxes"`` (pixel xyxy) and ``"labels"`` -> criterion targets.

    Returns one ``{"labels": int64 (M,), "boxes": float32 (M, 4) normalised cxcywh}`` per image. Boxes partly
    outside the ``image_size`` (H, W) image are clipped to it; a box entirely outside it, one with ``x2 <= x1`` or
    ``y2 <= y1``, or a label outside ``0..num_classes - 1`` is a ``ValueError`` naming the image and the box.
    """
    H, W = _image_hw(image_size)
    boxes_list, labels_list = batch.get("boxes"), batch.get("labels")
    if not isinstance(boxes_list, Sequence) or not isinstance(labels_list, Sequence):
        raise ValueError("batch must hold 'boxes' and 'labels' as lists (one tensor per image), as scenes collate")
    if len(boxes_list) != len(labels_list):
        raise ValueError(f"batch has {len(boxes_list)} 'boxes' entries but {len(labels_list)} 'labels' entries")
    image = batch.get("image")
    if torch.is_tensor(image) and image.shape[0] != len(boxes_list):
        raise ValueError(f"batch has {image.shape[0]} images but {len(boxes_list)} 'boxes' entries")
    targets = []
    for b, (boxes, labels) in enumerate(zip(boxes_list, labels_list, strict=True)):
        if not torch.is_tensor(labels) or labels.ndim != 1 or labels.dtype != torch.long:
            got = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"batch['labels'][{b}] must be int64 (M,), got {got}")
        if not torch.is_tensor(boxes) or boxes.shape != (len(labels), 4) or not boxes.is_floating_point():
            got = f"{boxes.dtype} {tuple(boxes.shape)}" if torch.is_tensor(boxes) else type(boxes).__name__
            raise ValueError(f"batch['boxes'][{b}] must be float ({len(labels)}, 4) pixel xyxy, got {got}")
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"image {b} has label {int(labels[bad][0])}; expected 0..{num_classes - 1} for K={num_classes}"
            )
        x1, y1, x2, y2 = boxes.float().unbind(-1)
        invalid = ~torch.isfinite(boxes).all(-1) | (x2 <= x1) | (y2 <= y1)
        outside = (x2 <= 0) | (y2 <= 0) | (x1 >= W) | (y1 >= H)
        for mask, why in ((invalid, "is not finite or has x2 <= x1 or y2 <= y1"), (outside, f"lies outside {W}x{H}")):
            if bool(mask.any()):
                j = int(mask.nonzero()[0])
                raise ValueError(f"image {b}, box {j} {boxes[j].tolist()} (xyxy pixels) {why}")
        xyxy = torch.stack([x1.clamp(0, W), y1.clamp(0, H), x2.clamp(0, W), y2.clamp(0, H)], dim=-1)
        xyxy = xyxy / xyxy.new_tensor([W, H, W, H])
        targets.append({"labels": labels, "boxes": box_convert(xyxy, "xyxy", "cxcywh")})
    return targets


def _num_boxes(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Target boxes per rank (the mean over torchrun ranks, like Deformable DETR), at least 1 so empty batches work."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


class SetCriterion(nn.Module):
    """Matched set loss of a DETR-style output, with one auxiliary loss per earlier decoder layer.

    ``forward(outputs, targets)`` takes ``outputs = {"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4),
    "aux_outputs": [{"pred_logits", "pred_boxes"}, ...]}`` (``aux_outputs`` optional) and targets as
    ``targets_from_batch`` makes them. It returns ``"loss"`` (the weighted sum of every term) and each unweighted
    term, detached: ``loss_class``, ``loss_bbox``, ``loss_giou`` for the last layer and ``loss_class_0``, ... for
    ``aux_outputs[0]``, ...

    Args:
        num_classes: ``K``, the thing classes (no background: sigmoid scores, all 0 means "no object").
        matcher: the assignment; every output (main and auxiliary) is matched on its own.
        weight_dict: weight per term name (``DEFAULT_WEIGHTS`` if None); a term missing from it is logged only.
        focal_alpha, focal_gamma: the sigmoid focal loss's parameters.
    """

    TERMS = ("loss_class", "loss_bbox", "loss_giou")

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_dict: Mapping[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer (thing classes only), got {num_classes!r}")
        weights = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        unknown = sorted(set(weights) - set(self.TERMS))
        if unknown:
            raise ValueError(f"weight_dict has unknown terms {unknown}; known: {list(self.TERMS)}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weight_dict = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _terms(
        self, out: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]], num_boxes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        indices = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        matched = [
            (t["labels"][m.to(t["labels"].device)], t["boxes"][m.to(t["boxes"].device)])
            for t, (_, m) in zip(targets, indices, strict=True)
        ]
        labels = torch.cat([lab for lab, _ in matched]).to(logits.device)
        tgt_boxes = torch.cat([box for _, box in matched])

        # one-hot over (query, class): matched queries are positive for their target's class, all else negative
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, labels] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")

        src = boxes[batch_idx, query_idx]  # (N, 4) matched predictions; N = 0 keeps the graph (a sum of nothing)
        tgt = tgt_boxes.to(src)
        giou = generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
        )
        return {
            "loss_class": focal / num_boxes,
            "loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
            "loss_giou": giou / num_boxes,
        }

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """``{"loss": weighted sum, "loss_class": ..., "loss_class_0": ..., ...}`` (scalars; the terms detached)."""
        layers = [(outputs, "")]
        aux = outputs.get("aux_outputs") or []
        if not isinstance(aux, Sequence):
            raise ValueError(f"outputs['aux_outputs'] must be a list of dicts, got {type(aux).__name__}")
        layers += [(a, f"_{i}") for i, a in enumerate(aux)]
        for out, suffix in layers:
            where = "outputs" if not suffix else f"outputs['aux_outputs'][{suffix[1:]}]"
            if not isinstance(out, Mapping) or "pred_logits" not in out or "pred_boxes" not in out:
                raise ValueError(f"{where} must be a dict with 'pred_logits' and 'pred_boxes'")
            _check_predictions(out["pred_logits"], out["pred_boxes"])
            if out["pred_logits"].shape[-1] != self.num_classes:
                raise ValueError(
                    f"{where}['pred_logits'] has {out['pred_logits'].shape[-1]} classes; "
                    f"the criterion was built with num_classes={self.num_classes}"
                )
        logits = outputs["pred_logits"]
        check_targets(targets, logits.shape[0], self.num_classes)
        num_boxes = _num_boxes(targets, logits.device)

        total = logits.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        for out, suffix in layers:
            for name, value in self._terms(out, targets, num_boxes).items():
                total = total + self.weight_dict.get(name, 0.0) * value
                logs[name + suffix] = value.detach()
        return {"loss": total, **logs}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, focal_alpha={self.focal_alpha}"
