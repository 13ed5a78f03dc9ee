"""Structural re-parameterisation: fold multi-branch training forms (RepVGG / MobileOne branches, conv + BN,
FMViT's multi-group 1x1 convs) into the plain deploy form, in place.

One home for what timm spreads over modules: a model with its own ``reparameterize()`` (vitlab's FMViT, whose
folds must run in a set order) is asked to do it; otherwise timm's ``reparameterize_model`` walks the tree and
calls each module's ``fuse()`` / ``reparameterize()`` / ``switch_to_deploy()``. The deploy form computes what the
training form computes in eval mode (BatchNorm running statistics are folded in) with fewer parameters.

State-dict keys change, so a checkpoint of the deploy form loads only into a model reparameterised first: the
record is replayed on the freshly built model before its weights are loaded (``Method.replay == "build"``).
A model with nothing to fold is an error, not a silent no-op, so a record never claims a fold that did nothing.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.utils.model import reparameterize_model

from ._method import Method

__all__ = ["METHOD", "is_reparameterizable", "reparameterize"]

_HOOKS = ("reparameterize", "fuse", "switch_to_deploy")


def _has_hook(module: nn.Module) -> bool:
    return any(callable(getattr(module, h, None)) for h in _HOOKS)


def is_reparameterizable(model: nn.Module) -> bool:
    """Whether ``model`` or any of its modules has a ``reparameterize`` / ``fuse`` / ``switch_to_deploy`` method."""
    return any(_has_hook(m) for m in model.modules())


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reparameterize(model: nn.Module) -> dict[str, Any]:
    """Fold ``model`` into its deploy form in place; returns the parameter counts before and after."""
    if not is_reparameterizable(model):
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise ValueError(
            f"{arch} has nothing to reparameterise: no module has {', '.join(f'{h}()' for h in _HOOKS)}; "
            "reparam applies to models with multi-branch training forms (e.g. fmvit_*, timm's fastvit / mobileone)"
        )
    before = _num_params(model)
    if callable(getattr(model, "reparameterize", None)):
        model.reparameterize()  # the model knows the order its folds need
    else:
        reparameterize_model(model, inplace=True)
    return {"params_before": before, "params_after": _num_params(model)}


METHOD = Method(
    name="reparam",
    fn=reparameterize,
    replay="build",
    summary="fold multi-branch / conv+BN training forms into plain convs (eval outputs unchanged)",
    permanent_reason="the branches are folded into one conv and their separate weights no longer exist",
)
