"""Training with compression applied (``vitlab train --compress METHOD --compress-args JSON``).

The method is applied to the model before the optimizer, EMA and DDP are built (after ``--init-from`` weights
load, so ``--init-from RUN --compress structured ...`` fine-tunes a pruned copy of a trained run). Methods that
train declare it on their ``compress.Method``: ``aux_loss`` terms (an attention-sparsity penalty, a MoE balance
loss, path self-distillation) are added to the loss after every forward and logged under their names;
``after_step`` runs after every optimizer step (pruned weights stay zero). Checkpoints carry the surgery
record, so ``vitlab eval`` and ``load_trained`` rebuild the compressed model.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .. import compress
from .callbacks import Callback
from .objective import ObjectiveWrapper
from .setup import json_keywords
from .state import TrainState
from .technique import Setup, Technique

__all__ = ["TECHNIQUE", "AfterStepCallback", "CompressObjective"]


class CompressObjective(ObjectiveWrapper):
    """The wrapped objective's loss plus the applied methods' auxiliary terms (each logged by name)."""

    def __init__(self, base: Any, model: nn.Module) -> None:
        super().__init__(base)
        self.model = model  # the unwrapped model: its modules hold what the forward stashed

    def step(self, net: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        out = self.base.step(net, batch, step)
        terms = compress.aux_losses(self.model)
        if not terms:
            return out
        loss = out["loss"] + sum(terms.values())
        return {**out, "loss": loss, **{k: v.detach() for k, v in terms.items()}}


class AfterStepCallback(Callback):
    """Runs the applied methods' ``after_step`` after every optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def after_step(self, state: TrainState) -> None:
        compress.after_step(self.model)


def _kwargs(cfg: Any) -> dict[str, Any]:
    return json_keywords("--compress-args", cfg.compression.compress_args)


def _validate(cfg: Any) -> None:
    c = cfg.compression
    if c.compress_args and not c.compress:
        raise ValueError("--compress-args needs --compress METHOD")
    if c.compress:
        compress.get_method(c.compress)  # unknown name: a ValueError suggesting close ones
        _kwargs(cfg)


def _adapt_model(setup: Setup) -> None:
    # before the EMA copy and DDP, so both hold the compressed model; checkpoints replay it (engine/surgery.py)
    if setup.cfg.compression.compress:
        compress.apply(setup.model, setup.cfg.compression.compress, **_kwargs(setup.cfg))


def _install(setup: Setup) -> None:
    setup.objective = CompressObjective(setup.objective, setup.model)
    setup.callbacks.append(AfterStepCallback(setup.model))


TECHNIQUE = Technique(
    flag="--compress",
    what="compression while training",
    # --init-from may carry compression records (inference.init_from_checkpoint) whose hooks keep training
    is_on=lambda cfg: bool(cfg.compression.compress or cfg.model.init_from),
    validate=_validate,
    adapt_model=_adapt_model,
    install=_install,
)
