"""What a training run holds while it runs (``TrainState``), and how it is saved and restored.

Exact resume: batch order and augmentation depend only on (seed, epoch, batch index) (``data.BatchLoader``),
and the global RNG states (dropout, drop-path, mixup) are saved with each checkpoint, so a resumed run computes
the same losses as an uninterrupted one. Callbacks with state (EMA, the best metric) save theirs through
``state_dict``/``load_state_dict`` into the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError
from .checkpoint import atomic_write, load_state, load_weights, save_state, save_weights
from .config import RunConfig
from .distributed import DistEnv

__all__ = ["TrainState", "restore_state", "save_checkpoint", "truncate_metrics"]


@dataclass
class TrainState:
    """The run as the loop and the callbacks see it; ``model`` is the plain module, ``net`` what runs forward."""

    cfg: RunConfig
    env: DistEnv
    device: torch.device
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    eval_loader: Any  # held-out split when --val-fraction, else the test split
    eval_split: str  # "val" or "test": the prefix of evaluation records
    run: Path
    meta: dict[str, Any]  # written into every checkpoint (rebuilds the model, replays surgery)
    total_steps: int
    steps_per_epoch: int
    autocast: Any  # () -> the context manager of mixed precision (enabled or not)
    scaler: Any = None
    step: int = 0
    epoch: int = 0
    stop: bool = False  # a callback asks the loop to stop after this step
    last: dict[str, Any] = field(default_factory=dict)  # the last step's loss and logs (global means)
    last_eval: dict[str, Any] = field(default_factory=dict)
    scored: nn.Module | None = None  # the module evaluation scores (the EMA when kept)
    log: Any = None  # (record) -> None: a metrics line (rank 0)
    say: Any = None  # (text) -> None: a message to the user (rank 0)

    @property
    def ckpt_dir(self) -> Path:
        return self.run / "checkpoints"


def _rng_state() -> dict[str, Any]:
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": [int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: TrainState, stem: str, extra: dict[str, Any]) -> None:
    """``<stem>.safetensors`` (weights + metadata) and ``<stem>.state.pt`` (optimizer, scheduler, RNG, extras)."""
    if not state.env.is_main:
        return
    save_weights(state.model, state.ckpt_dir / f"{stem}.safetensors", {**state.meta, "step": state.step})
    blob = {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "rng": _rng_state(),
        **extra,
    }
    if state.scaler is not None:
        blob["grad_scaler"] = state.scaler.state_dict()
    save_state(state.ckpt_dir / f"{stem}.state.pt", blob)


def restore_state(state: TrainState) -> dict[str, Any]:
    """Load ``last`` into the state (weights, optimizer, scheduler, scaler, RNG); returns the whole saved blob."""
    weights, state_path = state.ckpt_dir / "last.safetensors", state.ckpt_dir / "last.state.pt"
    meta = load_weights(state.model, weights)
    blob = load_state(state_path)
    if meta.get("step") != blob["step"]:
        raise CheckpointError(
            f"{weights} (step {meta.get('step')}) and {state_path} (step {blob['step']}) are from different steps; "
            "the run was interrupted while checkpointing"
        )
    state.optimizer.load_state_dict(blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    if state.scaler is not None and "grad_scaler" in blob:
        state.scaler.load_state_dict(blob["grad_scaler"])
    _set_rng_state(blob["rng"])
    state.step = int(blob["step"])
    return blob


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step``: a resumed run recomputes them."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))
