"""Structured pruning of isotropic ViTs: remove whole attention heads and MLP hidden channels, so the tensors
really shrink (new, smaller ``nn.Linear`` modules) and dense kernels run faster, unlike masked zeros.

vitlab's extension to Sparse then Prune (arXiv 2307.11988, official code ``yogiprsty/Sparse-ViT``), whose
paper and code prune unstructured only. Hosts: timm ``VisionTransformer`` / DeiT blocks and vitlab's isotropic
models with the same layout (``blocks[i].attn.qkv/proj/num_heads/head_dim``, ``blocks[i].mlp.fc1/fc2``).

- Heads: head ``h`` owns rows ``h*d:(h+1)*d`` of each of q, k, v in ``qkv`` (and of ``gate`` when present) and the
  same columns of ``proj``; ``num_heads`` and ``attn_dim`` follow. ``head_dim`` and ``q_norm``/``k_norm`` (over
  one head) are unchanged. Removing a head whose ``proj`` columns are zero leaves the outputs exactly unchanged.
- MLP channels: rows of ``fc1`` and columns of ``fc2``.
- Importance: ``"l1"``, the weight magnitude a head or channel owns (no data); ``"taylor"``,
  ``|sum(activation * gradient)|`` per image at the head's / channel's output, summed over ``batches``
  (first-order estimate of the loss change when it is removed; Molchanov et al., arXiv 1611.06440).

``compress.apply(model, "structured", heads=0.25, mlp=0.25)`` prunes by L1 (apply's keywords must be JSON).
With data-driven scores, call ``prune_structured(model, heads, mlp, scores=importance(model, batches,
"taylor"))`` and record it yourself: ``compress.record_surgery(model, "compress", "structured",
{"heads": h, "mlp": m, "importance_criterion": "taylor"}, report)``. Either way the record's report keeps the
kept sizes per block, from which ``rebuild`` reshapes a freshly built model so the saved weights load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ..layers.hosts import attention_blocks, host_name
from ._method import Method

__all__ = ["METHOD", "importance", "prune_structured", "rebuild_structured"]

SUPPORTED = (
    "isotropic ViTs with timm's block layout (blocks[i].attn.qkv/proj/num_heads/head_dim, blocks[i].mlp.fc1/fc2): "
    "timm VisionTransformer / DeiT and vitlab's isotropic models"
)
CRITERIA = ("l1", "taylor")
LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a supported host, or a ``ValueError`` naming what does not fit."""
    blocks = attention_blocks(model, "structured pruning", SUPPORTED)
    for i, b in enumerate(blocks):
        attn, mlp = b.attn, getattr(b, "mlp", None)
        where = f"{host_name(model)}.blocks[{i}]"
        if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
            raise ValueError(f"structured pruning supports {SUPPORTED}; got {where}.mlp = {type(mlp).__name__}")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or not isinstance(mlp.norm, nn.Identity):
            raise ValueError(
                f"{where}: a norm over all heads / hidden channels mixes them; structured pruning of "
                "scale_norm blocks is not supported"
            )
        if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
            raise ValueError(f"{where}.attn.qkv has {attn.qkv.out_features} outputs, not 3 x heads x head_dim")
    return blocks


