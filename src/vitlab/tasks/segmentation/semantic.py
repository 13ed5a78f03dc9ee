"""Generic semantic segmentation: any backbone, a pyramid neck and a light fuse head (task ``"segmentation"``).

No single paper: the head is the semantic branch of Panoptic FPN (Kirillov et al., arXiv:1901.02446) made
lighter (one 3x3 conv per level instead of a conv/upsample tower), over the neck that ``BackbonePyramid`` picks
for the backbone's topology (ViTDet's simple feature pyramid or FPN, ``layers/necks.py``). Loss: pixel-wise
cross-entropy with ignore index 255. Metrics: torchmetrics' multiclass Jaccard index (mean over the classes
present, and per class) and pixel accuracy. Batch schema: ``"image"`` float32 ``(B, C, H, W)`` normalised;
``"semantic"`` int64 ``(B, H, W)``, 0 = background, ``k + 1`` = thing class ``k``, 255 = ignore.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from .._backbone import BackbonePyramid
from .._registry import register_task
from ..base import TaskModel, TaskSpec

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["IGNORE_INDEX", "SemanticFuseHead", "SemanticSegmentation"]

IGNORE_INDEX = 255


class SemanticFuseHead(nn.Module):
    """Pyramid maps (fine to coarse, ``in_channels`` wide) -> class logits ``(B, num_classes, H, W)`` at ``size``.

    Each level gets a 3x3 conv + norm + GELU, is upsampled to the finest level and summed; a 1x1 conv classifies
    and a bilinear upsample brings the logits to the image size.
    """

    def __init__(self, in_channels: int, num_levels: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), LayerNorm2d(hidden), nn.GELU())
            for _ in range(num_levels)
        )
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        fine = maps[0].shape[-2:]
        x = self.levels[0](maps[0])
        for level, m in zip(self.levels[1:], maps[1:], strict=True):
            x = x + F.interpolate(level(m), size=fine, mode="bilinear", align_corners=False)
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


class SemanticSegmentation(TaskModel):
    """Backbone (by name) + pyramid neck + ``SemanticFuseHead``: image ``(B, C, H, W)`` -> logits ``(B, K, H, W)``.

    Args:
        num_classes: ``K``, the background included (thing class ``k`` is label ``k + 1``).
        width: channels of the neck's pyramid and of the head.
        backbone_kwargs: keywords for the backbone's constructor.
        isotropic_maps: see ``BackbonePyramid`` (1: the last block feeds every level, as in ViTDet).
    """

    task_name = "segmentation"
    target_keys = ("semantic",)
    primary_metric = "miou"
    higher_is_better = True

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = 11,
        in_chans: int = 1,
        img_size: int = 64,
        width: int = 64,
        backbone_kwargs: dict[str, Any] | None = None,
        isotropic_maps: int | str = 1,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class (>= 2), got {num_classes}")
        self.pyramid = BackbonePyramid(
            backbone,
            in_chans=in_chans,
            img_size=img_size,
            out_channels=width,
            backbone_kwargs=backbone_kwargs,
            isotropic_maps=isotropic_maps,
        )
        self.head = SemanticFuseHead(width, len(self.pyramid.out_strides), num_classes)

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        return self.head(self.pyramid(image), size=(image.shape[-2], image.shape[-1]))

    def _target(self, output: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        target = batch.get("semantic") if isinstance(batch, Mapping) else None
        expected = (output.shape[0], *output.shape[-2:])
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != expected or target.dtype != torch.long:
            got = f"{tuple(target.shape)} {target.dtype}" if isinstance(target, torch.Tensor) else repr(type(target))
            raise ValueError(f"batch['semantic'] must be int64 {expected} (labels, 255 = ignore), got {got}")
        return target

    def loss(self, output: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cross-entropy over the labelled pixels; 0 (not NaN) when a batch has none."""
        target = self._target(output, batch)
        total = F.cross_entropy(output, target, ignore_index=IGNORE_INDEX, reduction="sum")
        return {"loss": total / (target != IGNORE_INDEX).sum().clamp(min=1)}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        K = self.num_classes
        return MetricCollection(
            {
                # macro: the mean over classes present in prediction or target (torchmetrics drops absent ones)
                "miou": MulticlassJaccardIndex(K, average="macro", ignore_index=IGNORE_INDEX),
                # NaN marks a class absent from both, told apart from a real IoU of 0
                "iou_per_class": MulticlassJaccardIndex(
                    K, average="none", ignore_index=IGNORE_INDEX, zero_division=math.nan
                ),
                "pixel_acc": MulticlassAccuracy(K, average="micro", ignore_index=IGNORE_INDEX),
            }
        )

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Mapping[str, Any]) -> None:
        target = self._target(output, batch)
        device = next(iter(metrics.values())).device  # the metrics stay where the engine put them
        metrics.update(output.detach().argmax(1).to(device), target.to(device))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``{"miou", "pixel_acc"}`` in percent and ``"iou_per_class"`` (percent, None for absent classes)."""
        values = metrics.compute()
        per_class = [None if math.isnan(v) else 100.0 * v for v in values["iou_per_class"].tolist()]
        return {
            "miou": 100.0 * float(values["miou"]),
            "pixel_acc": 100.0 * float(values["pixel_acc"]),
            "iou_per_class": per_class,
        }

    def postprocess(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"semantic": output.argmax(1)}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Rectangles of random classes on background, a 2-pixel ignore border, and class-coloured noisy images."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        size, K = self.img_size, self.num_classes
        semantic = torch.zeros(batch_size, size, size, dtype=torch.long)
        for b in range(batch_size):
            for _ in range(3):
                h, w = (int(v) for v in torch.randint(max(size // 4, 1), max(size // 2, 2), (2,), generator=g))
                y, x = (int(v) for v in torch.randint(0, max(size - h, 1), (2,), generator=g))
                semantic[b, y : y + h, x : x + w] = int(torch.randint(1, K, (1,), generator=g))
        semantic[:, :2] = IGNORE_INDEX
        palette = torch.randn(K + 1, self.in_chans, generator=g)  # the last colour paints ignored pixels
        image = palette[semantic.clamp(max=K)].permute(0, 3, 1, 2)
        image = image + 0.1 * torch.randn(image.shape, generator=g)
        return {"image": image.contiguous(), "semantic": semantic}


register_task(
    TaskSpec(
        name="segmentation",
        task="segmentation",
        builder=SemanticSegmentation,
        metric="miou",
        description="any backbone + simple feature pyramid (isotropic) or FPN (hierarchical) + light fuse head",
        test_kwargs={"img_size": 32},
    )
)
