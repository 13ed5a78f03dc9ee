"""The task-model contract: ``TaskSpec`` (one registry row) and ``TaskModel`` (what the engine calls).

A task model (DESIGN.md "Tasks", kinds H and C) is a backbone by name, a neck and a head. The engine reaches it
only through ``TaskModel``'s methods, so one objective trains, scores and exports every task: ``forward`` maps the
normalised image to the raw output, ``loss`` turns output and batch into ``{"loss": ...}``, and the metric methods
wrap torchmetrics (imported lazily, so ``import vitlab`` stays light). Reuses ``models.Paper`` for the paper
reference. Batches are dicts; each task declares its ``batch_keys`` and ``target_keys`` and a tiny
``example_batch`` that the registry-wide contract test (tests/tasks/) feeds through every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..models import Paper

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["TaskModel", "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """One registered task model: how to build it, what it reports, and its declared capabilities.

    Args:
        name: the registry name (``create_task_model(name)``).
        task: the task it solves ("segmentation", "detection", ...).
        builder: the ``TaskModel`` subclass (or factory) built with ``backbone=, num_classes=, in_chans=,
            img_size=, backbone_kwargs=`` plus ``kwargs`` and the user's keywords.
        paper: the PAPERS.md paper it implements; None for a generic task model.
        kind: the PAPERS.md kind ("H" task head over a backbone, "C" complete system).
        metric: the summary key the task reports (its model's ``primary_metric``); ``higher_is_better`` its direction.
        ref_metric: the paper's published value of ``metric`` (``ref_source`` says where), if any.
        ref_params_m: the paper's parameter count (millions), if published.
        exportable: ``torch.export`` works on ``forward``; if not, ``export_reason`` says why.
        dataset: the dataset it trains on by default (a ``vitlab data`` name).
        num_classes, in_chans, img_size: defaults for that dataset (``num_classes`` counts the background).
        test_backbones: two backbones of different topology the contract test builds it on.
        test_kwargs: keywords that make the contract test's model tiny (e.g. ``img_size``).
        backbones: which backbone topologies it takes: "any", "isotropic" or "hierarchical" (then
            ``backbones_reason`` says why, and the two ``test_backbones`` are of that topology, different families).
        data_adapter: for a task that trains on a multi-view set (e.g. render3d, its ``dataset`` or
            ``--dataset``): ``data_adapter(task_kwargs)`` -> ``(views per scene, convert)`` or ``(views, convert,
            (mean, std))``; ``convert`` maps the set's collated batch to this task's batch with ``image`` left uint8
            (the engine's loader normalises it once, with the set's mean/std, or the third item's, e.g. a flow
            model's fixed [-1, 1] range). A task whose default ``dataset`` is multi-view trains on that set only.
    """

    name: str
    task: str
    builder: Callable[..., TaskModel]
    metric: str
    higher_is_better: bool = True
    paper: Paper | None = None
    kind: str = "H"
    kwargs: dict[str, Any] = field(default_factory=dict)
    ref_metric: float | None = None
    ref_source: str = ""
    ref_params_m: float | None = None
    exportable: bool = True
    export_reason: str = ""
    dataset: str = "fmnist_scenes"
    num_classes: int = 11
    in_chans: int = 1
    img_size: int = 64
    default_backbone: str = "vit_micro_patch4_28"
    test_backbones: tuple[str, ...] = ("vit_micro_patch4_28", "tiny_vit_1m_28")
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    backbones: str = "any"
    backbones_reason: str = ""
    description: str = ""
    data_adapter: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class TaskModel(nn.Module):
    """Base class of task models: the interface the engine calls, input checks, and the shared attributes.

    Subclasses set ``task_name``, ``target_keys``, ``primary_metric`` and ``higher_is_better`` and implement
    ``forward_image``, ``loss``, ``build_metrics``, ``update_metrics``, ``summarize_metrics``, ``postprocess``
    and ``example_batch``.
    """

    task_name: str = ""
    batch_keys: tuple[str, ...] = ("image",)
    target_keys: tuple[str, ...] = ()
    primary_metric: str = ""
    higher_is_better: bool = True

    def __init__(self, backbone: str, *, num_classes: int, in_chans: int, img_size: int) -> None:
        super().__init__()
        for key, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
            _check_positive(key, value)
        if not isinstance(backbone, str) or not backbone:
            raise ValueError(f"backbone must be a model name, got {backbone!r}")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size

    def check_image(self, image: Any) -> None:
        """Raise a ``ValueError`` naming the input unless ``image`` is a float ``(B, in_chans, H, W)`` tensor."""
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a tensor (B, {self.in_chans}, H, W), got {type(image).__name__}")
        if image.ndim != 4 or image.shape[1] != self.in_chans:
            raise ValueError(
                f"image must be (B, {self.in_chans}, H, W) for {self.task_name!r} built with in_chans="
                f"{self.in_chans}, got shape {tuple(image.shape)}"
            )
        if not image.is_floating_point():
            raise ValueError(f"image must be a normalised float tensor, got dtype {image.dtype}")

    def forward(self, batch_or_image: torch.Tensor | Mapping[str, Any]) -> Any:
        """The normalised image ``(B, C, H, W)`` (or a batch dict holding it as ``"image"``) -> raw output."""
        if isinstance(batch_or_image, Mapping):
            if "image" not in batch_or_image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(batch_or_image)})")
            batch_or_image = batch_or_image["image"]
        self.check_image(batch_or_image)
        return self.forward_image(batch_or_image)

    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Keywords the engine passes to ``forward`` besides the image (a multi-task model: which tasks)."""
        return {}

    def forward_image(self, image: torch.Tensor) -> Any:
        """The task's computation on a checked image tensor."""
        raise NotImplementedError

    def loss(self, output: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, **extra scalar logs}`` for ``output = self(batch["image"])``."""
        raise NotImplementedError

    def build_metrics(self) -> MetricCollection:
        """A fresh torchmetrics collection on the CPU (the engine moves and syncs it)."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        """Accumulate one batch into ``metrics``."""
        raise NotImplementedError

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``metrics.compute()`` as plain JSON-able numbers; holds ``primary_metric``."""
        raise NotImplementedError

    def postprocess(self, output: Any) -> dict[str, torch.Tensor]:
        """Raw output -> predictions in the batch schema's terms (e.g. ``{"semantic": (B, H, W) int64}``)."""
        raise NotImplementedError

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A tiny valid batch (inputs and targets) at ``img_size``, deterministic for a seeded ``generator``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"task={self.task_name!r}, backbone={self.backbone_name!r}, num_classes={self.num_classes}"
