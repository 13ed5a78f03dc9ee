"""What a compression method declares: its function, whether it can be undone, and when it is replayed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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
    """

    name: str
    fn: Callable[..., dict[str, Any]]
    replay: Literal["build", "weights"]
    summary: str
    undo: Callable[[nn.Module], None] | None = None
    permanent_reason: str = ""
