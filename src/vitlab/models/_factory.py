"""``create_model`` / ``list_models`` over vitlab's variant table, with helpful errors."""

from __future__ import annotations

import fnmatch
from typing import Any

import timm
import torch.nn as nn

from ..errors import did_you_mean
from ._variants import VARIANTS, VariantSpec

__all__ = ["UnknownModelError", "create_model", "get_variant", "list_models"]


class UnknownModelError(ValueError):
    """A model name that neither vitlab nor timm knows."""


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Names of vitlab models matching a shell-style ``pattern`` (and a paper ``kind`` B/T/H/C)."""
    if kind is not None and kind.upper() not in {"B", "T", "H", "C"}:
        raise ValueError(f"kind must be one of B, T, H, C (PAPERS.md kinds), got {kind!r}")
    names = [n for n in VARIANTS if fnmatch.fnmatchcase(n, pattern)]
    if kind is not None:
        names = [n for n in names if kind.upper() in VARIANTS[n].paper.kind]
    return sorted(names)


def get_variant(name: str) -> VariantSpec:
    """The vitlab metadata of ``name`` (``arch`` or ``arch.tag``); unknown names suggest close ones."""
    arch = name.split(".", 1)[0]
    if arch in VARIANTS:
        return VARIANTS[arch]
    hint = did_you_mean(arch, VARIANTS)
    extra = " It is a timm model without vitlab metadata." if timm.is_model(arch) else ""
    raise UnknownModelError(f"unknown vitlab model {name!r}.{extra}{hint} See `vitlab list`.")


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a vitlab model (same as ``timm.create_model`` once vitlab is imported).

    For timm models that vitlab reaches, the variant's defaults (e.g. ``dynamic_img_size=True``)
    apply unless overridden. Keywords are timm's: ``num_classes``, ``in_chans``, ``img_size``, ...
    ``img_size`` is accepted for every model; size-agnostic ones whose constructor has no such
    argument (``spec.img_size_arg`` False) run at any size and ignore it.
    """
    spec = get_variant(name)
    if spec.timm_native:
        # timm's own cfgs leave the paper fields empty; vitlab fills them in
        overlay = {**spec.paper_cfg(), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
        kwargs = {**spec.kwargs, **kwargs, "pretrained_cfg_overlay": overlay}
    for key in ("num_classes", "in_chans", "img_size"):
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            if key == "num_classes" and value == 0:
                continue
            raise ValueError(f"{key} must be a positive integer, got {value!r} for model {name!r}")
    if not spec.img_size_arg:
        kwargs.pop("img_size", None)  # size-agnostic model without the argument: nothing is built for a size
    return timm.create_model(name, pretrained=pretrained, **kwargs)
