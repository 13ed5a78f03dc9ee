"""The training loop: iterate, step, fire callbacks. It never names a technique.

What is trained is the ``Objective`` (``engine/objective.py``); everything else that reacts is a ``Callback``
(``engine/callbacks.py``). Under torchrun the loop splits each global batch over the processes and averages
the loss and logs over them, so every rank sees the global-batch figures.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .callbacks import CallbackList
from .distributed import all_sum, shard_dict
from .objective import Objective
from .state import TrainState

__all__ = ["fit", "to_device"]


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move a dict batch's tensors (and lists of tensors) to ``device``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and torch.is_tensor(value[0]):
            value = [v.to(device, non_blocking=True) for v in value]
        out[key] = value
    if channels_last and device.type == "cuda":
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _forward(state: TrainState, objective: Objective, callbacks: CallbackList, batch: dict[str, Any]) -> Any:
    """The step's forward and loss; ``state.last`` gets the global-batch mean loss and logs."""
    env = state.env
    n_global, scale = batch["image"].shape[0], 1.0
    with state.autocast():
        callbacks.fire("on_batch", state, batch)
        if env.enabled:
            if n_global < env.world_size:
                raise ValueError(f"a batch of {n_global} images cannot be split over {env.world_size} processes")
            batch = shard_dict(env, batch)
            n_local = batch["image"].shape[0]
            scale = 1.0 if n_local * env.world_size == n_global else n_local * env.world_size / n_global
        callbacks.fire("before_forward", state, batch)
        out = objective.step(state.net, batch, state.step)
    logs = {k: v for k, v in out.items() if k not in ("loss", "output")}
    if env.enabled:  # a NaN on any rank stops every rank
        n_local = batch["image"].shape[0]
        values = [out["loss"].detach().float() * n_local, *(v.detach().float() * n_local for v in logs.values())]
        totals = all_sum(env, torch.stack(values)) / n_global
        state.last = {"loss": totals[0], **dict(zip(logs, totals[1:], strict=True))}
    else:
        state.last = {"loss": out["loss"], **logs}
    state.last["batch_size"] = n_global
    return out["loss"] * scale if scale != 1.0 else out["loss"]


def _optimize(state: TrainState, loss: torch.Tensor) -> None:
    opt, scaler, clip = state.optimizer, state.scaler, state.cfg.optim.clip_grad
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients
    if clip > 0:
        nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    if scaler is not None:
        scaler.step(opt)  # skips the step when fp16 gradients overflowed
        scaler.update()
    else:
        opt.step()
    state.step += 1
    state.scheduler.step_update(state.step)


def fit(state: TrainState, objective: Objective, callbacks: CallbackList) -> None:
    """Train ``state.model`` from ``state.step`` to ``state.total_steps`` (or an early stop)."""
    stop_at = state.cfg.stop_after_steps
    callbacks.fire("on_fit_start", state)
    state.net.train()
    state.epoch = state.step // state.steps_per_epoch
    try:
        while state.step < state.total_steps:
            start = state.step % state.steps_per_epoch
            for batch in state.train_loader.iter_batches(state.epoch, start_batch=start):
                batch = to_device(batch, state.device, state.cfg.channels_last)
                loss = _forward(state, objective, callbacks, batch)
                callbacks.fire("after_forward", state, state.last)
                _optimize(state, loss)
                state.stop = bool(stop_at) and state.step >= stop_at
                callbacks.fire("after_step", state)
                if state.stop or state.step >= state.total_steps:
                    break
            if state.stop and state.step < state.total_steps:
                state.say(f"stopped after {state.step} steps (--stop-after-steps); resume with --resume {state.run}")
                break
            state.epoch += 1
            callbacks.fire("on_epoch_end", state)
    finally:
        callbacks.fire("on_fit_end", state)
