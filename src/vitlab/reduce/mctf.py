"""MCTF: multi-criteria token fusion with one-step-ahead attention and bidirectional matching.

"Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers",
Lee et al., arXiv:2403.10030, github.com/mlvlab/MCTF.
At the input of each reducing block, token pairs are scored by three criteria (Sec. 3.2): similarity
of the tokens themselves ``((cos + 1) / 2) ** (1 / tau_sim)``, informativeness (the inverse of the
attention each token receives in *this* block, "one-step-ahead", averaged over heads and queries,
normalised by its maximum) ``** (1 / tau_info)``, and size (inverse, normalised) ``** (1 / tau_size)``.
Bidirectional bipartite matching (Sec. 3.3) merges ``r // 2`` tokens A -> B, then the rest B -> the
unmerged A tokens, with size-weighted averages; proportional attention follows. Defaults are the official
evaluation's (``run/eval_deit_s_mctf.sh``): r = 16, tau = (1, 20, 40), blocks 2..12 of 12.
Scores come from one matmul of the raw tokens, scaled per row and column (with tau_sim = 1 the
informativeness-size factors fold into that scale, no power is taken): an identity, not an approximation.
One-step-ahead attention, option ``one_step_ahead``:
- "precise" (the default here; the official ``one_step_ahead=2``): attention is computed again on the fused
  tokens, on SDPA. The q, k, v of tokens that only moved are reused and only the fused slots are projected
  again. Exact; what it costs beyond the reduced attention is the N x N softmax for the informativeness (its
  q kᵀ, exp and column sums, a few images at a time in cache);
- "approx" (the official evaluation's ``one_step_ahead=1``): the N x N attention of the block's input both
  scores the tokens and, fused along rows (size-weighted, like the tokens) and columns (summed over the keys
  that share a slot), is the attention of the fused tokens, times their values. No second q kᵀ or softmax;
  q, k are projected from the input, v from the fused tokens; the map is never gathered (the runtime's
  ``ReducingBlock._fuse_ahead``). Fewer FLOPs (about 5% of DeiT-S at r = 16) and about 4-6% more img/s.
Deviations from the official default (``one_step_ahead=1``, ``pooling_type=1``):
- the default is the precise one-step-ahead (above);
- fused features are size-weighted averages (ToMe's), where the official default weighs them by size
  times the attention they receive; "approx" fuses the map's rows with the same size weights (the
  official ``pooling_type=0``);
- prefix tokens (class, distillation, register) stay out of the matching instead of being masked.
The token-reduction consistency loss of MCTF's fine-tuning is not part of this plug-in.
"""

from __future__ import annotations

import math
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


def _token_weight(attn: torch.Tensor, size: torch.Tensor, tau_info: float, tau_size: float) -> torch.Tensor:
    """Per-token factor u (B, t) with W_info * W_size of a pair (i, j) = u_i u_j (Eq. 4-5): informativeness is the
    inverse attention received, size the inverse size, each normalised by its maximum (as the official code)."""
    info = attn.amin(1, keepdim=True) / attn  # (1 / a) / max(1 / a)
    small = size.amin(1, keepdim=True) / size
    return info ** (1 / tau_info) * small ** (1 / tau_size)


def _pair_scores(x: torch.Tensor, u: torch.Tensor, tau_sim: float) -> torch.Tensor:
    """Multi-criteria scores (B, ta, tb) of the A (even) and B (odd) tokens, up to a constant factor:
    ``(cos_ij + 1) ** (1 / tau_sim) * u_i * u_j``, from the raw dot products (the normalisation is a row and
    column scale of the (ta, tb) matrix, cheaper than normalising the (t, C) tokens)."""
    scale = 1 / x.norm(dim=-1)  # (B, t)
    if tau_sim == 1:  # u_i u_j (cos_ij + 1) = (u_i / |x_i|) (u_j / |x_j|) x_i.x_j + u_i u_j: no pow pass
        scale = scale * u
    scores = (x[:, ::2] @ x[:, 1::2].transpose(1, 2)).mul_(scale[:, ::2, None]).mul_(scale[:, None, 1::2])
    if tau_sim == 1:
        return scores.add_(u[:, ::2, None] * u[:, None, 1::2])
    return scores.add_(1).pow_(1 / tau_sim).mul_(u[:, ::2, None]).mul_(u[:, None, 1::2])


