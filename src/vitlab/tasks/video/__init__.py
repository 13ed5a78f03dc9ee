"""Video task models: clips ``(B, T, C, H, W)`` through image ViTs (paper 33's ViViT factorised encoder).

``base``: ``VideoTaskModel`` (clip input checks) and ``ClipClassifier`` (one class per clip); ``frames``: the image
ViT -> video parts (per-frame encoder, token adapter, temporal transformer); ``vivit``: the ``vivit_fe`` task.
"""

from .base import LABEL_CLASSES, ClipClassifier, VideoTaskModel
from .dvgformer import DVGFormer  # noqa: F401  (registers the dvgformer task)
from .frames import FrameEncoder, TemporalTransformer, TokenAdapter
from .uniformerv2 import UniFormerV2
from .vivit import VivitFE

__all__ = [
    "LABEL_CLASSES",
    "ClipClassifier",
    "FrameEncoder",
    "TemporalTransformer",
    "TokenAdapter",
    "UniFormerV2",
    "VideoTaskModel",
    "VivitFE",
]
