"""A training technique as data: when it is on, what it cannot be combined with, and how it joins a run.

Each technique file (``hcs.py``, ``multires.py``, ``distill.py``, ``fast_distill.py``, ``reduce_train.py``,
``task_objective.py``) ends with one ``TECHNIQUE = Technique(...)``; ``techniques.py`` lists them in the order
they are installed. Installing one may change the model before the optimizer, EMA and DDP see it
(``adapt_model``: token reduction) and then wrap the objective, swap the loader or add callbacks (``install``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .config import RunConfig
from .distributed import DistEnv

__all__ = ["Setup", "Technique"]


@dataclass
class Setup:
    """What a technique may read and replace while a run is put together."""

    cfg: RunConfig
    env: DistEnv
    device: torch.device
    model: nn.Module
    classes: list[str]
    in_chans: int
    img_size: int
    train_loader: Any
    objective: Any = None
    mix: Callable | None = None  # mixup/cutmix on the global batch (None: off)
    callbacks: list[Any] = field(default_factory=list)  # technique callbacks, fired before the generic ones
    total_steps: int = 1


@dataclass(frozen=True)
class Technique:
    """One training technique.

    Args:
        flag: the command-line flag that turns it on (errors name it), e.g. ``"--hcs"``.
        what: a few words on what it does, for errors.
        is_on: whether a run config uses it.
        excludes: flags of techniques it cannot be combined with, and why not is its own business.
        validate: its own checks of its own fields (ValueError naming the flag).
        adapt_model: changes the model before the optimizer, EMA and DDP are built.
        install: wraps ``setup.objective``, replaces the loader or mix, appends callbacks.
    """

    flag: str
    what: str
    is_on: Callable[[RunConfig], bool]
    excludes: tuple[str, ...] = ()
    validate: Callable[[RunConfig], None] | None = None
    adapt_model: Callable[[Setup], None] | None = None
    install: Callable[[Setup], None] | None = None
