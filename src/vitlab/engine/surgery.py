"""The surgery record in checkpoints: token reduction and compression applied to a model are stored in its
checkpoint metadata (``meta["surgery"]``, in the order applied) and replayed on load, so a run reloads as it was
trained or saved.

Entries are ``{"kind": "reduce" | "compress", "method": ..., "kwargs": {...}}`` (JSON). Replay happens in two
stages around loading the weights (``load_trained`` in ``inference.py``):

- ``"build"``, on the freshly built model, before its weights are loaded: methods that change the module tree
  or state-dict keys (``compress`` ``reparam``), so the saved weights fit;
- ``"loaded"``, after the weights: token reduction (it keeps state-dict keys and only adopts the blocks).
  Compression whose result lives in the weights themselves (``magnitude``'s zeros) is not re-run: loading the
  weights is its replay, and re-pruning weights that fine-tuning regrew would change the model.

Within a stage, records replay in the order applied. Checkpoints written before this record existed carry
``meta["reduce"] = {"method", "kwargs"}``; ``records_from_meta`` reads that as one reduce record.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn

from .. import compress, reduce
from ..compress import KINDS, record_surgery, set_surgery, surgery_of
from ..errors import CheckpointError

__all__ = ["KINDS", "STAGES", "apply", "record", "records_from_meta", "remove", "replay", "replay_stage", "surgery_of"]

STAGES = ("build", "loaded")
Stage = Literal["build", "loaded"]


def _known(kind: str) -> list[str]:
    return reduce.list_methods() if kind == "reduce" else compress.list_methods()


def record(model: nn.Module, kind: str, method: str, kwargs: dict[str, Any]) -> None:
    """Note on ``model`` that ``kind`` ``method`` was applied with ``kwargs`` (which must be JSON).

    ``compress.apply`` records itself; use this (or ``apply`` below) for ``reduce.apply``.
    """
    if kind in KINDS and method not in _known(kind):
        raise ValueError(f"unknown {kind} method {method!r}; known: {', '.join(_known(kind))}")
    record_surgery(model, kind, method, kwargs)


def apply(model: nn.Module, kind: str, method: str, **kwargs: Any) -> nn.Module:
    """``reduce.apply`` or ``compress.apply`` on ``model`` in place, recorded; returns the model.

    Token reduction replaces any previous reduction (as ``reduce.apply`` does), so its old record goes too.
    """
    if kind == "reduce":
        compress.check_jsonable(kwargs, f"reduce {method!r} keyword arguments")
        reduce.apply(model, method, **kwargs)
        set_surgery(model, [r for r in surgery_of(model) if r["kind"] != "reduce"])
        record(model, "reduce", method, kwargs)
        return model
    if kind == "compress":
        return compress.apply(model, method, **kwargs)
    raise ValueError(f"surgery kind must be one of {KINDS}, got {kind!r}")


def remove(model: nn.Module, kind: str) -> nn.Module:
    """Undo token reduction (``"reduce"``) or the last compression (``"compress"``, where reversible)."""
    if kind == "reduce":
        reduce.remove(model)
        set_surgery(model, [r for r in surgery_of(model) if r["kind"] != "reduce"])
        return model
    if kind == "compress":
        return compress.remove(model)
    raise ValueError(f"surgery kind must be one of {KINDS}, got {kind!r}")


def records_from_meta(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The surgery records of checkpoint metadata, checked; legacy ``meta["reduce"]`` becomes one reduce record."""
    if "surgery" in meta:
        raw = meta["surgery"] or []
    elif meta.get("reduce"):
        raw = [{"kind": "reduce", **meta["reduce"]}]
    else:
        return []
    if not isinstance(raw, list):
        raise CheckpointError(f"checkpoint metadata 'surgery' must be a list of records, got {type(raw).__name__}")
    out = []
    for i, r in enumerate(raw):
        ok = isinstance(r, dict) and r.get("kind") in KINDS and isinstance(r.get("method"), str)
        if not ok or not isinstance(r.get("kwargs", {}), dict):
            raise CheckpointError(
                f"checkpoint surgery record #{i} is malformed: {r!r}; expected "
                "{'kind': 'reduce' | 'compress', 'method': str, 'kwargs': dict}"
            )
        if r["method"] not in _known(r["kind"]):
            raise CheckpointError(
                f"checkpoint surgery record #{i} names unknown {r['kind']} method {r['method']!r} "
                f"(this vitlab knows {', '.join(_known(r['kind']))}); it was written by another vitlab version?"
            )
        out.append({**r, "kwargs": dict(r.get("kwargs", {}))})
    return out


def replay_stage(entry: dict[str, Any]) -> Literal["build", "loaded", "weights"]:
    """When a record is re-applied: ``"build"``, ``"loaded"``, or ``"weights"`` (held by the weights, not re-run)."""
    if entry["kind"] == "reduce":
        return "loaded"
    return compress.get_method(entry["method"]).replay


def replay(model: nn.Module, records: list[dict[str, Any]], stage: Stage) -> nn.Module:
    """Re-apply the ``records`` (from ``records_from_meta``) that belong to ``stage``, in order; returns the model.

    A record that no longer applies (unknown method, keywords this version refuses) is a ``CheckpointError``.
    After ``"loaded"``, the model's surgery record is the full list, so saving it again keeps the history.
    """
    if stage not in STAGES:
        raise ValueError(f"replay stage must be one of {STAGES}, got {stage!r}")
    for i, r in enumerate(records):
        try:
            if replay_stage(r) != stage:
                continue
            if r["kind"] == "reduce":
                reduce.apply(model, r["method"], **r["kwargs"])
            elif (spec := compress.get_method(r["method"])).rebuild is not None:
                spec.rebuild(model, r["kwargs"], r.get("report") or {})
            else:
                spec.fn(model, **r["kwargs"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(
                f"cannot replay checkpoint surgery record #{i} ({r['kind']} {r['method']!r}, {r['kwargs']}): {e}"
            ) from e
    done = [r for r in records if stage == "loaded" or replay_stage(r) == "build"]
    set_surgery(model, done)
    return model
