"""Compression plug-ins: structural re-parameterisation and magnitude pruning, applied to any model in place.

``apply(model, "magnitude", amount=0.5)`` changes the model in place (and returns it), ``remove(model)`` undoes
the last compression where its method can be undone, ``list_methods()`` names the methods (the same surface as
``vitlab.reduce``). Every application is appended to the model's surgery record (``surgery_of(model)``), which
the engine stores in checkpoint metadata and replays on load, so a compressed model reloads as it was saved.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ..errors import did_you_mean
from . import attn_sparsity, magnitude, path_ensemble, reparam, shiftadd, structured
from ._method import Method
from ._record import KINDS, check_jsonable, record_surgery, set_surgery, surgery_of
from .magnitude import sparsity

__all__ = [
    "KINDS",
    "METHODS",
    "Method",
    "after_step",
    "apply",
    "aux_losses",
    "check_jsonable",
    "get_method",
    "list_methods",
    "record_surgery",
    "remove",
    "set_surgery",
    "sparsity",
    "surgery_of",
]

METHODS: dict[str, Method] = {
    m.METHOD.name: m.METHOD for m in (reparam, magnitude, structured, attn_sparsity, path_ensemble, shiftadd)
}


def list_methods() -> list[str]:
    """Names accepted by ``apply``."""
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is a ``ValueError`` suggesting close ones."""
    if name not in METHODS:
        hint = did_you_mean(name, METHODS)
        raise ValueError(f"unknown compression method {name!r}.{hint} Known: {', '.join(list_methods())}")
    return METHODS[name]


def _bind(method: Method, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The method's keywords with its defaults filled in, so the record replays the same even if defaults change."""
    sig = inspect.signature(method.fn)
    try:
        bound = sig.bind(model, **kwargs)
    except TypeError as e:
        raise TypeError(f"{method.name} takes {list(sig.parameters)[1:]}: {e}") from None
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])


def apply(model: nn.Module, method: str, **kwargs: Any) -> nn.Module:
    """Compress ``model`` in place with ``method`` and return it; the step is appended to its surgery record.

    Keywords are the method's: ``reparam`` none; ``magnitude`` ``amount`` (fraction in (0, 1), default 0.5),
    ``include_head`` (default False). The record keeps the keywords with defaults filled in and the method's
    report (``reparam``: parameter counts; ``magnitude``: achieved sparsity), e.g.
    ``surgery_of(model)[-1]["report"]["sparsity"]``.
    """
    spec = get_method(method)
    bound = _bind(spec, model, kwargs)
    check_jsonable(bound, f"compress {method!r} keyword arguments")  # before touching the model
    report = spec.fn(model, **bound)
    record_surgery(model, "compress", spec.name, bound, report)
    return model


def _applied(model: nn.Module) -> list[Method]:
    """The methods of ``model``'s compress records, each once, in the order first applied."""
    names = dict.fromkeys(r["method"] for r in surgery_of(model) if r["kind"] == "compress")
    return [get_method(n) for n in names]


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The training-loss terms of every compression applied to ``model`` (read after its forward), by name."""
    terms: dict[str, torch.Tensor] = {}
    for spec in _applied(model):
        if spec.aux_loss is not None:
            for name, value in spec.aux_loss(model).items():
                terms[name] = terms[name] + value if name in terms else value
    return terms


def after_step(model: nn.Module) -> None:
    """Run every applied method's ``after_step`` (called after each optimizer step while training)."""
    for spec in _applied(model):
        if spec.after_step is not None:
            spec.after_step(model)


def remove(model: nn.Module) -> nn.Module:
    """Undo the most recent compression; an error where that method is permanent (a no-op if none was applied)."""
    records = surgery_of(model)
    last = next((i for i in reversed(range(len(records))) if records[i]["kind"] == "compress"), None)
    if last is None:
        return model
    spec = get_method(records[last]["method"])
    if spec.undo is None:
        raise ValueError(
            f"compression {spec.name!r} cannot be undone: {spec.permanent_reason}; "
            "rebuild the model and load its weights from before the compression"
        )
    spec.undo(model)
    set_surgery(model, records[:last] + records[last + 1 :])
    return model
