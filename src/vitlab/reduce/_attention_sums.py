"""Column sums of the full N x N softmax attention, which MCTF's informativeness needs (how much attention each
token receives) and SDPA never exposes: formed in cache-sized chunks, one image at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

_SCORE_CHUNK = 1 << 15  # logits per chunk: one image at a time unless tiny (DeiT-S: from 197 down to 53 tokens),
# so its q and k are views of the qkv projection (no copy) and its logits (up to 0.9 MiB) stay in L2; several images
# per chunk need copies of q and k, and 8 MiB chunks (the old setting) ran 1.3-1.4x slower at batch 64


def _softmax_chunks(
    q: torch.Tensor, k: torch.Tensor, weight: torch.Tensor | None, scale: float
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The N x N attention ``softmax(q kᵀ · scale + log weight)`` of q, k (B, H, N, head_dim), whole images at a time.

    Yields ``(e, inv)`` per chunk of n images, in batch order: ``e = exp(logits - row max)`` (n, H * N, N) of the
    unweighted logits and ``inv`` (n, H * N, 1) the reciprocal of its weighted row sums ``e @ weight``, so that the
    attention is ``inv * e * weight``. The key weights (B, N) (sizes, for proportional attention; None: all 1)
    scale ``exp(logits)`` instead of entering the matmul as an additive ``log(size)`` (a (B, 1, 1, N) input term
    or an extra channel cost the matmul 25-35%), and the softmax's normalisation pass is left to whoever reads
    ``e`` (a third cheaper than ``softmax``). Each row of ``e`` holds a 1 (its max), so weights >= 1 keep the row
    sums >= 1. A chunk is small enough to stay in cache from the matmul through whatever reads it next; one
    image's q and k are strided views of the qkv projection that the matmul reads in place.
    """
    B, H, N, d = q.shape
    step = max(1, _SCORE_CHUNK // (H * N * N))
    unused = q.new_empty(())  # beta=0: no input term
    cols = [None] * -(-B // step) if weight is None else weight.unsqueeze(-1).split(step)
    for qc, kc, w in zip(q.split(step), k.transpose(-1, -2).split(step), cols, strict=True):
        n = qc.shape[0]
        logits = torch.baddbmm(unused, qc.reshape(n * H, N, d), kc.reshape(n * H, d, N), beta=0, alpha=scale)
        top = logits.detach().amax(-1, keepdim=True)  # any shift leaves the attention as it is
        # in place unless autograd needs the logits: half the working set
        e = (logits - top).exp() if logits.requires_grad else logits.sub_(top).exp_()
        e = e.view(n, H * N, N)
        yield e, (e.sum(-1, keepdim=True) if w is None else torch.bmm(e, w)).reciprocal()


def _column_sums(e: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """A ``_softmax_chunks`` chunk's attention summed over heads and queries, (n, N), before the key weights."""
    return torch.bmm(inv.transpose(1, 2), e).squeeze(1)


def _attention_received(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention each key receives, averaged over heads and queries: (B, N) from q, k (B, H, N, head_dim) and the
    key bias (B, 1, 1, N), ``log(size)``. The N x N softmax has to be formed for its column sums."""
    _, H, N, _ = q.shape
    weight = None if bias is None else bias.exp().flatten(1)
    parts = [_column_sums(e, inv) for e, inv in _softmax_chunks(q, k, weight, scale)]  # each chunk while in cache
    sums = torch.cat(parts) if len(parts) > 1 else parts[0]
    return (sums if weight is None else sums * weight) / (H * N)  # sum, then one division
