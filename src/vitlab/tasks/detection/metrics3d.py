"""``Mono3DMetrics``: centre-distance AP and matched-object depth / centre errors for monocular 3-D detectors.

The matching and AP rules are in ``mono3d.py`` (nuScenes-style centre-distance AP, Caesar et al. arXiv:1903.11027).
This module imports torchmetrics, so task models import it inside their metric methods (``import vitlab`` stays light).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .mono3d import average_precision, center_distance_matches

__all__ = ["Mono3DMetrics"]


class Mono3DMetrics(Metric):
    """Centre-distance AP (nuScenes-style, per class then averaged) and matched-object depth / centre errors.

    ``update(preds, targets, matched)``: ``preds`` per image ``{"centers": (P, 3), "scores": (P,), "labels": (P,)}``,
    ``targets`` per image ``{"centers": (M, 3), "labels": (M,)}`` (camera frame, metres), and ``matched`` =
    ``(pred_centers, gt_centers)`` ``(N, 3)`` of the objects the set matcher paired. ``compute()`` gives percentages
    ``ap_center_<t>`` per threshold and their mean ``ap_center``, and ``depth_abs_rel`` (mean |z - z*| / z*) and
    ``center_error`` (mean 3-D distance, metres) of the matched pairs (None without pairs).
    """

    full_state_update = False

    def __init__(self, thresholds: Sequence[float] = (0.5, 1.0, 2.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)
        for name in ("scores", "labels", "tp", "gt_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        for name in ("abs_rel", "center_error", "matched"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, preds: Sequence[dict], targets: Sequence[dict], matched: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        for p, t in zip(preds, targets, strict=True):
            tp = center_distance_matches(
                p["centers"], p["scores"], p["labels"], t["centers"], t["labels"], self.thresholds
            )
            self.scores.append(p["scores"].detach().double().to(self.device))
            self.labels.append(p["labels"].to(self.device))
            self.tp.append(tp.to(self.device))
            self.gt_labels.append(t["labels"].to(self.device))
        pred, gt = (m.detach().double().to(self.device) for m in matched)
        self.abs_rel += ((pred[:, 2] - gt[:, 2]).abs() / gt[:, 2].clamp(min=1e-6)).sum()
        self.center_error += (pred - gt).norm(dim=-1).sum()
        self.matched += len(gt)

    def compute(self) -> dict[str, float | None]:
        T = len(self.thresholds)
        scores = dim_zero_cat(self.scores) if self.scores else torch.zeros(0, dtype=torch.float64)
        labels = dim_zero_cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        tp = dim_zero_cat(self.tp).view(-1, T) if self.tp else torch.zeros(0, T, dtype=torch.bool)
        gt = dim_zero_cat(self.gt_labels) if self.gt_labels else torch.zeros(0, dtype=torch.long)
        classes = gt.unique().tolist()
        out: dict[str, float | None] = {}
        for t, threshold in enumerate(self.thresholds):
            aps = [average_precision(scores[labels == k], tp[labels == k, t], int((gt == k).sum())) for k in classes]
            out[f"ap_center_{threshold:g}"] = 100.0 * sum(aps) / len(aps) if aps else 0.0
        out["ap_center"] = sum(out[f"ap_center_{t:g}"] for t in self.thresholds) / T
        n = float(self.matched)
        out["depth_abs_rel"] = float(self.abs_rel) / n if n else None
        out["center_error"] = float(self.center_error) / n if n else None
        return out
