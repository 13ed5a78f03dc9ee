"""ATS: adaptive token sampling by inverse-transform sampling of class-attention significance.

"Adaptive Token Sampling For Efficient Vision Transformers", Fayyaz et al., arXiv:2111.15667,
github.com/adaptivetokensampling/ATS.
Significance of patch token j (Eq. 3): the class token's attention to it, summed over heads, times
the norm of its value, normalised over the patch tokens. Sorting the scores gives a cumulative
distribution; ``K`` evenly spaced points on its y-axis each pick the token whose CDF value is nearest
(inverse-transform sampling, deterministic as in the paper's inference). Tokens picked more than once
count once, so the number kept varies per image (<= K): the batch is padded to the largest count (or
to ``K`` with ``pad_to_budget=True``, for export), and padding has size 0, which masks it out of
every later attention (its features, a copy of some dropped token, are not zeroed: that would cost a
pass over the batch, and no real token reads them). Unsampled tokens are dropped; their patches leave
the source map (-1).
The official configuration samples at blocks 4..12 of 12 with a budget of all tokens (``keep=1``).
Deviation: tokens other than the class token (distillation, register) are always kept, like it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._runtime import Method, Plan, Signals, TokenState, prefix_plan

__all__ = ["METHOD", "plan", "schedule"]

MIN_TOKENS = 8  # the official sampler never keeps fewer


def schedule(depth: int, keep: float = 1.0, layers: Sequence[int] | None = None) -> list[float]:
    """Token budget per block as a fraction of its patch tokens (0 where the block does not sample)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"ATS budget fraction keep must be in (0, 1], got {keep}")
    if layers is None:
        layers = range(round(3 * depth / 12), depth)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"ATS layers {bad} are outside 0..{depth - 1}")
    return [keep if i in set(layers) else 0.0 for i in range(depth)]


def _first_at_least(cdf: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Position of the first value >= each y in the ascending rows of ``cdf`` (B, t); ys (B, k) -> (B, k)."""
    if torch.compiler.is_exporting():  # ONNX has no searchsorted: count the smaller values instead, O(k t)
        return (cdf.unsqueeze(1) < ys.unsqueeze(-1)).sum(-1)
    return torch.searchsorted(cdf, ys)


def sample(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse-transform sampling: a (B, t) bool mask of the tokens picked by ``k`` CDF points."""
    sorted_scores, order = scores.sort(dim=1)  # ascending
    cdf = sorted_scores.cumsum(1)
    lo, hi = cdf[:, :1], cdf[:, -1:]
    cdf = (cdf - lo) / (hi - lo).clamp_min(1e-12)
    start = torch.where(cdf > 0, cdf, torch.full_like(cdf, 2.0)).amin(1, keepdim=True).clamp_max(1.0)
    steps = torch.linspace(0, 1, k, device=scores.device, dtype=cdf.dtype)
    ys = start + (1 - start) * steps  # (B, k) from the smallest non-zero CDF value to 1
    # the nearest CDF value to y is the first one >= y or the one before it (binary search, not a (B, k, t)
    # distance table); ties go to the first position holding the value, as argmin over all distances would
    first = _first_at_least(cdf, cdf)  # (B, t) first position of each value
    above = _first_at_least(cdf, ys).clamp_max(cdf.shape[1] - 1)
    below, above = first.gather(1, (above - 1).clamp_min(0)), first.gather(1, above)
    nearer_below = (ys - cdf.gather(1, below)).abs() <= (ys - cdf.gather(1, above)).abs()
    picked = torch.where(nearer_below, below, above)  # (B, k) positions in sorted order
    hit_sorted = torch.zeros_like(cdf, dtype=torch.bool).scatter(1, picked, True)
    return torch.zeros_like(hit_sorted).scatter(1, order, hit_sorted)


def plan(signals: Signals, state: TokenState, keep: float, num_prefix: int, *, pad_to_budget: bool = False) -> Plan:
    attn = signals.cls_attn.sum(1)[:, num_prefix:]  # (B, t), padding has attention 0
    scores = attn * signals.value_norm[:, num_prefix:]
    scores = scores / scores.sum(1, keepdim=True).clamp_min(1e-12)  # Eq. 3
    B, t = scores.shape
    k = min(t, max(math.ceil(keep * t), MIN_TOKENS))
    hit = sample(scores, k) & (state.size[:, num_prefix:] > 0)
    count = hit.sum(1, keepdim=True)
    num_out = k if pad_to_budget else int(count.max())
    # sampled tokens keep their order; the others go to a last column that is cut off
    slot = torch.where(hit, hit.long().cumsum(1) - 1, num_out)
    tokens = torch.arange(t, device=scores.device).expand(B, t)
    keep_idx = torch.zeros(B, num_out + 1, dtype=torch.long, device=scores.device).scatter(1, slot, tokens)
    pad = torch.arange(num_out, device=scores.device) >= count  # (B, num_out): slots past this image's count
    return prefix_plan(keep_idx[:, :num_out], num_prefix, pad=pad)


METHOD = Method("ats", schedule, plan, needs=frozenset({"cls_attn", "value_norm"}), padded=True, needs_cls=True)
