"""ShiftAddViT conversion: binary-code attention, shift linears and {multiply, shift} mixtures of experts, in place.

ShiftAddViT: Mixture of Multiplication Primitives Towards Efficient Vision Transformers (You et al.,
arXiv:2306.06446, NeurIPS 2023; official code https://github.com/GATECH-EIC/ShiftAddViT, read only).
``compress.apply(model, "shiftadd", attention="binary", mlp="moe", balance="latency")`` on a PVT-v2 host (timm's
``pvt_v2_*``): the attention of every stage but the last becomes ``BinaryLinearAttention`` (adopting the host's
``q``/``kv``/``proj``; the spatial-reduction conv is dropped, linear attention does not need it), the last stage
keeps softmax MSA, and every MLP's ``fc1``/``fc2`` becomes a shift linear (``mlp="shift"``) or a top-1 mixture of
the original dense linear and a shift linear initialised from it (``mlp="moe"``); ``moe_attn=True`` does the same
to the projections of the binary attentions (as released; with ``attention="msa"``, of every attention). MLP
conversion alone (``attention="msa"``) works on any model whose ``mlp`` modules have Linear ``fc1``/``fc2``
(timm's ViTs too). Then fine-tune (``vitlab train --compress shiftadd``): ``aux_loss`` adds ``balance_weight``
x the summed balance losses of the mixtures.

``balance``: ``"latency"`` (the paper: cv² of latency-weighted importance and load, noisy gating, so the faster
shift expert gets more tokens; ``expert_latency`` defaults to the factors 6 (multiply) and 4 (shift) of the
released ``NoisyGate``), ``"cv2"`` (plain cv², noisy gating) or ``"released"`` (what the released code trains
with: ``NaiveGate``, top-1 without noise, and its ``engine.py`` sets the balance loss to 0 before use, so there
is no balance loss; with top-1 renormalised gates the router then receives no gradient at all).
Replay is ``"build"``: the conversion depends only on the architecture, and the saved weights load afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers.moe import MixtureOfExperts
from ..layers.shiftadd import BinaryLinearAttention, ShiftLinear
from ._method import Method
from ._record import surgery_of

__all__ = ["METHOD", "expert_counts", "moe_balance_loss", "shiftadd"]

ATTENTION = ("binary", "msa")
MLP = ("moe", "shift", "dense")
BALANCE = ("latency", "cv2", "released")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"shiftadd {name} must be one of {', '.join(options)}, got {value!r}")


def _convert_linear(linear: nn.Module, mlp: str, cfg: dict[str, Any]) -> nn.Module:
    if not isinstance(linear, nn.Linear) or isinstance(linear, ShiftLinear):
        raise ValueError(f"shiftadd converts nn.Linear layers, got {type(linear).__name__} (converted twice?)")
    shift = ShiftLinear.from_linear(linear, cfg["weight_bits"])
    if mlp == "shift":
        return shift
    balance = cfg["balance"]
    moe = MixtureOfExperts(
        [linear, shift],
        linear.in_features,
        k=cfg["k"],
        noisy_gating=balance != "released" and cfg["k"] < 2,
        latency=cfg["expert_latency"] if balance == "latency" else None,
    )
    return moe.to(device=linear.weight.device, dtype=linear.weight.dtype)


def _binary_attention(attn: nn.Module) -> BinaryLinearAttention:
    q, kv, proj = (getattr(attn, n, None) for n in ("q", "kv", "proj"))
    heads = getattr(attn, "num_heads", None)
    if isinstance(attn, BinaryLinearAttention):
        raise ValueError("shiftadd: this attention is already binary (the model was converted twice?)")
    if not all(isinstance(m, nn.Linear) for m in (q, kv, proj)) or not isinstance(heads, int):
        raise ValueError(
            f"binary attention adopts PVT-v2 attention (Linear q, kv, proj and num_heads; timm's pvt_v2_*), "
            f"got {type(attn).__name__}"
        )
    new = BinaryLinearAttention(q.in_features, heads, qkv_bias=q.bias is not None)
    new.q, new.kv, new.proj = q, kv, proj
    return new.to(device=q.weight.device, dtype=q.weight.dtype)


def _stage_blocks(model: nn.Module) -> list[list[nn.Module]]:
    stages = getattr(model, "stages", None)
    if stages is None or not all(hasattr(s, "blocks") for s in stages):
        raise ValueError(
            f"shiftadd attention='binary' needs a PVT-v2-style host (model.stages[i].blocks[j].attn, timm's "
            f"pvt_v2_*), got {type(model).__name__}; attention='msa' converts the MLPs of any model"
        )
    return [list(s.blocks) for s in stages]


def shiftadd(
    model: nn.Module,
    attention: str = "binary",
    mlp: str = "moe",
    balance: str = "latency",
    moe_attn: bool = False,
    binary_stages: list[int] | None = None,
    k: int = 1,
    expert_latency: list[float] | None = None,
    balance_weight: float = 0.01,
    weight_bits: int = 5,
) -> dict[str, Any]:
    """Convert ``model`` in place (see the module docstring); returns counts of converted layers and params.

    Args:
        binary_stages: stage indices that get binary attention (default: all but the last).
        k: experts per token (the paper: 1).
        expert_latency: (multiply, shift) latencies for ``balance="latency"`` (default ``[6.0, 4.0]``).
        balance_weight: weight of the summed balance loss in ``aux_loss``.
    """
    _choice("attention", attention, ATTENTION)
    _choice("mlp", mlp, MLP)
    _choice("balance", balance, BALANCE)
    if k not in (1, 2):
        raise ValueError(f"shiftadd k must be 1 or 2 (two experts: multiply and shift), got {k!r}")
    lat = [6.0, 4.0] if expert_latency is None else [float(v) for v in expert_latency]
    if len(lat) != 2 or min(lat) <= 0:
        raise ValueError(f"shiftadd expert_latency must be two positive numbers (multiply, shift), got {lat}")
    if isinstance(balance_weight, bool) or not isinstance(balance_weight, (int, float)) or balance_weight < 0:
        raise ValueError(f"shiftadd balance_weight must be a number >= 0, got {balance_weight!r}")
    if mlp == "dense" and attention == "msa" and not moe_attn:
        raise ValueError("shiftadd with attention='msa', mlp='dense' and moe_attn=False changes nothing")
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or not 2 <= weight_bits <= 16:
        raise ValueError(f"shiftadd weight_bits must be an integer in 2..16 (sign + shift bits), got {weight_bits!r}")
    mlps = [] if mlp == "dense" else [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "mlp"]
    mlps = [m for m in mlps if hasattr(m, "fc1") and hasattr(m, "fc2")]
    if mlp != "dense" and not mlps:
        raise ValueError(f"shiftadd mlp={mlp!r} found no `mlp` modules with Linear fc1/fc2 in this model")
    cfg = {"k": k, "balance": balance, "expert_latency": lat, "weight_bits": weight_bits}
    before = sum(p.numel() for p in model.parameters())
    report = {"binary_attention": 0, "shift_linear": 0, "moe": 0}

    attns: list[nn.Module] = []  # whose projections moe_attn converts: the binary ones (as released), else all
    if attention == "binary":
        stages = _stage_blocks(model)
        chosen = list(range(len(stages) - 1)) if binary_stages is None else list(binary_stages)
        if any(not isinstance(i, int) or not 0 <= i < len(stages) for i in chosen):
            raise ValueError(f"shiftadd binary_stages must be stage indices in 0..{len(stages) - 1}, got {chosen}")
        for i in chosen:
            for block in stages[i]:
                block.attn = _binary_attention(block.attn)
                attns.append(block.attn)
                report["binary_attention"] += 1
    else:
        attns = [m for name, m in model.named_modules() if name.endswith("attn") and hasattr(m, "proj")]
    if moe_attn:
        for attn in attns:
            for name in ("q", "kv", "qkv", "proj"):
                if isinstance(getattr(attn, name, None), nn.Linear):
                    setattr(attn, name, _convert_linear(getattr(attn, name), "moe", cfg))
                    report["moe"] += 1
    for m in mlps:
        for name in ("fc1", "fc2"):
            setattr(m, name, _convert_linear(getattr(m, name), mlp, cfg))
            report["moe" if mlp == "moe" else "shift_linear"] += 1
    report["shift_linear"] += report["moe"]  # every mixture holds one shift expert
    return {**report, "params_before": before, "params_after": sum(p.numel() for p in model.parameters())}


def moe_balance_loss(model: nn.Module, latency_aware: bool = True) -> torch.Tensor | None:
    """Sum of the balance losses of ``model``'s mixtures from their last forward (None if it has none)."""
    losses = [
        m.balance_loss() if latency_aware else m.balance_loss(None)
        for m in model.modules()
        if isinstance(m, MixtureOfExperts) and m.stats is not None
    ]
    return torch.stack(losses).sum() if losses else None


def expert_counts(model: nn.Module) -> torch.Tensor | None:
    """Tokens routed to each expert in the last forward, summed over ``model``'s mixtures (None if none)."""
    counts = [m.stats.counts for m in model.modules() if isinstance(m, MixtureOfExperts) and m.stats is not None]
    return torch.stack(counts).sum(0) if counts else None


def _aux_loss(model: nn.Module) -> dict[str, torch.Tensor]:
    records = [r for r in surgery_of(model) if r["kind"] == "compress" and r["method"] == "shiftadd"]
    if not records or records[-1]["kwargs"].get("balance") == "released":
        return {}
    weight = float(records[-1]["kwargs"].get("balance_weight", 0.01))
    loss = moe_balance_loss(model)
    return {} if loss is None or weight == 0 else {"moe_balance": weight * loss}


METHOD = Method(
    name="shiftadd",
    fn=shiftadd,
    replay="build",
    summary="ShiftAddViT: binary-code attention, shift linears, {multiply, shift} MoE with latency-aware balancing",
    permanent_reason="attention, MLP and projection layers are replaced by different modules",
    aux_loss=_aux_loss,
)
