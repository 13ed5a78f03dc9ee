"""MCTF: multi-criteria token fusion with one-step-ahead attention and bidirectional matching.

"Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers",
Lee et al., arXiv:2403.10030, github.com/mlvlab/MCTF.
At the input of each reducing block, token pairs are scored by three criteria (Sec. 3.2): similarity
of the tokens themselves ``((cos + 1) / 2) ** (1 / tau_sim)``, informativeness (the inverse of the
attention each token receives in *this* block, "one-step-ahead", normalised by its maximum)
``** (1 / tau_info)``, and size (inverse, normalised) ``** (1 / tau_size)``. Bidirectional bipartite
matching (Sec. 3.3) merges ``r // 2`` tokens A -> B, then the rest B -> the unmerged A tokens, with
size-weighted averages; proportional attention follows. Defaults are the official evaluation's:
r = 16, tau = (1, 20, 40), blocks 2..12 of 12.
Deviation: the "precise" one-step-ahead variant (attention recomputed after fusion, on SDPA) rather
than the approximate merging of the attention map; prefix tokens stay out of the matching. The
token-reduction consistency loss of MCTF's fine-tuning is not part of this plug-in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._runtime import Method, Plan, Signals, TokenState, prefix_plan
from .tome import schedule as _tome_schedule

__all__ = ["METHOD", "multi_criteria_matching", "plan", "schedule"]


def schedule(depth: int, r: int | Sequence[int] = 16, layers: Sequence[int] | None = None) -> list[float]:
    """Tokens fused per block: ``r`` at ``layers`` (default every block but the first), or an explicit list."""
    if not isinstance(r, int):
        return _tome_schedule(depth, r)
    layers = range(1, depth) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or r < 0:
        raise ValueError(f"MCTF needs r >= 0 and layers inside 0..{depth - 1}, got r={r}, bad layers {bad}")
    return [r if i in set(layers) else 0 for i in range(depth)]


def _pair_weight(v: torch.Tensor, tau: float) -> torch.Tensor:
    """(v_a v_b^T) ** (1 / tau) for the A (even) and B (odd) tokens of v (B, t), normalised by its max."""
    v = v / v.amax(1, keepdim=True)
    return (v[:, ::2, None] * v[:, None, 1::2]) ** (1 / tau)


def multi_criteria_matching(
    x: torch.Tensor,
    attn: torch.Tensor,
    size: torch.Tensor,
    r: int,
    tau: tuple[float, float, float] = (1.0, 20.0, 40.0),
    bidirectional: bool = True,
) -> tuple[torch.Tensor, int]:
    """Output slot of each of ``t`` tokens after fusing ``r``; x (B, t, C), attn and size (B, t)."""
    B, t, _ = x.shape
    x = x / x.norm(dim=-1, keepdim=True)
    scores = ((x[:, ::2] @ x[:, 1::2].transpose(1, 2) + 1) / 2) ** (1 / tau[0])
    scores = scores * _pair_weight(1 / attn, tau[1]) * _pair_weight(1 / size, tau[2])
    ta, tb = scores.shape[1:]
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    node_max, node_idx = scores.max(-1)
    edge_idx = node_max.argsort(-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]
    dst_idx = node_idx.gather(1, src_idx)
    # B -> unmerged A: each B token's best unmerged A partner, from the same scores
    back = scores.gather(1, unm_idx[..., None].expand(B, ta - r1, tb)).transpose(1, 2)  # (B, tb, ta - r1)
    node_max2, node_idx2 = back.max(-1)
    edge_idx2 = node_max2.argsort(-1, descending=True)
    unm_idx2, src_idx2 = edge_idx2[:, r2:], edge_idx2[:, :r2]
    ar = torch.arange(max(ta, tb), device=x.device)
    slot_b = torch.empty_like(node_idx2).scatter_(1, unm_idx2, (ta - r1 + ar[: tb - r2]).expand(B, -1))
    slot_b = slot_b.scatter_(1, src_idx2, node_idx2.gather(1, src_idx2))
    slot_a = torch.empty_like(node_idx).scatter_(1, unm_idx, ar[: ta - r1].expand(B, -1))
    slot_a = slot_a.scatter_(1, src_idx, slot_b.gather(1, dst_idx))
    dest = torch.empty(B, t, dtype=torch.long, device=x.device)
    dest[:, ::2], dest[:, 1::2] = slot_a, slot_b
    return dest, t - r


def plan(
    signals: Signals,
    state: TokenState,
    r: float,
    num_prefix: int,
    *,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    bidirectional: bool = True,
) -> Plan | None:
    x = signals.x[:, num_prefix:]
    N, t = signals.x.shape[1], x.shape[1]
    r = max(0, min(int(r), t // 2, N - 10))  # official: at most half the tokens, at least 10 left
    if r == 0:
        return None
    tau = (tau_sim, tau_info, tau_size)
    attn, size = signals.attn_received[:, num_prefix:], state.size[:, num_prefix:]
    dest, num_out = multi_criteria_matching(x, attn, size, r, tau, bidirectional)
    return prefix_plan(dest, num_out, num_prefix, state.size, normalize=True)


METHOD = Method("mctf", schedule, plan, needs=frozenset({"attn_received"}), before_attn=True, prop_attn=True)
