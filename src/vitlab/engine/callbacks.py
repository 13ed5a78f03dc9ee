"""Everything that reacts during training but is not the loss: callbacks on the loop's events.

Lightning's ``Callback`` and composer's ``Algorithm.match/apply`` are the anchors. The loop fires, in order:
``on_fit_start``; per step ``on_batch`` (the global batch, before it is split over processes: mixup),
``before_forward`` (this process's shard: channel sampling), ``after_forward`` (the loss is known: the NaN
guard), ``after_step`` (after the optimizer step: EMA, logging, checkpoints); ``on_epoch_end`` (evaluation,
the epoch checkpoint); ``on_fit_end``. A callback with state to resume returns it from ``state_dict`` and gets
it back in ``load_state_dict`` (the keys share the checkpoint's training-state file).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from timm.utils import ModelEmaV3

from ..errors import TrainingDivergedError
from .state import TrainState, save_checkpoint

__all__ = [
    "Callback",
    "CallbackList",
    "Checkpointer",
    "Ema",
    "Evaluator",
    "MixBatch",
    "NanGuard",
    "StepLogger",
]


class Callback:
    """A no-op at every event; subclasses override what they react to."""

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_batch(self, state: TrainState, batch: dict[str, Any]) -> None: ...
    def before_forward(self, state: TrainState, batch: dict[str, Any]) -> None: ...
    def after_forward(self, state: TrainState, out: dict[str, Any]) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_fit_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, blob: dict[str, Any]) -> None: ...


class CallbackList:
    """Fires an event on every callback, in the order given."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def fire(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for cb in self.callbacks for k, v in cb.state_dict().items()}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.load_state_dict(blob)


class MixBatch(Callback):
    """Mixup/cutmix (or any ``mix(x, y) -> (x, soft target)``) on the global batch, so every process count
    mixes alike; the objective sees the soft target as ``batch["target"]``."""

    def __init__(self, mix: Any) -> None:
        self.mix = mix

    def on_batch(self, state: TrainState, batch: dict[str, Any]) -> None:
        batch["image"], batch["target"] = self.mix(batch["image"], batch["label"])


class Ema(Callback):
    """timm's ``ModelEmaV3`` of the weights; evaluation and the best checkpoint score it."""

    def __init__(self, state_model: torch.nn.Module, decay: float) -> None:
        self.ema = ModelEmaV3(state_model, decay=decay)

    def on_fit_start(self, state: TrainState) -> None:
        state.scored = self.ema.module

    def after_step(self, state: TrainState) -> None:
        self.ema.update(state.model, step=state.step)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.module.state_dict()}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        if "ema" in blob:
            self.ema.module.load_state_dict(blob["ema"])


class NanGuard(Callback):
    """Stop on a non-finite loss (on any rank: the loss is the global mean), naming the step and what is kept."""

    def after_forward(self, state: TrainState, out: dict[str, Any]) -> None:
        loss = state.last["loss"]
        if torch.isfinite(loss):
            return
        last = state.ckpt_dir / "last.safetensors"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        state.log({"step": state.step, "event": "diverged", "loss": loss.item()})
        raise TrainingDivergedError(
            f"loss became {loss.item()} at step {state.step} (epoch {state.epoch}); stopping, {kept}. "
            "Try a lower --lr, a longer --warmup-epochs or --clip-grad 1.0."
        )


class StepLogger(Callback):
    """A metrics line every ``every`` steps: loss, the objective's logs, learning rate and images per second."""

    def __init__(self, every: int, bar: Any = None) -> None:
        self.every, self.bar = every, bar  # the run's progress bar, set once the run has one
        self.t_last, self.seen = time.perf_counter(), 0

    def after_step(self, state: TrainState) -> None:
        self.seen += state.last["batch_size"]
        self.bar.update(1)
        if state.step % self.every and state.step != state.total_steps:
            return
        now = time.perf_counter()
        rec: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "loss": state.last["loss"].item()}
        rec.update({k: round(v.item(), 4) for k, v in state.last.items() if k not in ("loss", "batch_size")})
        rec["lr"] = state.optimizer.param_groups[0]["lr"]
        rec["img_per_s"] = round(self.seen / (now - self.t_last), 1)
        state.log(rec)
        shown = {k: f"{v:.3f}" for k, v in rec.items() if k not in ("step", "epoch", "lr", "img_per_s")}
        self.bar.set_postfix(**shown, img_s=f"{rec['img_per_s']:.0f}")
        self.t_last, self.seen = now, 0


class Evaluator(Callback):
    """Score the model (its EMA when kept) with the objective at each epoch end; log ``<split>_<metric>``."""

    def __init__(self, objective: Any) -> None:
        self.objective = objective
        self.seconds = 0.0

    def on_epoch_end(self, state: TrainState) -> None:
        from .evaluate import shard_batches

        t0 = time.perf_counter()
        batches = shard_batches(state.eval_loader.iter_batches(0), state.env)
        res = self.objective.evaluate(
            state.scored or state.model, batches, state.device, state.autocast, state.env.enabled
        )
        self.seconds += time.perf_counter() - t0
        state.last_eval = res
        scalars = {f"{state.eval_split}_{k}": v for k, v in res.items() if isinstance(v, (int, float))}
        scalars.pop(f"{state.eval_split}_num_images", None)
        state.log({"epoch": state.epoch, "step": state.step, **scalars})
        shown = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        state.say(f"epoch {state.epoch}: {shown}")
        state.net.train()


class Checkpointer(Callback):
    """``last`` every ``every`` steps, on an early stop and at each epoch end; ``best`` by the objective's
    primary metric on the evaluation split (weights of the scored module)."""

    def __init__(self, objective: Any, every: int, callbacks: CallbackList) -> None:
        self.objective, self.every, self.callbacks = objective, every, callbacks
        self.best: float | None = None

    def _save_last(self, state: TrainState) -> None:
        save_checkpoint(state, "last", {**self.callbacks.state_dict()})

    def after_step(self, state: TrainState) -> None:
        if (self.every and state.step % self.every == 0) or state.stop:
            self._save_last(state)

    def on_epoch_end(self, state: TrainState) -> None:
        value = state.last_eval.get(self.objective.primary_metric)
        improved = value is not None and self.objective.is_better(value, self.best)
        if improved:
            self.best = value
        self._save_last(state)
        if improved and state.env.is_main:
            from .checkpoint import save_weights

            meta = {**state.meta, "step": state.step, self.objective.primary_metric: value}
            save_weights(state.scored or state.model, state.ckpt_dir / "best.safetensors", meta)

    def state_dict(self) -> dict[str, Any]:
        # "best_top1": the key older runs resume from
        return {"best_top1": -1.0 if self.best is None else self.best}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        best = blob.get("best_top1", -1.0)
        self.best = None if best == -1.0 else float(best)
