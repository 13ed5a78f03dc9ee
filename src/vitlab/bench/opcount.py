"""Multiplication / addition / shift counts of a forward pass (ShiftAddViT's op-count model, arXiv:2306.06446).

Forward hooks count the matmul-class operations that ShiftAddViT reparameterises, per image, as observed on a
real batch (so a mixture of experts is charged for the tokens actually routed to each expert):

- ``nn.Linear`` / ``nn.Conv2d``: one multiplication and one addition per multiply-accumulate;
- ``ShiftLinear``: one shift and one addition per multiply-accumulate;
- softmax attention (timm's PVT-v2 ``Attention``): ``q kᵀ`` and ``attn v``, multiply-accumulates;
- ``BinaryLinearAttention``: ``kᵀ v`` and ``q (kᵀ v)`` with {0, 1} codes, additions only.

Not counted: LayerNorm, GELU, softmax, normalisations and other element-wise ops (the same in every variant
except the few scalings of the binary attention). ``energy_pj`` applies per-op energies (45 nm figures as
tabulated by ShiftAddNet, arXiv:2010.12785: fp32 mult 3.7 pJ, fp32 add 0.9 pJ, 32-bit shift 0.13 pJ; the
official ``cal_energy.py`` runs a dataflow simulator instead). It is a model, not a measurement: PyTorch on a
CPU runs shifts as float multiplications, so no wall-clock gain follows from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from timm.models.pvt_v2 import Attention as PvtAttention

from ..layers.shiftadd import BinaryLinearAttention, ShiftLinear

__all__ = ["ENERGY_PJ", "OpCounts", "count_ops", "energy_pj"]

ENERGY_PJ = {"mults": 3.7, "adds": 0.9, "shifts": 0.13}


class OpCounts(dict):
    """``{"mults", "adds", "shifts", "images"}`` accumulated over hooked forwards; ``per_image()`` divides."""

    def per_image(self) -> dict[str, float]:
        n = max(self.get("images", 0), 1)
        return {k: self[k] / n for k in ("mults", "adds", "shifts")}


def _macs_linear(m: nn.Linear, x: torch.Tensor) -> int:
    return (x.numel() // m.in_features) * m.in_features * m.out_features


def _attention_tokens(m: PvtAttention, x: torch.Tensor, feat: tuple[int, int]) -> int:
    H, W = feat
    if m.pool is not None:
        return 49  # linear-SRA pools to 7x7
    if m.sr is not None:
        s = m.sr.stride[0]
        return (H // s) * (W // s)
    return H * W


@contextmanager
def count_ops(model: nn.Module) -> Iterator[OpCounts]:
    """Count ops of every forward of ``model`` inside the ``with`` block: ``with count_ops(m) as c: m(x)``."""
    counts = OpCounts(mults=0, adds=0, shifts=0, images=0)

    def add(kind: str, n: int) -> None:
        counts[kind] += int(n)

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(m, ShiftLinear):
            n = _macs_linear(m, x)
            add("shifts", n), add("adds", n)
        elif isinstance(m, nn.Linear):
            n = _macs_linear(m, x)
            add("mults", n), add("adds", n)
        elif isinstance(m, nn.Conv2d):
            n = out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            add("mults", n), add("adds", n)
        elif isinstance(m, PvtAttention):
            B, N, C = x.shape
            n = 2 * B * N * _attention_tokens(m, x, args[1]) * C  # q kᵀ and attn v over all heads
            add("mults", n), add("adds", n)
        elif isinstance(m, BinaryLinearAttention):
            B, N, C = x.shape
            add("adds", 2 * B * N * C * m.head_dim)  # kᵀ v and q (kᵀ v), both (d x d) per head and token

    handles = [m.register_forward_hook(hook) for m in model.modules()]

    def count_images(m: nn.Module, args: tuple) -> None:
        counts["images"] += len(args[0])

    handles.append(model.register_forward_pre_hook(count_images))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def energy_pj(per_image: dict[str, float]) -> float:
    """Energy model of one image's counted ops in picojoules (``ENERGY_PJ`` constants)."""
    return sum(per_image[k] * ENERGY_PJ[k] for k in ENERGY_PJ)
