"""The attention-sparsity regulariser of Sparse then Prune (arXiv 2307.11988; official code ``yogiprsty/Sparse-ViT``),
as a training method: ``vitlab train --compress attn_sparsity --compress-args '{"weight": 0.01, "layers": "last"}'``.

The penalty is ``mean(log(1 + a^2))`` over the softmax attention probabilities ``a`` (batch, heads, queries,
keys), added to the loss with ``weight`` (0.01 in paper and code). Which blocks count:

- ``layers="last"``: the official code's behaviour. Its encoder loop overwrites the per-block value, so only the
  last block's attention is regularised.
- ``layers="all"``: the paper's wording, the mean of the per-block penalties over every block.

How the probabilities are read: a forward hook on each chosen ``blocks[i].attn`` recomputes ``q`` and ``k``
from the attention's input (``qkv``, then ``q_norm``/``k_norm``) and the softmax of ``q k^T * scale``. The block's
own forward stays fused (``scaled_dot_product_attention``, which never materialises the probabilities), so the
model computes exactly what it computed before, and the gradient reaches ``qkv`` through the recomputation at
the cost of one extra ``qkv`` projection per chosen block. Hooks only compute while training with grad enabled:
eval outputs and eval cost are unchanged. Attention masks / biases passed to the attention (token-reduction
size bias, packing masks) are not included in the recomputed probabilities.

The method changes no structure, so it replays from the weights (``replay="weights"``): a loaded checkpoint has
no hooks and its record is history; a fine-tune with ``--init-from`` does not regularise unless asked again.
``compress.remove(model)`` removes the hooks.

NOTE: on the probability simplex ``log(1 + a^2)`` is convex (a < 1), so its sum over a row is smallest for the
uniform row: minimising it spreads attention rather than sparsifying it. We implement the published penalty
as written; ``benchmarks/sparse_prune.py`` reports the attention entropy it produces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers.hosts import attention_blocks
from ._method import Method

__all__ = ["LAYERS", "METHOD", "add_attn_sparsity", "attn_penalty", "attn_sparsity_loss", "remove_attn_sparsity"]

LAYERS = ("last", "all")
_STASH = "_vitlab_attn_penalty"
_WEIGHT = "_vitlab_attn_sparsity_weight"


def attn_penalty(probs: torch.Tensor) -> torch.Tensor:
    """``mean(log(1 + a^2))`` over all entries of attention probabilities ``a``."""
    return torch.log1p(probs.square()).mean()


def _probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(B, heads, N, N)`` that ``attn`` computes for input ``x (B, N, C)``."""
    B, N, _ = x.shape
    q, k, _v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def _stash(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook: keep this block's penalty for the next ``aux_loss`` call (training with grad only)."""
    if module.training and torch.is_grad_enabled():
        setattr(module, _STASH, attn_penalty(_probs(module, args[0])))


_SUPPORTED = (
    "isotropic ViTs whose blocks[i].attn is timm's or vitlab's Attention "
    "(timm VisionTransformer / DeiT, vitlab's isotropic models)"
)


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [b.attn for b in attention_blocks(model, "attn_sparsity", _SUPPORTED)]


def _hooked(module: nn.Module) -> bool:
    return any(h is _stash for h in module._forward_hooks.values())


def remove_attn_sparsity(model: nn.Module) -> None:
    """Remove the hooks (and any stashed penalty); the model is as before ``add_attn_sparsity``."""
    for m in model.modules():
        for key in [k for k, h in m._forward_hooks.items() if h is _stash]:
            del m._forward_hooks[key]
        for attr in (_STASH, _WEIGHT):
            if hasattr(m, attr):
                delattr(m, attr)


def add_attn_sparsity(model: nn.Module, weight: float = 0.01, layers: str = "last") -> dict[str, Any]:
    """Hook the attention of the last block (``"last"``, official code) or every block (``"all"``, paper).

    Args:
        weight: the penalty's weight in the loss (>= 0; 0 keeps the hooks but adds a zero term).
        layers: ``"last"`` or ``"all"``.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"attn_sparsity weight must be a number >= 0, got {weight!r}")
    if layers not in LAYERS:
        raise ValueError(f"attn_sparsity layers must be one of {LAYERS}, got {layers!r}")
    attns = _attentions(model)
    remove_attn_sparsity(model)  # applying again replaces, never doubles, the hooks
    chosen = attns[-1:] if layers == "last" else attns
    for a in chosen:
        a.register_forward_hook(_stash)
        setattr(a, _WEIGHT, float(weight))  # on the module, so a deep copy (EMA) carries it along
    return {"blocks": [len(attns) - 1] if layers == "last" else list(range(len(attns)))}


def attn_sparsity_loss(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"attn_sparsity": weight * mean over hooked blocks of their penalty}`` of the last training forward.

    Empty when nothing was stashed (no hooks: a reloaded model, or a forward in eval mode / without grad).
    """
    stashed, weight = [], 0.0
    for m in model.modules():
        if _hooked(m) and hasattr(m, _STASH):
            stashed.append(getattr(m, _STASH))
            weight = getattr(m, _WEIGHT)
            delattr(m, _STASH)  # each forward's penalty is counted once
    if not stashed:
        return {}
    return {"attn_sparsity": weight * torch.stack(stashed).mean()}


METHOD = Method(
    name="attn_sparsity",
    fn=add_attn_sparsity,
    replay="weights",
    summary="Sparse-then-Prune attention regulariser mean(log(1+a^2)) while training (last block or all)",
    undo=remove_attn_sparsity,
    aux_loss=attn_sparsity_loss,
)
