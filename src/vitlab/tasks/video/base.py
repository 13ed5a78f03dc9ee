"""Clip inputs for task models: ``VideoTaskModel`` (checks ``(B, T, C, H, W)`` clips) and ``ClipClassifier``.

Video task models take the normalised clips ``vitlab.data.BatchLoader`` makes of a ``VideoClipDataset``
(``data/synthetic/videos.py``): float ``(B, T, C, H, W)``, ``T`` frames of ``img_size`` px. ``check_image`` names
what is wrong with anything else (a single frame, another clip length or frame size, integer or NaN frames).
``ClipClassifier`` adds the objective shared by clip classifiers: one class per clip, read from the batch key
``label`` ("motion": the camera-motion class, "identity": the centre item's class), cross-entropy, top-1 and
top-5 accuracy (``vitlab train`` prints both).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..base import TaskModel, _check_positive

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["LABEL_CLASSES", "ClipClassifier", "VideoTaskModel"]

# the clip labels of camera_motion_videos and their class counts (static + 5 reversal pairs; Fashion-MNIST items)
LABEL_CLASSES = {"motion": 11, "identity": 10}


class VideoTaskModel(TaskModel):
    """A task model on clips: ``forward`` takes float ``(B, T, C, H, W)`` with ``T == num_frames``."""

    def __init__(self, backbone: str, *, num_classes: int, in_chans: int, img_size: int, num_frames: int) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        _check_positive("num_frames", num_frames)
        self.num_frames = num_frames

    def check_image(self, image: Any) -> None:
        """Raise a ``ValueError`` naming the input unless it is a finite float ``(B, num_frames, in_chans,
        img_size, img_size)`` clip tensor (the finiteness check is skipped while compiling or exporting)."""
        expected = f"(B, T, {self.in_chans}, H, W)"
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a clip tensor {expected}, got {type(image).__name__}")
        if image.ndim != 5 or image.shape[2] != self.in_chans:
            single = " (a single frame or image? video tasks take clips)" if image.ndim == 4 else ""
            raise ValueError(
                f"image must be {expected} clips for {self.task_name!r} built with in_chans={self.in_chans}, got "
                f"shape {tuple(image.shape)}{single}"
            )
        if not image.is_floating_point():
            raise ValueError(f"image must be a normalised float tensor, got dtype {image.dtype}")
        if image.shape[1] != self.num_frames:
            raise ValueError(
                f"image must hold {self.num_frames} frames per clip (built with num_frames={self.num_frames}), got "
                f"T={image.shape[1]} in shape {tuple(image.shape)}"
            )
        if tuple(image.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"image frames must be {self.img_size}x{self.img_size} px (built with img_size={self.img_size}), got "
                f"{image.shape[-2]}x{image.shape[-1]}"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(image).all()):
            raise ValueError("image holds NaN or infinite values (a broken frame?)")

    def example_clips(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Random normalised clips ``(batch_size, num_frames, in_chans, img_size, img_size)``."""
        size = (batch_size, self.num_frames, self.in_chans, self.img_size, self.img_size)
        return torch.randn(size, generator=generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_frames={self.num_frames}"


class ClipClassifier(VideoTaskModel):
    """One class per clip from batch key ``label``: cross-entropy, top-1 (``top1``) and top-5 accuracy (percent).

    Subclasses implement ``forward_image`` (clips -> logits ``(B, num_classes)``).
    """

    primary_metric = "top1"
    higher_is_better = True

    def __init__(
        self, backbone: str, *, num_classes: int, in_chans: int, img_size: int, num_frames: int, label: str
    ) -> None:
        if label not in LABEL_CLASSES:
            raise ValueError(f"label must be one of {sorted(LABEL_CLASSES)} (the clip's target key), got {label!r}")
        # the spec's default (and the engine's, from the clip set's classes) is the motion count: for the identity
        # label it means the set's identity classes
        if label == "identity" and num_classes == LABEL_CLASSES["motion"]:
            num_classes = LABEL_CLASSES["identity"]
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=num_frames)
        self.label = label
        self.target_keys = (label,)

    def _target(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.label not in batch:
            raise ValueError(f"batch has no {self.label!r} target (keys: {sorted(batch)})")
        target = batch[self.label]
        expected = (logits.shape[0],)
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != expected or target.dtype != torch.long:
            got = f"{tuple(target.shape)} {target.dtype}" if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"batch[{self.label!r}] must be int64 {expected} class ids, got {got}")
        return target

    def loss(self, output: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(output, self._target(output, batch))}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy

        k = min(5, self.num_classes)
        return MetricCollection(
            {
                "top1": MulticlassAccuracy(self.num_classes, average="micro"),
                "top5": MulticlassAccuracy(self.num_classes, top_k=k, average="micro"),
            }
        )

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Mapping[str, Any]) -> None:
        target = self._target(output, batch)
        metrics["top1"].update(output, target)
        metrics["top5"].update(output, target)

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``{"top1": percent, "top5": percent}`` (top-5: top-min(5, num_classes))."""
        return {k: 100.0 * float(metrics[k].compute()) for k in ("top1", "top5")}

    def postprocess(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{label: class ids (B,)}``."""
        return {self.label: output.argmax(1)}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random clips and class ids (deterministic for a seeded ``generator``; default seed 0)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        clips = self.example_clips(batch_size, g)
        return {"image": clips, self.label: torch.randint(0, self.num_classes, (batch_size,), generator=g)}
