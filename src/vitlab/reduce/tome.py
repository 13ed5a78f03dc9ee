"""ToMe: bipartite soft matching of tokens on their mean keys, with proportional attention.

"Token Merging: Your ViT But Faster", Bolya et al., arXiv:2210.09461, github.com/facebookresearch/ToMe.
Each reducing block splits the patch tokens alternately into sets A and B, links every A token to
its most similar B token (cosine of the keys averaged over heads), and merges the ``r`` most similar
A tokens into their partners by a size-weighted average (Sec. 3). Later blocks add ``log(size)`` to
the attention logits (proportional attention).
Default amount: ToMe's off-the-shelf setting for 12-block ViTs at 224 px (r = 13 for ViT-S/B/16 and
DeiT-Ti/S/16 in the official README: 196 -> 40 patch tokens, 1.6x img/s for about 2 points off the shelf,
0.5 after training): the same share of the host's patch tokens (156 of 196) merged, spread over its
depth and rounded (r = 7 at 24 blocks, the README's choice for ViT-L/16; r = 7 for 49 tokens in 6 blocks, 7 left).
Deviation: prefix tokens (class, distillation, register) are left out of the matching altogether
instead of being protected with ``-inf`` scores, so the A/B alternation starts at the first patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._runtime import Method, Plan, Signals, TokenState, prefix_plan

__all__ = ["DEFAULT_MERGES", "METHOD", "bipartite_soft_matching", "schedule"]


DEFAULT_MERGES = 13 * 12  # ToMe's r = 13 over the 12 blocks of ViT-S/B/16 at 224 px (module docstring)
DEFAULT_TOKENS = 196  # ... of its 196 patch tokens


def schedule(
    depth: int, r: int | Sequence[int] | None = None, inflect: float = 0.0, num_tokens: int | None = None
) -> list[float]:
    """Tokens merged per block: a constant ``r``, ToMe's ``(r, inflect)`` trend, or an explicit list.

    ``r=None`` merges ToMe's share of the ``num_tokens`` patch tokens (``apply`` passes the host's count),
    ``num_tokens * 156 / 196 / depth`` rounded half up, at least 1 (13 for 196 patches in 12 blocks); without a count
    it assumes ViT-B's 196 patches, ``ceil(156 / depth)``. ``r=0`` leaves the model exact.
    ``inflect=-1`` is the paper's decreasing schedule (2r at the first block down to 0), ``+1`` increasing.
    """
    if r is None and num_tokens:
        r = max(1, math.floor(num_tokens * DEFAULT_MERGES / DEFAULT_TOKENS / max(depth, 1) + 0.5))  # half up
    elif r is None:
        r = math.ceil(DEFAULT_MERGES / max(depth, 1))
    if not isinstance(r, int):
        r = [int(v) for v in r]
        if len(r) > depth or min(r, default=0) < 0:
            raise ValueError(f"ToMe r schedule needs at most {depth} non-negative entries, got {r}")
        return [*r, *[0] * (depth - len(r))]
    if r < 0 or not -1.0 <= inflect <= 1.0:
        raise ValueError(f"ToMe needs r >= 0 and -1 <= inflect <= 1, got r={r}, inflect={inflect}")
    lo = int(r * (1.0 - inflect))
    step = (2 * r - 2 * lo) / max(depth - 1, 1)
    return [int(lo + step * i) for i in range(depth)]


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching of ``t`` tokens (metric (B, t, C)) that merges ``r`` of them.

    Returns ``(keep, src, dst)``: the token that seeds each of the ``t - r`` output slots, in ToMe's order
    (unmerged A tokens, most similar first, then all B tokens), and the ``r`` merged A tokens with their slots.
    """
    B, t, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (B, ta, tb) cosine similarities
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)  # (B, ta)
    ta, tb = a.shape[1], b.shape[1]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    keep = torch.cat([2 * unm_idx, torch.arange(1, t, 2, device=metric.device).expand(B, tb)], 1)
    return keep, 2 * src_idx, node_idx.gather(1, src_idx) + (ta - r)  # B token j sits in slot ta - r + j


def plan(signals: Signals, state: TokenState, r: float, num_prefix: int) -> Plan | None:
    keys = signals.keys[:, num_prefix:]
    r = min(int(r), keys.shape[1] // 2)  # ToMe merges at most half the tokens per block
    if r <= 0:
        return None
    keep, src, dst = bipartite_soft_matching(keys, r)
    return prefix_plan(keep, num_prefix, weight=state.size, merge_src=src, merge_dst=dst, normalize=True)


METHOD = Method("tome", schedule, plan, needs=frozenset({"keys"}), prop_attn=True)
