"""Token reduction plug-ins for isotropic ViTs: ToMe, EViT, ATS and MCTF.

``apply(model, "tome", r=8)`` patches the model in place (and returns it), ``remove(model)`` undoes
it, ``list_methods()`` names the methods. Works on timm's ``VisionTransformer``, DeiT (with or
without distillation token) and every isotropic vitlab model; see ``_runtime.py`` for how.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ..errors import did_you_mean
from ..models import VARIANTS
from . import ats, evit, mctf, tome
from ._runtime import SUPPORTED_HOSTS, Method, ReducedBlocks, ReducingBlock, TokenState, check_host

__all__ = [
    "SUPPORTED_HOSTS",
    "TokenState",
    "apply",
    "forward_with_state",
    "is_reduced",
    "list_methods",
    "remove",
    "schedule_of",
    "set_schedule",
]

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (tome, evit, ats, mctf)}


def list_methods() -> list[str]:
    """Names accepted by ``apply``."""
    return sorted(METHODS)


def _get_method(name: str) -> Method:
    if name not in METHODS:
        hint = did_you_mean(name, METHODS)
        raise ValueError(f"unknown token-reduction method {name!r}.{hint} Known: {', '.join(list_methods())}")
    return METHODS[name]


def _split_kwargs(method: Method, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keywords of the method's ``schedule`` and the keyword-only options of its ``plan``."""
    sched = set(list(inspect.signature(method.schedule).parameters)[1:])
    opts = {n for n, p in inspect.signature(method.plan).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = set(kwargs) - sched - opts
    if unknown:
        raise TypeError(f"{method.name} takes {sorted(sched | opts)}, got unexpected {sorted(unknown)}")
    return {k: v for k, v in kwargs.items() if k in sched}, {k: v for k, v in kwargs.items() if k in opts}


def _check_isotropic(model: nn.Module) -> None:
    arch = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", ""))
    spec = VARIANTS.get(arch)
    if spec is not None and not spec.isotropic:
        raise ValueError(
            f"{arch} is not isotropic (its token grid changes between stages); supported: {SUPPORTED_HOSTS}"
        )


def is_reduced(model: nn.Module) -> bool:
    return isinstance(getattr(model, "blocks", None), ReducedBlocks)


def apply(model: nn.Module, method: str, **kwargs: Any) -> nn.Module:
    """Patch ``model`` in place with a token-reduction ``method`` and return it.

    Keywords are the method's: ToMe ``r`` (int or per-block list; default 13 at 12 blocks), ``inflect``; EViT ``keep``,
    ``layers``; ATS ``keep``, ``layers``, ``pad_to_budget``; MCTF ``r``, ``layers``, ``tau_sim``,
    ``tau_info``, ``tau_size``, ``bidirectional``, ``one_step_ahead`` (``"precise"`` or the official
    evaluation's ``"approx"``). The per-block schedule is fixed here. Blocks before the first reducing
    one stay the host's own, so a schedule of zeros leaves outputs bit-exact.
    Applying again replaces the previous method.
    """
    spec = _get_method(method)
    if is_reduced(model):
        remove(model)
    _check_isotropic(model)
    check_host(model, spec)
    pool = getattr(model, "global_pool", "token")
    if spec.padded and pool != "token":
        raise ValueError(
            f"{spec.name} pads images to a common token count, so it needs a host that pools the class token "
            f"(global_pool='token'); got global_pool={pool!r}, which would let padding slots into the result"
        )
    sched_kw, options = _split_kwargs(spec, kwargs)
    host = model.blocks
    if "num_tokens" in inspect.signature(spec.schedule).parameters and "num_tokens" not in sched_kw:
        # the patch count at the model's default size sizes a default amount (ToMe)
        sched_kw["num_tokens"] = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    amounts = spec.schedule(len(host), **sched_kw)
    first = next((i for i, a in enumerate(amounts) if a), len(host))
    num_prefix = int(model.num_prefix_tokens)
    blocks = [
        blk if i < first else ReducingBlock.adopt(blk, spec, amounts[i], num_prefix, options)
        for i, blk in enumerate(host)
    ]
    model.blocks = ReducedBlocks(blocks, host, spec, num_prefix)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: put the host's own blocks back (parameters were shared all along)."""
    if is_reduced(model):
        (host,) = model.blocks.host_blocks
        host.train(model.blocks.training)
        model.blocks = host
    return model


def schedule_of(model: nn.Module) -> list[float]:
    """The per-block amounts of the applied method (0 where a block does not reduce)."""
    if not is_reduced(model):
        return []
    return [blk.amount if isinstance(blk, ReducingBlock) else 0 for blk in model.blocks]


def set_schedule(model: nn.Module, amounts: list[float]) -> None:
    """Change the per-block amounts of the applied method in place (e.g. a random lighter schedule while
    training); a block that did not reduce when the method was applied cannot start (re-``apply`` instead)."""
    if not is_reduced(model):
        raise ValueError("the model has no token reduction applied; call vitlab.reduce.apply first")
    blocks = list(model.blocks)
    if len(amounts) != len(blocks):
        raise ValueError(f"need one amount per block ({len(blocks)}), got {len(amounts)}")
    for i, (blk, amount) in enumerate(zip(blocks, amounts, strict=True)):
        if isinstance(blk, ReducingBlock):
            blk.amount = amount
        elif amount:
            raise ValueError(f"block {i} was not reducing when the method was applied; re-apply with its amount")


def forward_with_state(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, TokenState | None]:
    """``forward_features`` of a reduced model that also returns the final ``TokenState`` (sizes, source map)."""
    if not is_reduced(model):
        raise ValueError("the model has no token reduction applied; call vitlab.reduce.apply first")
    if hasattr(model, "_pos_embed"):  # NOTE: timm VisionTransformer.forward_features' steps around the blocks
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    else:  # layers.IsotropicBackbone
        x, _ = model._embed(x)
    x, state = model.blocks.forward_with_state(x)
    return model.norm(x), state
