"""EViT: keep the tokens the class token attends to most, fuse the rest into one token.

"Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
Liang et al., arXiv:2202.07800, github.com/youweiliang/evit.
At each reducing block, after attention, the class-token attention averaged over heads scores the
patch tokens; the top ``ceil(keep * t)`` are kept (Sec. 3.1) and the others are fused into one token,
``sum_i a_i x_i`` with their class attention ``a_i`` as weights (Sec. 3.2, unnormalised as in the
official code). A fused token from an earlier block competes like any other token later on.
The paper reduces at the 4th, 7th and 10th of 12 blocks; other depths get the same relative positions.
Deviation: tokens other than the class token (distillation, register) are kept like it, never fused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._runtime import Method, Plan, Signals, TokenState, prefix_plan

__all__ = ["METHOD", "plan", "schedule"]

PAPER_LAYERS = (3, 6, 9)  # 0-based: the paper's 4th, 7th and 10th blocks of 12


def schedule(depth: int, keep: float = 0.7, layers: Sequence[int] | None = None) -> list[float]:
    """Keep rate per block (0 where the block keeps everything)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"EViT keep rate must be in (0, 1], got {keep}")
    if layers is None:
        layers = sorted({min(depth - 1, round(i * depth / 12)) for i in PAPER_LAYERS})
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"EViT layers {bad} are outside 0..{depth - 1}")
    return [keep if i in set(layers) and keep < 1.0 else 0.0 for i in range(depth)]


def plan(signals: Signals, state: TokenState, keep: float, num_prefix: int) -> Plan | None:
    attn = signals.cls_attn.mean(1)[:, num_prefix:]  # (B, t): class attention averaged over heads
    B, t = attn.shape
    k = math.ceil(keep * t)
    if k >= t:
        return None
    order = attn.argsort(dim=1, descending=True)  # most attended first
    # slots: the top k, then the fused token, seeded by the best of the rest, which the others join
    dst = torch.full((B, t - k - 1), k, dtype=torch.long, device=attn.device)
    weight = attn.scatter(1, order[:, :k], 1.0)  # Sec. 3.2: kept tokens as they are, fused = sum_i a_i x_i
    weight = torch.cat([attn.new_ones(B, num_prefix), weight], 1)
    return prefix_plan(order[:, : k + 1], num_prefix, weight=weight, merge_src=order[:, k + 1 :], merge_dst=dst)


METHOD = Method("evit", schedule, plan, needs=frozenset({"cls_attn"}), needs_cls=True)
