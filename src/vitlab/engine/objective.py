"""What is trained and how it is scored: the ``Objective`` protocol and image classification.

The shape of timm's ``timm/task/`` (``TrainingTask.forward`` returns ``{"loss", "output"}``): the loop hands an
objective the model and a dict batch and gets back the loss, the output and scalar logs; the objective owns its
evaluation metrics (torchmetrics, which sum over torchrun ranks themselves), its primary metric and that metric's
direction, on which the best checkpoint and ``summary.json`` key. Techniques that change the loss (distillation,
multi-resolution, token-reduction consistency) wrap an objective (``ObjectiveWrapper``); task models get
``TaskObjective`` (``engine/task_objective.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from .evaluate import EvalResult

__all__ = ["ClassificationObjective", "Objective", "ObjectiveWrapper", "logits_of", "set_sync"]

Batch = dict[str, Any]


def logits_of(out: Any) -> torch.Tensor:
    """The class logits of a classifier's output; a distilled DeiT's (cls, dist) pair counts both heads."""
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out


class Objective:
    """The loss of a batch and the metrics of a data set.

    ``step(net, batch, step) -> {"loss": scalar tensor, "output": ..., **scalar logs}``: ``net`` is the model as
    the loop runs it (DDP- or compile-wrapped); logs are per-sample means on this process's shard.
    ``evaluate(model, batches) -> dict`` of JSON-able values holding ``primary_metric``.
    """

    primary_metric: str = "loss"
    higher_is_better: bool = False

    def step(self, net: nn.Module, batch: Batch, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, batches: Any, device: torch.device, amp: Any, sync: bool = False
    ) -> dict[str, Any]:
        """Metrics over ``batches``; ``sync``: sum them over torchrun ranks (each rank scored its shard)."""
        raise NotImplementedError

    def is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


class ObjectiveWrapper(Objective):
    """An objective that changes another's loss; metrics and evaluation stay the wrapped one's."""

    def __init__(self, base: Objective) -> None:
        self.base = base
        self.primary_metric, self.higher_is_better = base.primary_metric, base.higher_is_better

    def __getattr__(self, name: str) -> Any:  # criterion, logs, classes, ... of the innermost objective
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def evaluate(
        self, model: nn.Module, batches: Any, device: torch.device, amp: Any, sync: bool = False
    ) -> dict[str, Any]:
        return self.base.evaluate(model, batches, device, amp, sync)


class ClassificationObjective(Objective):
    """Cross-entropy with label smoothing; soft targets (mixup/cutmix) use soft cross-entropy.

    The batch holds ``image`` (B, C, H, W), ``label`` (B,) and, when a callback mixed it, ``target`` (B, K).
    ``forward_kwargs`` (channel subsets) are passed to the model.
    """

    primary_metric = "top1"
    higher_is_better = True

    def __init__(self, classes: list[str], label_smoothing: float = 0.0) -> None:
        self.classes = list(classes)
        self.label_smoothing = label_smoothing
        self._soft = SoftTargetCrossEntropy()

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():  # mixed targets already carry the label smoothing
            return self._soft(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def logs(self, out: Any, batch: Batch) -> dict[str, torch.Tensor]:
        return {"acc": (logits_of(out).argmax(-1) == batch["label"]).float().mean()}

    def step(self, net: nn.Module, batch: Batch, step: int) -> dict[str, Any]:
        out = net(batch["image"], **batch.get("forward_kwargs", {}))
        logits = out[0] if isinstance(out, tuple) else out  # training scores the class head
        loss = self.criterion(logits, batch.get("target", batch["label"]))
        return {"loss": loss, "output": out, **self.logs(out, batch)}

    @torch.inference_mode()
    def evaluate(
        self, model: nn.Module, batches: Any, device: torch.device, amp: Any, sync: bool = False
    ) -> dict[str, Any]:
        """Top-1/top-5, loss, per-class accuracy and confusion over ``batches`` (this process's shards)."""
        n = len(self.classes)
        k = min(5, n)
        metrics = MetricCollection(
            {
                "confusion": MulticlassConfusionMatrix(num_classes=n),
                "correct5": SumMetric().set_dtype(torch.float64),
                "loss_sum": SumMetric().set_dtype(torch.float64),
            }
        ).to(device)
        set_sync(metrics, sync)
        was_training = model.training
        model.eval()
        for batch in batches:
            x, y = batch["image"].to(device), batch["label"].to(device)
            with amp():
                logits = model(x).float()
            topk = logits.topk(k, dim=-1).indices
            metrics["confusion"].update(topk[:, 0], y)
            metrics["correct5"].update((topk == y[:, None]).any(-1).sum().double())
            metrics["loss_sum"].update(F.cross_entropy(logits, y, reduction="sum").double())
        model.train(was_training)
        return _classification_summary(metrics, self.classes).__dict__


def set_sync(metrics: MetricCollection, sync: bool) -> None:
    """Sum over ranks in ``compute()`` only when every rank evaluates (torchmetrics would wait for the others)."""
    for metric in metrics.values():
        # NOTE: torchmetrics copies the flag into _to_sync at construction; compute() reads the copy
        metric.sync_on_compute = metric._to_sync = sync


def _classification_summary(metrics: MetricCollection, classes: list[str]) -> EvalResult:
    # every metric sums over torchrun ranks in compute(); counts stay exact integers
    confusion = metrics["confusion"].compute().long().cpu()
    count = int(confusion.sum())
    if count == 0:
        raise ValueError("evaluation data set is empty")
    correct1 = int(confusion.trace())
    totals = confusion.sum(1).clamp(min=1)
    return EvalResult(
        top1=round(100.0 * correct1 / count, 3),
        top5=round(100.0 * float(metrics["correct5"].compute()) / count, 3),
        loss=round(float(metrics["loss_sum"].compute()) / count, 5),
        num_images=count,
        per_class={c: round(100.0 * confusion[i, i].item() / totals[i].item(), 2) for i, c in enumerate(classes)},
        confusion=confusion.tolist(),
    )
