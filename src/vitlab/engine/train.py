"""``vitlab train``: put a run together from its config and hand it to the loop.

The pieces: data (``setup.py``), the model (a classifier, or a task model with ``--task``), the objective
(``objective.py``, ``task_objective.py``), the techniques the config turns on (``techniques.py``: each wraps the
objective or adds callbacks), the generic callbacks (``callbacks.py``: mixup, EMA, the NaN guard, logging,
evaluation, checkpoints) and the loop (``loop.py``). AdamW, warmup + cosine, EMA and mixup are timm's.
Multi-process training under torchrun is ``distributed.py``; exact resume is ``state.py``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from .. import __version__
from ..errors import CheckpointError
from .accel import CompiledOrEager, amp_setup
from .callbacks import Callback, CallbackList, Checkpointer, Ema, Evaluator, MixBatch, NanGuard, StepLogger
from .checkpoint import save_weights
from .config import RunConfig, config_to_dict, load_config
from .distributed import DistEnv, broadcast_from_main, seed_rank, setup_distributed, teardown_distributed, wrap_model
from .inference import evaluate_run, init_from_checkpoint
from .loop import fit
from .objective import ClassificationObjective
from .plots import plot_curves
from .setup import (
    backbone_name,
    build_datasets,
    build_loader,
    build_model,
    json_keywords,
    model_img_size,
    resolve_device,
    split_holdout,
)
from .state import TrainState, restore_state, truncate_metrics
from .surgery import surgery_of
from .technique import Setup
from .techniques import install_techniques

__all__ = ["SHORT_RUN_STEPS", "train"]

SHORT_RUN_STEPS = 500  # fewer steps than this: the run is probably too short to learn much, say so


def _new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{backbone_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(cfg.out) / name
    if (run / "config.json").exists():
        raise CheckpointError(f"run directory {str(run)!r} already holds a run; use --resume {run} or another --name")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    return run


def train(cfg: RunConfig | None = None, resume: str | Path | None = None) -> Path:
    """Train, evaluating after each epoch; returns the run directory. ``resume`` continues a run directory."""
    if resume is not None:
        run = Path(resume)
        if not (run / "config.json").is_file():
            raise CheckpointError(f"--resume {str(run)!r}: no config.json there; expected a vitlab run directory")
        cfg = load_config(run / "config.json")
        cfg.stop_after_steps = 0  # the early stop belonged to the interrupted invocation
    cfg = cfg or RunConfig()
    cfg.validate()
    env, device = setup_distributed(resolve_device(cfg.device), cfg.data.batch_size)
    try:
        return _run(cfg, resume, env, device)
    finally:
        teardown_distributed(env)


def _data(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Loaders for training, per-epoch evaluation (held-out part or test split) and the final test."""
    data = build_datasets(cfg)
    in_chans = cfg.model.in_chans or data["train"].in_chans
    train_set, eval_split = data["train"], "test"
    if cfg.data.val_fraction:
        train_set, data["val"] = split_holdout(train_set, cfg.data.val_fraction, cfg.seed)
        eval_split = "val"
    loader = partial(build_loader, cfg=cfg, in_chans=in_chans, device=device)
    return {
        "classes": data["train"].classes,
        "in_chans": in_chans,
        "train": loader(train_set, train=True),
        "eval": loader(data[eval_split], train=False),
        "eval_split": eval_split,
    }


def _schedule(cfg: RunConfig, steps_per_epoch: int) -> int:
    o = cfg.optim
    total = o.steps or max(1, math.ceil(o.epochs * steps_per_epoch))
    if total < SHORT_RUN_STEPS and not o.steps:
        warnings.warn(
            f"this run is only {total} optimizer steps ({o.epochs:g} epochs of {steps_per_epoch} batches); the "
            "default recipe is sized for Fashion-MNIST's 60,000 images. Ask for more with "
            f"--steps {2 * SHORT_RUN_STEPS} or --epochs {math.ceil(2 * SHORT_RUN_STEPS / steps_per_epoch)}",
            stacklevel=3,
        )
    return total


