"""Training with token reduction (``vitlab train --reduce METHOD``): the model trains as it will run.

The method is applied to the model before training (``vitlab.reduce.apply``); its checkpoints record the
method and keywords, so ``vitlab eval`` / ``load_trained`` rebuild the reduced model. Fine-tuning a trained
run is ``--init-from RUN``.

MCTF's token-reduction consistency (arXiv:2403.10030, Sec. 3.4; its official training engine): each step
also runs the model with a random lighter reduction (a fraction ``u ~ U[0, 1)`` of the trained amount,
drawn once per step); both outputs get the classification loss, and the class token after the final norm
of the trained reduction is pulled towards the lighter one's (detached) by a squared error averaged over
channels, counted only for samples whose predicted probability of their label exceeds a threshold.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..reduce import METHODS, apply, schedule_of, set_schedule
from .objective import ObjectiveWrapper
from .technique import Technique

__all__ = ["ReduceObjective", "ReduceTrainer", "build_reduce_trainer", "reduce_kwargs"]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reduce_kwargs(r: str = "", keep: float = 0.0, layers: str = "") -> dict[str, Any]:
    """``vitlab.reduce.apply`` keywords from the ``--reduce-*`` flags (only those given)."""
    kw: dict[str, Any] = {}
    if r:
        try:
            values = [int(v) for v in r.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--reduce-r must be an integer or a comma list of integers, got {r!r}") from None
        kw["r"] = values[0] if len(values) == 1 and "," not in r else values
    if keep:
        kw["keep"] = keep
    if layers:
        try:
            kw["layers"] = [int(v) for v in layers.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--reduce-layers must be a comma list of block indices, got {layers!r}") from None
    return kw


def _lighter(amounts: list[float], u: float, merges_count: bool) -> list[float]:
    """The schedule scaled towards no reduction by ``u`` in [0, 1): counts shrink, keep rates grow to 1."""
    if merges_count:
        return [int(a * u) for a in amounts]
    return [0.0 if not a or 1 - (1 - a) * u >= 1.0 else 1 - (1 - a) * u for a in amounts]


class ReduceTrainer:
    """One training forward of a reduced model: ``(out, loss) = trainer(net, x, target, labels)``.

    Without consistency it is one forward and the criterion. With ``consistency > 0`` it adds the
    lighter-reduction forward and the gated class-token consistency term (module docstring).
    """

    def __init__(
        self, model: nn.Module, method: str, criterion: Criterion, consistency: float = 0.0, threshold: float = 0.0
    ) -> None:
        if consistency < 0:
            raise ValueError(f"--reduce-consistency must be >= 0, got {consistency}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"--reduce-consistency-threshold must be in [0, 1), got {threshold}")
        self.model, self.criterion = model, criterion
        self.consistency, self.threshold = consistency, threshold
        self.amounts = schedule_of(model)
        self.merges_count = "r" in inspect.signature(METHODS[method].schedule).parameters
        self._cls: list[torch.Tensor] = []
        if consistency > 0:
            # the class token after the final norm, whichever wrapper (DDP) runs the forward
            model.norm.register_forward_hook(lambda _m, _i, out: self._cls.append(out[:, 0]))

    def __call__(
        self, net: nn.Module, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
    ) -> tuple[Any, torch.Tensor]:
        self._cls.clear()
        out = net(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = self.criterion(logits, target)
        if self.consistency <= 0:
            return out, loss
        u = float(torch.rand(()))
        set_schedule(self.model, _lighter(self.amounts, u, self.merges_count))
        try:
            light = net(x)
        finally:
            set_schedule(self.model, self.amounts)
        light_logits = light[0] if isinstance(light, tuple) else light
        loss = loss + self.criterion(light_logits, target)
        reduced_cls, light_cls = self._cls[0], self._cls[-1]
        per_sample = (light_cls.detach() - reduced_cls).pow(2).mean(dim=1)
        confident = (logits.softmax(-1).gather(1, labels[:, None]).squeeze(1) > self.threshold).float()
        term = (per_sample * confident).sum() / confident.sum().clamp(min=1.0)
        return out, loss + self.consistency * term


def build_reduce_trainer(
    model: nn.Module,
    method: str,
    kwargs: dict[str, Any],
    criterion: Criterion,
    consistency: float = 0.0,
    threshold: float = 0.0,
) -> ReduceTrainer:
    """Apply ``method`` to ``model`` in place and return the step that trains it (consistency works with any
    method; MCTF introduced it)."""
    apply(model, method, **kwargs)
    return ReduceTrainer(model, method, criterion, consistency, threshold)


class ReduceObjective(ObjectiveWrapper):
    """The wrapped objective's loss on the reduced model, plus MCTF's consistency term when asked."""

    def __init__(self, base: Any, trainer: ReduceTrainer) -> None:
        super().__init__(base)
        self.trainer = trainer

    def step(self, net: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        target = batch.get("target", batch["label"])
        out, loss = self.trainer(net, batch["image"], target, batch["label"])
        return {"loss": loss, "output": out, **self.base.logs(out, batch)}


def _kwargs(cfg: Any) -> dict[str, Any]:
    red = cfg.reduction
    return reduce_kwargs(red.reduce_r, red.reduce_keep, red.reduce_layers)


def _adapt_model(setup: Any) -> None:
    # before the EMA copy and DDP, so both hold the reduced model; checkpoints replay it (engine/surgery.py)
    from . import surgery

    surgery.apply(setup.model, "reduce", setup.cfg.reduction.reduce, **_kwargs(setup.cfg))


def _install(setup: Any) -> None:
    red = setup.cfg.reduction
    trainer = ReduceTrainer(
        setup.model, red.reduce, setup.objective.criterion, red.reduce_consistency, red.reduce_consistency_threshold
    )
    setup.objective = ReduceObjective(setup.objective, trainer)


def _validate(cfg: Any) -> None:
    if not cfg.reduction.reduce and cfg.reduction.reduce_consistency:
        raise ValueError("--reduce-consistency needs --reduce METHOD")


TECHNIQUE = Technique(
    flag="--reduce",
    what="token reduction",
    is_on=lambda cfg: bool(cfg.reduction.reduce),
    excludes=("--resolutions", "--hcs"),
    validate=_validate,
    adapt_model=_adapt_model,
    install=_install,
)
