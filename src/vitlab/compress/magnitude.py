"""Global unstructured magnitude pruning: zero the smallest-magnitude weights of all Linear and Conv layers
together, with ``torch.nn.utils.prune.global_unstructured`` (L1), then make it permanent (``prune.remove``).

Made permanent, the pruned weights are plain parameters again: state-dict keys and parameter objects are
unchanged (an optimizer keeps working), and the saved weights hold the zeros, so loading them is the replay
(``Method.replay == "weights"``). Fine-tuning afterwards regrows zeros unless ``keep_mask=True``: the mask is
then kept on each pruned module (a plain attribute, not a buffer, so state-dict keys stay the same) and
``after_step`` re-zeroes the pruned weights after every optimizer step (``vitlab train --compress magnitude
--compress-args '{"amount": 0.5, "keep_mask": true}'``). A reloaded checkpoint holds the zeros but no mask.
NOTE: unstructured zeros give no speed on dense kernels; they pay off only with sparse storage or kernels.
The classifier is left dense unless ``include_head=True`` (it is small and accuracy-critical).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import prune

from ._method import Method

__all__ = ["METHOD", "keep_pruned", "prune_magnitude", "sparsity"]

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
_MASK = "_vitlab_prune_mask"


def _head_names(model: nn.Module) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return (cls,) if isinstance(cls, str) else tuple(cls)


def _prunable(model: nn.Module, include_head: bool) -> list[tuple[str, nn.Module]]:
    heads = () if include_head else _head_names(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE)
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and not any(name == h or name.startswith(h + ".") for h in heads)
    ]


def sparsity(model: nn.Module, include_head: bool = False) -> float:
    """Fraction of zeros among the Linear and Conv weights that ``magnitude`` prunes."""
    weights = [m.weight for _, m in _prunable(model, include_head)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


@torch.no_grad()
def prune_magnitude(
    model: nn.Module, amount: float = 0.5, include_head: bool = False, keep_mask: bool = False
) -> dict[str, Any]:
    """Zero the ``amount`` fraction of smallest-magnitude weights, ranked across all layers at once.

    Args:
        amount: fraction of the considered weights to zero, in (0, 1).
        include_head: prune the classifier too.
        keep_mask: keep the pruned weights at zero while training (``after_step``).
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise ValueError(f"magnitude pruning needs 0 < amount < 1 (the fraction of weights to zero), got {amount!r}")
    if not isinstance(keep_mask, bool):
        raise ValueError(f"magnitude keep_mask must be true or false, got {keep_mask!r}")
    targets = _prunable(model, include_head)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv weights to prune (include_head={include_head})")
    params = [(m, "weight") for _, m in targets]
    orders = [list(m._parameters) for m, _ in params]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(amount))
    for (m, name), order in zip(params, orders, strict=True):
        prune.remove(m, name)  # weight_orig * mask -> weight, the same parameter object again
        own = dict(m._parameters)  # remove() re-registers it last; keep the state-dict order as it was
        m._parameters.clear()
        m._parameters.update({k: own[k] for k in order})
        if keep_mask:
            setattr(m, _MASK, m.weight != 0)
    total = sum(m.weight.numel() for m, _ in params)
    return {"sparsity": round(sparsity(model, include_head), 6), "weights_considered": total, "layers": len(params)}


@torch.no_grad()
def keep_pruned(model: nn.Module) -> None:
    """Zero again the weights that ``keep_mask=True`` pruned (run after every optimizer step)."""
    for m in model.modules():
        mask = getattr(m, _MASK, None)
        if mask is not None:
            if mask.device != m.weight.device:  # the model moved after pruning
                mask = mask.to(m.weight.device)
                setattr(m, _MASK, mask)
            m.weight.mul_(mask)


METHOD = Method(
    name="magnitude",
    fn=prune_magnitude,
    replay="weights",
    summary="global unstructured L1 magnitude pruning of Linear/Conv weights (no speed-up on dense kernels)",
    permanent_reason="the pruned weights are zeroed and their old values are not kept",
    after_step=keep_pruned,
)