def _optimizer(cfg: RunConfig, model: torch.nn.Module, steps_per_epoch: int, total_steps: int) -> tuple[Any, Any]:
    o = cfg.optim
    optimizer = create_optimizer_v2(model, "adamw", lr=o.lr, weight_decay=o.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=o.min_lr,
        warmup_t=int(o.warmup_epochs * steps_per_epoch),
        warmup_lr_init=o.lr * 1e-3,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def _metadata(cfg: RunConfig, setup: Setup) -> dict[str, Any]:
    """What every checkpoint carries: enough to rebuild the model as trained (surgery included)."""
    meta = {
        "model": backbone_name(cfg),
        "num_classes": len(setup.classes),
        "in_chans": setup.in_chans,
        "img_size": setup.img_size,
        "classes": setup.classes,
        "mean": list(setup.train_loader.mean),
        "std": list(setup.train_loader.std),
        "vitlab_version": __version__,
    }
    if cfg.model.model_args:  # the architecture's own keywords (e.g. depth), so the run reloads as built
        meta["model_args"] = json_keywords("--model-args", cfg.model.model_args)
    if cfg.task.task:
        meta["task"] = cfg.task.task
        # the architecture's keywords, so the run reloads as built (drop path only matters in training)
        meta["task_args"] = json_keywords("--task-args", cfg.task.task_args)
        if hasattr(setup.model, "reload_args"):  # e.g. a frozen base's architecture instead of its file
            meta["task_args"] = setup.model.reload_args(meta["task_args"])
        meta["backbone_args"] = json_keywords("--backbone-args", cfg.task.backbone_args)
    records = surgery_of(setup.model)
    if records:
        meta["surgery"] = records
    return meta


def _build(
    cfg: RunConfig, env: DistEnv, device: torch.device, resuming: bool = False
) -> tuple[Setup, dict[str, Any], Any, Any, Ema | None]:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = _data(cfg, device)
    classes, in_chans = data["classes"], data["in_chans"]
    model = build_model(cfg, len(classes), in_chans).to(device)
    if cfg.model.init_from:  # fine-tuning: start from trained weights (a new head if classes differ)
        init_from_checkpoint(model, cfg.model.init_from)
    elif hasattr(model, "prepare_data") and not resuming:
        model.prepare_data(data["train"].dataset)  # fits parts first (4M's tokenizers); a resume restores them
    setup = Setup(cfg, env, device, model, classes, in_chans, model_img_size(cfg), data["train"])
    install_techniques(setup, "model")  # surgery before the EMA copy and DDP, so both hold it
    if cfg.channels_last and device.type == "cuda":
        setup.model = model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(setup.train_loader)
    setup.total_steps = _schedule(cfg, steps_per_epoch)
    optimizer, scheduler = _optimizer(cfg, model, steps_per_epoch, setup.total_steps)
    o = cfg.optim
    ema = Ema(model, o.ema_decay) if o.ema_decay > 0 else None
    if o.mixup > 0 or o.cutmix > 0:
        setup.mix = Mixup(
            mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, label_smoothing=o.label_smoothing, num_classes=len(classes)
        )
    setup.objective = ClassificationObjective(classes, o.label_smoothing)  # --task swaps in the task model's
    install_techniques(setup, "install")
    return setup, data, optimizer, scheduler, ema


class _RunLog:
    """metrics.jsonl and the progress bar; only rank 0 writes or prints."""

    def __init__(self, run: Path, total: int, initial: int, is_main: bool) -> None:
        self.file = open(run / "metrics.jsonl", "a") if is_main else None  # noqa: SIM115 (kept open for the run)
        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
            disable=not is_main,
        )  # fmt: skip

    def log(self, rec: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def say(self, text: str) -> None:
        if self.file is not None:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def _run(cfg: RunConfig, resume: str | Path | None, env: DistEnv, device: torch.device) -> Path:
    setup, data, optimizer, scheduler, ema = _build(cfg, env, device, resuming=resume is not None)
    use_amp, amp_dtype, scaler = amp_setup(cfg.amp, cfg.amp_dtype, device)
    run = Path(resume) if resume is not None else broadcast_from_main(env, lambda: _new_run_dir(cfg))
    state = TrainState(
        cfg=cfg, env=env, device=device, model=setup.model, net=setup.model, optimizer=optimizer,
        scheduler=scheduler, train_loader=setup.train_loader, eval_loader=data["eval"],
        eval_split=data["eval_split"], run=run, meta=_metadata(cfg, setup), total_steps=setup.total_steps,
        steps_per_epoch=len(setup.train_loader), scaler=scaler,
        autocast=partial(torch.autocast, device.type, dtype=amp_dtype, enabled=use_amp),
    )  # fmt: skip
    evaluator, logger = Evaluator(setup.objective), StepLogger(cfg.log_every)
    callbacks = CallbackList([])
    checkpointer = Checkpointer(setup.objective, cfg.ckpt_every, callbacks)
    generic: list[Callback] = [MixBatch(setup.mix)] if setup.mix is not None else []
    generic += [NanGuard()] + ([ema] if ema is not None else [])
    callbacks.callbacks = [*setup.callbacks, *generic, logger, evaluator, checkpointer]
    if resume is not None:
        callbacks.load_state_dict(restore_state(state))
        if env.is_main:
            truncate_metrics(run / "metrics.jsonl", state.step)
    seed_rank(env, cfg.seed, state.step)
    # DDP when several processes train; state.model stays the plain module (SyncBatchNorm converted in place)
    state.net = wrap_model(setup.model, env, device, cfg.sync_bn)
    if cfg.compile:  # after DDP, as PyTorch recommends; errors fall back to eager (engine/accel.py)
        state.net = CompiledOrEager(state.net)
    runlog = _RunLog(run, state.total_steps, state.step, env.is_main)
    state.log, state.say, logger.bar = runlog.log, runlog.say, runlog.bar
    t_start = time.perf_counter()
    try:
        fit(state, setup.objective, callbacks)
    finally:
        runlog.close()
    if env.is_main and state.step >= state.total_steps:
        _finish(state, setup, checkpointer, time.perf_counter() - t_start - evaluator.seconds, t_start)
    return run


def _finish(state: TrainState, setup: Setup, checkpointer: Checkpointer, train_seconds: float, t_start: float) -> None:
    """The final model (its EMA when kept) as ``final.safetensors``, scored on the test split; ``summary.json``."""
    run, cfg, objective = state.run, state.cfg, setup.objective
    plot_curves(run / "metrics.jsonl", run / "curves.png")
    final = state.ckpt_dir / "final.safetensors"
    save_weights(state.scored or state.model, final, {**state.meta, "step": state.step})
    res = evaluate_run(final, device=str(state.device))
    scores = res if isinstance(res, dict) else res.__dict__
    primary = objective.primary_metric
    summary = {
        "model": state.meta["model"],
        **({"task": cfg.task.task} if cfg.task.task else {}),
        "run_dir": str(run),
        "device": str(state.device),
        "processes": state.env.world_size,
        "steps": state.step,
        "epochs": round(state.step / state.steps_per_epoch, 3),
        "params_m": round(sum(p.numel() for p in state.model.parameters()) / 1e6, 4),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds_with_evals": round(time.perf_counter() - t_start, 1),
        "primary_metric": primary,
        # the headline: the final model on the test split
        **{f"test_{k}": v for k, v in scores.items() if isinstance(v, (int, float)) and k != "num_images"},
        # the best epoch, chosen on the evaluation split (the test split itself unless --val-fraction)
        f"best_{primary}": checkpointer.best,
        "best_selected_on": state.eval_split,
        "checkpoint": str(final),
        "best_checkpoint": str(state.ckpt_dir / "best.safetensors"),
        "vitlab_version": __version__,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
