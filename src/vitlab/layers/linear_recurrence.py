"""First-order linear recurrences ``h_t = a_t h_{t-1} + b_t`` in eager PyTorch, for selective scans.

The sequence is cut into ``n`` chunks of ``T`` steps stored step-major, ``(T, n, ...)``: one Python loop over
the ``T`` steps scans all chunks at once, each step touching one contiguous slice (so the local scans take
one pass over the data), then a short recurrence over the chunk ends gives the state entering each chunk, and
one fused pass adds its decayed contribution. With ``T ~ sqrt(L)`` that is ``O(sqrt(L))`` small Python steps
and a few passes over memory, where a Hillis-Steele scan makes ``log2(T)`` full passes per level.
The scan works in place; under autograd it runs on copies and its backward is the same recurrence run
backwards in time (``g_t = dL/dh_t + a_{t+1} g_{t+1}``, ``dL/db_t = g_t``, ``dL/da_t = g_t h_{t-1}``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["chunked_recurrence", "linear_recurrence"]

_SEQUENTIAL_MAX = 32  # up to this many steps a plain sequential loop is cheapest


def _records(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _chunked_scan_(a: Tensor, b: Tensor) -> Tensor:
    """``chunked_recurrence`` in place: ``a`` is overwritten, ``b`` becomes ``h``."""
    for prev, t in itertools.pairwise(range(a.shape[0])):  # each chunk from state 0, all chunks at once
        b[t].addcmul_(a[t], b[prev])
        a[t].mul_(a[prev])  # decay since the chunk start
    if a.shape[1] > 1:  # chunk c > 0 enters with chunk c - 1's end state
        b[:, 1:].addcmul_(a[:, 1:], linear_recurrence(a[-1, :-1].clone(), b[-1, :-1].clone()))
    return b


def _shifted(x: Tensor, step: int) -> Tensor:
    """``x`` (step-major chunks) moved ``step = +-1`` along the sequence, zero where it runs off the end."""
    y = torch.zeros_like(x)
    if step > 0:  # y at p holds x at p - 1
        y[1:], y[0, 1:] = x[:-1], x[-1, :-1]
    else:  # y at p holds x at p + 1
        y[:-1], y[-1, :-1] = x[1:], x[0, 1:]
    return y


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        h = _chunked_scan_(a.detach().clone(), b.detach().clone())
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        a, h = ctx.saved_tensors
        # flipping both the step and the chunk dim reverses the sequence, still step-major
        g = _chunked_scan_(_shifted(a, -1).flip(0, 1), grad.flip(0, 1)).flip(0, 1)  # flip copies
        return g * _shifted(h, 1), g


def chunked_recurrence(a: Tensor, b: Tensor) -> Tensor:
    """``h = a h_prev + b`` from ``h = 0`` over ``n`` chunks of ``T`` steps stored step-major: ``(T, n, ...)``.

    The sequence runs through chunk 0 (steps ``0..T-1``), then chunk 1, ...; returns ``h`` like ``b``.
    Without autograd recording, ``a`` and ``b`` are overwritten (``b`` becomes ``h``).
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must share a (T, n, ...) shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _ChunkedScan.apply(a, b) if _records(a, b) else _chunked_scan_(a, b)


def linear_recurrence(a: Tensor, b: Tensor, chunk_size: int | None = None) -> Tensor:
    """``h_t = a_t h_{t-1} + b_t`` along dim 0 from ``h_{-1} = 0``: ``a, b (L, ...) -> h (L, ...)``.

    Chunks of ``chunk_size`` steps (default: ``ceil(sqrt(L))``, one chunk up to 32 steps); the chunk carries
    recurse the same way. May overwrite ``a`` and ``b`` when autograd is not recording.
    """
    if chunk_size is not None and chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    length = a.shape[0]
    if chunk_size is None:
        chunk_size = length if length <= _SEQUENTIAL_MAX else math.isqrt(length - 1) + 1
    n = -(-length // chunk_size)
    pad = n * chunk_size - length
    if pad:  # identity steps: a = 1, b = 0
        a = torch.cat([a, a.new_ones(pad, *a.shape[1:])])
        b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])])
    a, b = (t.unflatten(0, (n, chunk_size)).transpose(0, 1).contiguous() for t in (a, b))  # (chunk, n, ...)
    return chunked_recurrence(a, b).transpose(0, 1).flatten(0, 1)[:length]
