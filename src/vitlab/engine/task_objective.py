"""Task models (``vitlab.tasks``) as objectives: the model owns its loss, metrics and primary metric.

``vitlab train --task segmentation --backbone vit_micro_patch4_28 --dataset fmnist_scenes`` builds the task
model (``tasks.create_task_model``) in place of a classifier; the loop, callbacks, checkpoints and resume are
the same as for classification.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .objective import Objective, set_sync
from .technique import Technique

__all__ = ["TaskObjective"]


def _unwrap(net: nn.Module) -> nn.Module:
    for attr in ("module", "_orig_mod"):  # DDP, torch.compile
        inner = getattr(net, attr, None)
        if isinstance(inner, nn.Module):
            net = inner
    return net


class TaskObjective(Objective):
    """``step`` runs the model on ``batch["image"]`` and asks it for the loss; ``evaluate`` fills its metrics."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.primary_metric = model.primary_metric
        self.higher_is_better = model.higher_is_better

    def step(self, net: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        out = net(batch["image"], **self.model.forward_kwargs(batch))
        res = dict(self.model.loss(out, batch))
        res["output"] = out
        return res

    @torch.inference_mode()
    def evaluate(
        self, model: nn.Module, batches: Any, device: torch.device, amp: Any, sync: bool = False
    ) -> dict[str, Any]:
        task = _unwrap(model)
        metrics = task.build_metrics().to(device)
        set_sync(metrics, sync)
        was_training = model.training
        model.eval()
        count = 0
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with amp():
                out = model(batch["image"], **task.forward_kwargs(batch))
            task.update_metrics(metrics, out, batch)
            count += batch["image"].shape[0]
        model.train(was_training)
        if count == 0:
            raise ValueError("evaluation data set is empty")
        return {**task.summarize_metrics(metrics), "num_images": count}


_CLASSIFICATION_ONLY = ("--teacher", "--distill-from", "--resolutions", "--native-after", "--hcs", "--reduce")


def _validate(cfg: Any) -> None:
    if not cfg.task.task and (cfg.task.task_args or cfg.task.backbone_args):
        raise ValueError("--task-args and --backbone-args go with --task")
    if cfg.task.task and cfg.model.model_args:
        raise ValueError(
            "--model-args is the classifier's keywords; with --task, give the backbone's as --backbone-args"
        )
    if cfg.task.task:
        from ..tasks import get_task
        from .setup import json_keywords

        get_task(cfg.task.task)  # unknown names fail here, with suggestions
        json_keywords("--task-args", cfg.task.task_args)
        json_keywords("--backbone-args", cfg.task.backbone_args)
        if cfg.optim.mixup or cfg.optim.cutmix:
            raise ValueError("--task: --mixup/--cutmix mix classification labels; turn them off for task models")


TECHNIQUE = Technique(
    flag="--task",
    what="a task model",
    is_on=lambda cfg: bool(cfg.task.task),
    excludes=_CLASSIFICATION_ONLY,
    validate=_validate,
    install=lambda setup: setattr(setup, "objective", TaskObjective(setup.model)),
)