def _head_rows(attn: nn.Module, heads: torch.Tensor, parts: int) -> torch.Tensor:
    """Rows of a ``(parts * num_heads * head_dim, ...)`` weight that belong to ``heads``, part-major as timm packs."""
    d, width = attn.head_dim, attn.num_heads * attn.head_dim
    one = (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()
    return torch.cat([one + p * width for p in range(parts)])


def _l1(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {"heads": [], "mlp": []}
    for b in _blocks(model):
        a, m = b.attn, b.mlp
        per_head = a.qkv.weight.detach().abs().reshape(3, a.num_heads, a.head_dim, -1).sum((0, 2, 3))
        per_head += a.proj.weight.detach().abs().reshape(-1, a.num_heads, a.head_dim).sum((0, 2))
        out["heads"].append(per_head.float().cpu())
        per_ch = m.fc1.weight.detach().abs().sum(1) + m.fc2.weight.detach().abs().sum(0)
        out["mlp"].append(per_ch.float().cpu())
    return out


def _cross_entropy(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    logits = model(batch["image"])
    return F.cross_entropy(logits if torch.is_tensor(logits) else logits[0], batch["label"])


def _taylor(model: nn.Module, batches: Iterable[dict[str, Any]], loss_fn: LossFn) -> dict[str, list[torch.Tensor]]:
    blocks = _blocks(model)
    device = next(model.parameters()).device
    acts: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acts.append(args[0])  # (B, N, heads*head_dim) into proj, (B, N, hidden) into fc2

    targets = [m for b in blocks for m in (b.attn.proj, b.mlp.fc2)]
    handles = [m.register_forward_pre_hook(grab) for m in targets]
    score = [torch.zeros(m.in_features) for m in targets]
    was_training, seen = model.training, 0
    model.eval()  # no dropout noise in the scores
    try:
        for batch in batches:
            acts.clear()
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # a leaf image that needs grad makes every activation differentiable without touching param .grad
            batch["image"] = batch["image"].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, acts, allow_unused=True)
            for i, (a, g) in enumerate(zip(acts, grads, strict=True)):
                if g is not None:  # per image: |sum over tokens of a * g| (drop the unit -> first-order loss change)
                    score[i] += (a.detach() * g).sum(1).abs().sum(0).float().cpu()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("taylor importance needs at least one batch in 'batches'")
    out: dict[str, list[torch.Tensor]] = {"heads": [], "mlp": []}
    for b, s_attn, s_mlp in zip(blocks, score[0::2], score[1::2], strict=True):
        out["heads"].append(s_attn.reshape(b.attn.num_heads, b.attn.head_dim).sum(1))
        out["mlp"].append(s_mlp)
    return out


def importance(
    model: nn.Module,
    batches: Iterable[dict[str, Any]] | None = None,
    criterion: str = "l1",
    loss_fn: LossFn | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per-block scores ``{"heads": [(num_heads_i,)], "mlp": [(hidden_i,)]}``; higher means more important.

    Args:
        batches: dict batches with ``"image"`` and ``"label"`` (``"taylor"`` only).
        criterion: ``"l1"`` (weight magnitude, no data) or ``"taylor"`` (``|activation x gradient|``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy on the model's logits.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"importance criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "l1":
        return _l1(model)
    if batches is None:
        raise ValueError("taylor importance needs 'batches' (dict batches with 'image' and 'label')")
    return _taylor(model, batches, loss_fn or _cross_entropy)


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"structured pruning needs 0 <= {name} < 1 (the fraction to remove), got {value!r}")
    return float(value)


def _keep_count(total: int, fraction: float) -> int:
    return max(1, total - math.floor(fraction * total + 0.5))


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``old``'s selected output ``rows`` and input ``cols`` (None = all)."""
    w = old.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _shrink_attn(attn: nn.Module, keep: torch.Tensor) -> None:
    keep = keep.to(attn.qkv.weight.device)
    attn.qkv = _linear(attn.qkv, rows=_head_rows(attn, keep, 3))
    if getattr(attn, "gate", None) is not None:  # timm's gated attention: one gate row per output channel
        attn.gate = _linear(attn.gate, rows=_head_rows(attn, keep, 1))
    attn.proj = _linear(attn.proj, cols=_head_rows(attn, keep, 1))
    attn.num_heads = len(keep)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = len(keep) * attn.head_dim


def _shrink_mlp(mlp: nn.Module, keep: torch.Tensor) -> None:
    keep = keep.to(mlp.fc1.weight.device)
    mlp.fc1 = _linear(mlp.fc1, rows=keep)
    mlp.fc2 = _linear(mlp.fc2, cols=keep)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _top(score: torch.Tensor, k: int, total: int, what: str) -> torch.Tensor:
    if score.shape != (total,):
        raise ValueError(f"scores[{what}] has shape {tuple(score.shape)}, expected ({total},)")
    return torch.topk(score.detach().float().cpu(), k).indices.sort().values  # kept in their original order


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    heads: float = 0.0,
    mlp: float = 0.0,
    scores: dict[str, list[torch.Tensor]] | None = None,
    importance_criterion: str = "l1",
) -> dict[str, Any]:
    """Remove the lowest-scoring ``heads`` fraction of heads and ``mlp`` fraction of MLP channels of every block.

    Args:
        heads, mlp: fractions to remove per block, in [0, 1); at least one head and one channel stay.
        scores: from ``importance``; computed with ``importance_criterion`` (data-free ``"l1"``) when None.

    Returns the report ``{"heads_kept": [per block], "mlp_kept": [...], "params_before", "params_after"}``.
    """
    heads, mlp = _fraction(heads, "heads"), _fraction(mlp, "mlp")
    blocks = _blocks(model)
    if scores is None:
        if importance_criterion != "l1":
            raise ValueError(
                f"importance_criterion {importance_criterion!r} needs data: pass "
                "scores=importance(model, batches, criterion) (only 'l1' is computed here)"
            )
        scores = importance(model, criterion="l1")
    if not isinstance(scores, dict) or any(len(scores.get(k, [])) != len(blocks) for k in ("heads", "mlp")):
        raise ValueError(f"scores must be {{'heads': [...], 'mlp': [...]}} with one tensor per block ({len(blocks)})")
    before = _num_params(model)
    for i, b in enumerate(blocks):
        n, hidden = b.attn.num_heads, b.mlp.fc1.out_features
        if heads > 0:
            _shrink_attn(b.attn, _top(scores["heads"][i], _keep_count(n, heads), n, f"'heads'][{i}"))
        if mlp > 0:
            _shrink_mlp(b.mlp, _top(scores["mlp"][i], _keep_count(hidden, mlp), hidden, f"'mlp'][{i}"))
    return {
        "heads_kept": [b.attn.num_heads for b in blocks],
        "mlp_kept": [b.mlp.fc1.out_features for b in blocks],
        "params_before": before,
        "params_after": _num_params(model),
    }


def rebuild_structured(model: nn.Module, kwargs: dict[str, Any], report: dict[str, Any]) -> None:
    """Reshape a freshly built ``model`` to the kept sizes of ``report`` (weights are loaded afterwards)."""
    blocks = _blocks(model)
    kept_h, kept_m = report.get("heads_kept"), report.get("mlp_kept")
    if not isinstance(kept_h, list) or not isinstance(kept_m, list) or not len(kept_h) == len(kept_m) == len(blocks):
        raise ValueError(f"structured record needs 'heads_kept' and 'mlp_kept' lists of {len(blocks)} block sizes")
    with torch.no_grad():
        for b, h, m in zip(blocks, kept_h, kept_m, strict=True):
            if not 1 <= h <= b.attn.num_heads or not 1 <= m <= b.mlp.fc1.out_features:
                raise ValueError(f"recorded sizes ({h} heads, {m} channels) do not fit the built model")
            if h < b.attn.num_heads:
                _shrink_attn(b.attn, torch.arange(h))  # which ones does not matter: the saved weights overwrite
            if m < b.mlp.fc1.out_features:
                _shrink_mlp(b.mlp, torch.arange(m))


def _apply(model: nn.Module, heads: float = 0.0, mlp: float = 0.0, importance_criterion: str = "l1") -> dict[str, Any]:
    """``compress.apply`` entry: L1 importance (data-driven scores go through ``prune_structured`` directly)."""
    return prune_structured(model, heads, mlp, importance_criterion=importance_criterion)


METHOD = Method(
    name="structured",
    fn=_apply,
    replay="build",
    summary="remove attention heads and MLP hidden channels (really smaller tensors; vitlab's extension)",
    permanent_reason="the removed heads and channels are deleted from the weights",
    rebuild=rebuild_structured,
)
