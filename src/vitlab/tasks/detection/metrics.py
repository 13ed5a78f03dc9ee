"""COCO box mAP for the detection task models, and the DETR-style top-k postprocessing that feeds it.

``DetectionMetrics`` is torchmetrics' ``MeanAveragePrecision`` (COCO protocol: IoU 0.50:0.95, 101 recall points,
area ranges, at most 1/10/100 detections) fixed to pixel xyxy boxes, whose ``compute()`` returns percentages as
plain floats (``None`` where COCO reports -1: no ground truth in that area range, or nothing updated).
``postprocess_detections`` is Deformable DETR's (Zhu et al., arXiv:2010.04159) inference step: the top-k
sigmoid scores over all (query, class) pairs of a DETR (Carion et al., arXiv:2005.12872) output, each with its
query's box. Deviation: the boxes are clipped to the image (the targets are, and clipping only raises IoU).
NOTE: this module imports torchmetrics (about 1.5 s), so task models import it inside their metric methods and
the package ``__init__`` exports it lazily; ``import vitlab`` stays light.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Literal

import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from .criterion import _image_hw

__all__ = ["DetectionMetrics", "postprocess_detections"]


def postprocess_detections(
    pred_logits: torch.Tensor, pred_boxes: torch.Tensor, image_size: int | tuple[int, int], top_k: int = 100
) -> list[dict[str, torch.Tensor]]:
    """Raw output -> per image ``{"boxes": (k, 4) pixel xyxy, "scores": (k,), "labels": (k,) int64}``.

    ``pred_logits`` ``(B, Q, K)`` are sigmoid logits and ``pred_boxes`` ``(B, Q, 4)`` normalised (cx, cy, w, h);
    ``k = min(top_k, Q * K)`` detections per image, by descending score. One query may give several detections
    (one per class), as in Deformable DETR.
    """
    if not torch.is_tensor(pred_logits) or pred_logits.ndim != 3:
        raise ValueError(f"pred_logits must be (B, Q, K), got {getattr(pred_logits, 'shape', type(pred_logits))}")
    B, Q, K = pred_logits.shape
    if not torch.is_tensor(pred_boxes) or pred_boxes.shape != (B, Q, 4):
        raise ValueError(f"pred_boxes must be {(B, Q, 4)}, got {getattr(pred_boxes, 'shape', type(pred_boxes))}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    H, W = _image_hw(image_size)
    scores, flat = pred_logits.detach().float().sigmoid().flatten(1).topk(min(top_k, Q * K), dim=1)  # (B, k)
    query, labels = flat // K, flat % K
    boxes = pred_boxes.detach().float().gather(1, query.unsqueeze(-1).expand(-1, -1, 4))  # (B, k, 4)
    scale = boxes.new_tensor([W, H, W, H])
    boxes = torch.minimum((box_convert(boxes, "cxcywh", "xyxy") * scale).clamp(min=0), scale)
    return [{"boxes": boxes[b], "scores": scores[b], "labels": labels[b]} for b in range(B)]


_Backend = Literal["faster_coco_eval", "pycocotools"]


def _default_backend() -> _Backend:
    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


class DetectionMetrics(MeanAveragePrecision):
    """COCO box mAP over pixel-xyxy predictions and targets; ``compute()`` gives percentages as plain floats.

    ``update(preds, targets)`` takes torchmetrics' lists of dicts: ``preds`` ``{"boxes", "scores", "labels"}``
    (what ``postprocess_detections`` returns), ``targets`` ``{"boxes", "labels"}``, boxes xyxy in pixels. It is a
    torchmetrics ``Metric``, so it moves, resets and syncs over torchrun ranks inside a ``MetricCollection``.

    Args:
        backend: the COCO evaluator; None picks ``faster_coco_eval`` (the faster C++ port) when it is importable
            and falls back to ``pycocotools`` otherwise. NOTE: with ``pycocotools``, a ``max_detection_thresholds``
            whose largest value is not 100 makes ``map`` -1 (returned as None): pycocotools summarises mAP at 100
            detections only (torchmetrics#2560); ``faster_coco_eval`` has no such limit.
        class_metrics: also report ``map_per_class`` and ``mar_100_per_class`` (lists, one per entry of ``classes``).
        kwargs: the remaining ``MeanAveragePrecision`` arguments (``iou_thresholds``, ``max_detection_thresholds``,
            ``sync_on_compute``, ...).
    """

    def __init__(self, backend: _Backend | None = None, class_metrics: bool = False, **kwargs: Any) -> None:
        backend = backend or _default_backend()
        for fixed in ("box_format", "iou_type"):
            if fixed in kwargs:
                raise ValueError(f"DetectionMetrics fixes {fixed} (pixel xyxy boxes); do not pass {fixed}=")
        super().__init__(box_format="xyxy", iou_type="bbox", class_metrics=class_metrics, backend=backend, **kwargs)
        if backend == "pycocotools" and self.max_detection_thresholds[-1] != 100:
            warnings.warn(
                "pycocotools reports map = -1 unless the largest max_detection_threshold is 100 (torchmetrics#2560); "
                "install faster-coco-eval for other limits",
                stacklevel=2,
            )

    def compute(self) -> dict[str, Any]:
        """``{"map", "map_50", "map_75", "map_small", ..., "mar_100", ...}`` in percent (None where COCO says -1).

        With ``class_metrics``, ``"classes"`` lists the class ids seen and ``"map_per_class"`` /
        ``"mar_100_per_class"`` hold one percentage (or None) per class id.
        """
        values = super().compute()
        result: dict[str, Any] = {}
        for key, value in values.items():
            if key == "classes":
                if self.class_metrics:
                    result[key] = [int(c) for c in value.reshape(-1).tolist()]
            elif key.endswith("_per_class"):
                if self.class_metrics:
                    result[key] = [None if v < 0 else 100.0 * v for v in value.reshape(-1).tolist()]
            else:
                v = float(value)
                result[key] = None if v < 0 else 100.0 * v
        return result
