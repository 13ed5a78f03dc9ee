"""Detection task models (importing this package registers them) and the DETR-style parts they share.

Parts: matcher, set criterion, metrics, and the deformable decoder (``decoder.py``). Task models: ``"vidt"`` and
``"monodino_detr"`` (with its parts: ``mono3d.py``, ``metrics3d.py``, ``hybrid_encoder.py``).

``HungarianMatcher`` and ``SetCriterion`` (with ``targets_from_batch``) are light; ``DetectionMetrics`` and
``postprocess_detections`` live in ``metrics.py``, which imports torchmetrics, so they are exported lazily here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .criterion import DEFAULT_WEIGHTS, SetCriterion, targets_from_batch
from .decoder import DeformableDecoder, DeformableDecoderLayer, MlpHead
from .matcher import HungarianMatcher, check_targets
from .monodino_detr import MonoDINODETR
from .vidt import ViDT

if TYPE_CHECKING:
    from .metrics import DetectionMetrics, postprocess_detections

__all__ = [
    "DEFAULT_WEIGHTS",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DetectionMetrics",
    "HungarianMatcher",
    "MlpHead",
    "MonoDINODETR",
    "SetCriterion",
    "ViDT",
    "check_targets",
    "postprocess_detections",
    "targets_from_batch",
]

_LAZY = {"DetectionMetrics", "postprocess_detections"}


def __getattr__(name: str) -> Any:
    # PEP 562: metrics.py (and with it torchmetrics) loads on first use, not on `import vitlab`
    if name in _LAZY:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
