"""What a compression method declares: its function, whether it can be undone, and when it is replayed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

__all__ = ["Method"]


@dataclass(frozen=True)
class Method:
    """One compression method.

    Args:
        fn: ``fn(model, **kwargs) -> report``; changes ``model`` in place and returns a JSON report
            (e.g. achieved sparsity) that is kept in the surgery record.
        replay: ``"build"``: the method changes the module tree or state-dict keys, so it is re-applied to the
            freshly built model before the checkpoint's weights are loaded. ``"weights"``: its result is held
            by the saved weights themselves, so loading them is the replay (the record is history).
        undo: ``undo(model)`` reverses ``fn``; None where the method is permanent.
        permanent_reason: why it cannot be undone (the error of ``compress.remove`` says it).
        aux_loss: for methods that train (``vitlab train --compress``): ``aux_loss(model) -> {name: scalar}``,
            read after every training forward (modules stash what they need during the forward); the terms are
            already weighted, are added to the loss and logged under their names.
        after_step: called with the model after every optimizer step while training (e.g. keep pruned weights
            at zero).
        rebuild: ``rebuild(model, kwargs, report)`` replays a ``"build"`` record on a freshly built model when
            ``fn``'s result depended on data or weights (structured pruning: the kept sizes are in the report);
            without it, build replay calls ``fn(model, **kwargs)``.
    """

    name: str
    fn: Callable[..., dict[str, Any]]
    replay: Literal["build", "weights"]
    summary: str
    undo: Callable[[nn.Module], None] | None = None
    permanent_reason: str = ""
    aux_loss: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    after_step: Callable[[nn.Module], None] | None = None
    rebuild: Callable[[nn.Module, dict[str, Any], dict[str, Any]], None] | None = None
