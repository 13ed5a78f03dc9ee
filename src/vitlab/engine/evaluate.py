"""``vitlab eval``'s classification scores: top-1/top-5, loss, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .distributed import DistEnv, shard_dict

__all__ = ["EvalResult", "evaluate_model", "shard_batches"]


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float
    loss: float
    num_images: int
    per_class: dict[str, float]  # class name -> top-1 percent
    confusion: list[list[int]]  # [true][predicted]

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


def shard_batches(batches: Any, env: DistEnv | None) -> Iterator[dict[str, Any]]:
    """Dict batches, each cut to this rank's contiguous shard under torchrun."""
    for batch in batches:
        if env is not None and env.enabled:
            batch = shard_dict(env, batch)
            if batch["image"].shape[0] == 0:
                continue
        yield batch


def evaluate_model(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    classes: list[str],
    amp: bool = False,
    dist_env: DistEnv | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> EvalResult:
    """Score ``model`` on every batch of ``loader`` (its epoch-0 order).

    Under torchrun each rank scores its shard of every batch and the metrics sum over ranks, so every rank
    returns the result one process would.
    """
    from .objective import ClassificationObjective

    autocast = partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp)
    sync = dist_env is not None and dist_env.enabled
    batches = shard_batches(loader.iter_batches(0), dist_env)
    res = ClassificationObjective(classes).evaluate(model, batches, device, autocast, sync)
    return EvalResult(**res)
