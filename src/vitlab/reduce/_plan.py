"""Token bookkeeping and plans: ``TokenState`` (sizes, source map) and how a ``Plan`` moves tokens.

A plan says which token seeds each output slot and which tokens are added into which slot, with what
weight. ``apply_plan`` moves features, sizes and (when tracked) the source map with one row gather for
the slots and one row scatter-add for the merged tokens (few of them): the output is written once,
contiguous, instead of scattering every token into a zeroed buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Plan", "TokenState", "apply_plan", "prefix_plan"]


class TokenState(NamedTuple):
    """Per-call token bookkeeping that travels through the blocks with the features."""

    size: torch.Tensor  # (B, N) input patches each token holds; 1 for prefix tokens, 0 for padding
    source: torch.Tensor | None = None  # (B, P) index of the token holding each input patch, -1 once dropped;
    # None unless asked for (``forward_with_state``): the plain forward does not track it

    @classmethod
    def initial(cls, x: torch.Tensor, num_prefix: int, track_source: bool = False) -> TokenState:
        B, N, _ = x.shape
        size = x.new_ones(B, N, dtype=torch.float32)
        if not track_source:
            return cls(size)
        return cls(size, torch.arange(num_prefix, N, device=x.device).expand(B, N - num_prefix))


@dataclass(frozen=True)
class Plan:
    """Where tokens go. Output slot ``s`` starts from token ``keep[:, s]``; token ``merge_src[:, e]`` is added
    into slot ``merge_dst[:, e]``; a token in neither is dropped. All indices are (B, ·) over the N tokens.

    Features land as ``sum(weight * x)`` per slot (``weight`` (B, N), None = 1), divided by ``sum(weight)``
    when ``normalize``; sizes add up. ``pad`` (B, S) marks slots that hold no token (ATS's per-image counts):
    they get size 0, which masks them out of every later attention, and their features are left unspecified.
    """

    keep: torch.Tensor
    weight: torch.Tensor | None = None
    merge_src: torch.Tensor | None = None
    merge_dst: torch.Tensor | None = None
    normalize: bool = False
    pad: torch.Tensor | None = None


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) indices into rows of n tokens -> (B * K,) indices into the (B * n) rows of the whole batch."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n).flatten()


def _slots(plan: Plan, N: int) -> torch.Tensor:
    """(B, N) the output slot each of the N tokens lands in (seeds one, or is added into one), -1 if dropped."""
    B, S = plan.keep.shape
    keep = plan.keep if plan.pad is None else plan.keep.masked_fill(plan.pad, N)  # padding seeds no token
    dest = torch.full((B, N + 1), -1, dtype=torch.long, device=keep.device)  # column N: padding, never read
    dest = dest.scatter(1, keep, torch.arange(S, device=keep.device).expand(B, S))
    if plan.merge_src is not None:
        dest = dest.scatter(1, plan.merge_src, plan.merge_dst)
    return dest[:, :N]


def _moved_sources(plan: Plan, source: torch.Tensor, N: int) -> torch.Tensor:
    """The source map after ``plan``: each patch follows its token to that token's slot, or to -1 if dropped."""
    return torch.where(source < 0, -1, _slots(plan, N).gather(1, source.clamp_min(0)))


def apply_plan(plan: Plan, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState]:
    """Apply one plan to features (B, N, C), sizes and (when tracked) the source map."""
    B, N, C = x.shape
    keep, src, dst = plan.keep, plan.merge_src, plan.merge_dst
    S = keep.shape[1]
    size = state.size.gather(1, keep)
    if src is not None:
        size = size.scatter_add(1, dst, state.size.gather(1, src))
    weight = plan.weight if plan.weight is not None or not plan.normalize else torch.ones_like(state.size)
    w_keep = w_src = None
    if weight is not None:
        w_keep = weight.gather(1, keep)
        w_src = None if src is None else weight.gather(1, src)
        if plan.normalize:  # divide by each slot's total weight, which is its new size when weights are sizes
            total = size if weight is state.size else w_keep if src is None else w_keep.scatter_add(1, dst, w_src)
            w_keep = w_keep / total
            w_src = None if src is None else w_src / total.gather(1, dst)
    if plan.pad is not None:
        size = size.masked_fill(plan.pad, 0.0)
    rows = x.reshape(B * N, C)
    out = rows.index_select(0, _flat(keep, N)).view(B, S, C)
    if w_keep is not None and plan.normalize and weight is state.size:
        # size-weighted means (ToMe, MCTF): a slot nothing merges into keeps its token as is (size / size is
        # exactly 1), so only the slots that receive tokens are scaled, not every row
        if src is not None:
            slots = out.view(B * S, C)
            at = _flat(dst, S)  # repeats write identical rows
            slots.index_copy_(0, at, slots.index_select(0, at).mul_(w_keep.gather(1, dst).reshape(-1, 1).to(x.dtype)))
    elif w_keep is not None:
        out.mul_(w_keep.unsqueeze(-1).to(x.dtype))  # in place on the fresh gather: no second buffer
    if src is not None:
        add = rows.index_select(0, _flat(src, N))
        if w_src is not None:
            add.mul_(w_src.reshape(-1, 1).to(x.dtype))
        out.view(B * S, C).index_add_(0, _flat(dst, S), add)  # `out` is a fresh tensor: safe in place
    source = None if state.source is None else _moved_sources(plan, state.source, N)
    return out, TokenState(size, source)


def prefix_plan(
    keep: torch.Tensor,
    num_prefix: int,
    *,
    weight: torch.Tensor | None = None,
    merge_src: torch.Tensor | None = None,
    merge_dst: torch.Tensor | None = None,
    normalize: bool = False,
    pad: torch.Tensor | None = None,
) -> Plan:
    """A plan over all tokens from indices over the patch tokens: prefix tokens keep the first slots.

    ``weight`` is already over all N tokens (prefix included); the index tensors are over the patch tokens.
    """
    if num_prefix:
        B = keep.shape[0]
        keep = torch.cat([torch.arange(num_prefix, device=keep.device).expand(B, num_prefix), keep + num_prefix], 1)
        if merge_src is not None:
            merge_src, merge_dst = merge_src + num_prefix, merge_dst + num_prefix
        if pad is not None:
            pad = torch.cat([pad.new_zeros(B, num_prefix), pad], 1)
    return Plan(keep, weight, merge_src, merge_dst, normalize, pad)