@torch.no_grad()
def multi_criteria_matching(
    x: torch.Tensor,
    attn: torch.Tensor,
    size: torch.Tensor,
    r: int,
    tau: tuple[float, float, float] = (1.0, 20.0, 40.0),
    bidirectional: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MCTF's matching of ``t`` tokens (x (B, t, C), attention received and size (B, t)) that fuses ``r``.

    Returns ``(keep, src, dst)``: the token that seeds each of the ``t - r`` output slots (unmerged A tokens,
    then unmerged B tokens, each best-matched first) and the ``r`` fused tokens with their slots.
    """
    if min(tau) <= 0:
        raise ValueError(f"MCTF temperatures tau_sim, tau_info, tau_size must be > 0, got {tau}")
    B = x.shape[0]
    scores = _pair_scores(x, _token_weight(attn, size, tau[1], tau[2]), tau[0])
    ta, tb = scores.shape[1:]
    r1 = r // 2 if bidirectional else r
    r2 = r - r1
    ar = torch.arange(max(ta, tb), device=x.device)
    node_max, node_idx = scores.max(-1)
    edge_idx = node_max.argsort(-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r1:], edge_idx[:, :r1]
    slot_a = torch.empty_like(node_idx).scatter_(1, unm_idx, ar[: ta - r1].expand(B, -1))  # unmerged A only
    if r2:
        # B -> unmerged A: each B token's best partner among the A tokens that were not merged away
        scores.scatter_(1, src_idx.unsqueeze(-1).expand(B, r1, tb), -math.inf)
        node_max2, node_idx2 = scores.max(1)  # (B, tb), A indices
        edge_idx2 = node_max2.argsort(-1, descending=True)
        unm_idx2, src_idx2 = edge_idx2[:, r2:], edge_idx2[:, :r2]
        slot_b = torch.empty_like(node_idx2).scatter_(1, unm_idx2, (ta - r1 + ar[: tb - r2]).expand(B, -1))
        slot_b = slot_b.scatter_(1, src_idx2, slot_a.gather(1, node_idx2.gather(1, src_idx2)))
    else:  # one direction only: every B token keeps a slot of its own
        unm_idx2 = ar[:tb].expand(B, tb)
        src_idx2 = unm_idx2[:, :0]
        slot_b = ta - r1 + unm_idx2
    keep = torch.cat([2 * unm_idx, 2 * unm_idx2 + 1], 1)
    src = torch.cat([2 * src_idx, 2 * src_idx2 + 1], 1)
    # a fused A token follows its B partner, which may itself have moved into an A slot
    dst = torch.cat([slot_b.gather(1, node_idx.gather(1, src_idx)), slot_b.gather(1, src_idx2)], 1)
    return keep, src, dst


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
    one_step_ahead: str = "precise",
) -> Plan | None:
    """MCTF's plan for one block. ``one_step_ahead`` ("precise" or "approx", see the module docstring) is read by
    the runtime (``ReducingBlock``), which decides what attention follows the plan; the plan is the same."""
    del one_step_ahead
    x = signals.x[:, num_prefix:]
    N, t = signals.x.shape[1], x.shape[1]
    r = max(0, min(int(r), t // 2, N - 10))  # official: at most half the tokens, at least 10 left
    if r == 0:
        return None
    tau = (tau_sim, tau_info, tau_size)
    attn, size = signals.attn_received[:, num_prefix:], state.size[:, num_prefix:]
    keep, src, dst = multi_criteria_matching(x, attn, size, r, tau, bidirectional)
    return prefix_plan(keep, num_prefix, weight=state.size, merge_src=src, merge_dst=dst, normalize=True)


METHOD = Method("mctf", schedule, plan, needs=frozenset({"attn_received"}), before_attn=True, prop_attn=True)
