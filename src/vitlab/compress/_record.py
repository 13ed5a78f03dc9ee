"""The surgery record: what was done to a model (token reduction, compression), in the order applied.

It lives on the model as a plain list attribute so it travels with the object, and is written into checkpoint
metadata by the engine (``engine/surgery.py``), which replays it on load. Each entry is
``{"kind": "reduce" | "compress", "method": str, "kwargs": {...}}`` (plus an optional ``"report"``), and every
value is JSON, because checkpoint metadata is.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["KINDS", "check_jsonable", "record_surgery", "set_surgery", "surgery_of"]

KINDS = ("reduce", "compress")
_ATTR = "_vitlab_surgery"


def check_jsonable(value: Any, where: str) -> Any:
    """``value`` with tuples as lists, or a ``TypeError`` naming the first part that JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [check_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where} has non-string key {bad[0]!r}; surgery records must be JSON")
        return {k: check_jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__name__}; surgery records are stored as JSON in checkpoint metadata, "
        "so keywords must be numbers, strings, booleans, None, lists or dicts of them"
    )


def surgery_of(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of the surgery applied to ``model`` so far, oldest first (empty for an untouched model)."""
    return [{**e, "kwargs": dict(e["kwargs"])} for e in getattr(model, _ATTR, [])]


def set_surgery(model: nn.Module, records: list[dict[str, Any]]) -> None:
    """Replace the record (used when surgery is replayed on load, or when a step is undone)."""
    object.__setattr__(model, _ATTR, [dict(r) for r in records])


def record_surgery(
    model: nn.Module, kind: str, method: str, kwargs: dict[str, Any], report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Append one entry to ``model``'s record and return it; ``kwargs`` must be JSON (checked here)."""
    if kind not in KINDS:
        raise ValueError(f"surgery kind must be one of {KINDS}, got {kind!r}")
    entry: dict[str, Any] = {
        "kind": kind,
        "method": method,
        "kwargs": check_jsonable(dict(kwargs), f"{kind} {method!r} keyword arguments"),
    }
    if report is not None:
        entry["report"] = check_jsonable(report, f"{kind} {method!r} report")
    set_surgery(model, [*getattr(model, _ATTR, []), entry])
    return entry
