"""Multiplication-free primitives of ShiftAddViT: power-of-two (shift) linear layers and binary-code attention.

ShiftAddViT: Mixture of Multiplication Primitives Towards Efficient Vision Transformers (You et al.,
arXiv:2306.06446, NeurIPS 2023; https://github.com/GATECH-EIC/ShiftAddViT, read for understanding only).

- ``ShiftLinear`` (DeepShift-Q, Elhoushi et al., arXiv:1905.13298): a float weight is kept for training and
  used as ``sign(w) * 2^p`` with ``p = clamp(round(log2|w|))`` in every forward, so the product is a bit shift;
  rounding uses a straight-through estimator (the gradient reaches ``w`` unchanged). ``weight_bits`` = 1 sign
  bit + the shift exponent, ``p`` in ``[-(2^(bits-1) - 1), 0]``. Deviation: activations are not fixed-point
  rounded (DeepShift's optional 16.16 activation rounding is a no-op at float32 precision for these ranges).
- ``BinaryLinearAttention`` (the released ``LinAngularAttention_binary``): q and k are L2-normalised per head,
  binarised to {0, 1} by thresholding at their mean (straight-through: the gradient of ``clamp(x, 0, 1)``),
  and the output is the angular-kernel linear attention ``v/2 + q (kᵀ v) / π`` (with binary q and k both
  products need additions only), re-normalised per head, plus a depthwise 9x1 conv on v along the token axis.
  Deviation: the threshold is the mean per sample and head; the released code takes the mean of the whole
  batch tensor, which makes a sample's output depend on the rest of its batch. The released config named
  ``LinAngular`` maps to a learned-hashing (KSH) variant instead; this file implements the binary one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BinaryLinearAttention", "ShiftLinear", "binarize_ste", "round_power_of_two"]


def round_power_of_two(w: torch.Tensor, weight_bits: int = 5) -> torch.Tensor:
    """``sign(w) * 2^clamp(round(log2|w|), -(2^(bits-1) - 1), 0)`` with a straight-through gradient to ``w``."""
    if weight_bits < 2:
        raise ValueError(f"weight_bits must be >= 2 (a sign bit and at least one shift bit), got {weight_bits}")
    p_min = -(2 ** (weight_bits - 1) - 1)
    with torch.no_grad():
        p = torch.log2(w.abs().clamp_min(2.0 ** (p_min - 1))).round().clamp(p_min, 0)
        q = torch.sign(w) * torch.pow(2.0, p)  # exact zeros stay zero (a skipped add)
    return w + (q - w).detach()


def binarize_ste(x: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """``1[x > mean(x over dims)]`` in the forward; the gradient of ``clamp(x, 0, 1)`` in the backward."""
    code = (x > x.mean(dim=dims, keepdim=True)).to(x.dtype)
    soft = x.clamp(0.0, 1.0)
    return soft + (code - soft).detach()


class ShiftLinear(nn.Linear):
    """``nn.Linear`` whose weight is used as signed powers of two (bit shifts) in the forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 5, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        round_power_of_two(torch.ones(1), weight_bits)  # validates weight_bits
        self.weight_bits = weight_bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int = 5) -> ShiftLinear:
        """A shift layer initialised from ``linear``'s weights (rounded in every forward, kept as floats)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits)
        out = out.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def shift_weight(self) -> torch.Tensor:
        """The power-of-two weight the forward uses."""
        return round_power_of_two(self.weight, self.weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.shift_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}"


class BinaryLinearAttention(nn.Module):
    """Binary-code (Hamming) linear attention with a depthwise conv on v; ``(B, N, C)`` + grid -> ``(B, N, C)``.

    Children ``q`` (C -> C), ``kv`` (C -> 2C) and ``proj`` follow timm's PVT-v2 attention, so its projections
    can be adopted as they are. No spatial reduction: the cost is linear in N already.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, res_kernel_size: int = 9) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if res_kernel_size < 1 or res_kernel_size % 2 == 0:
            raise ValueError(f"res_kernel_size must be a positive odd number, got {res_kernel_size}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # per head, along tokens, shared over channels: Conv2d on (B, heads, N, head_dim)
        pad = (res_kernel_size // 2, 0)
        self.dconv = nn.Conv2d(num_heads, num_heads, (res_kernel_size, 1), padding=pad, groups=num_heads, bias=False)
        self.codes: tuple[torch.Tensor, torch.Tensor] | None = None  # last (q, k) codes, for inspection

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = binarize_ste(F.normalize(q, dim=-1))
        k = binarize_ste(F.normalize(k, dim=-1))
        self.codes = (q.detach(), k.detach())
        kv = k.transpose(-2, -1) @ v  # (B, h, d, d); binary k: additions only
        out = 0.5 * v + (q @ kv) / math.pi  # angular kernel 1 - θ/π, linearised; binary q: additions only
        out = F.normalize(out, dim=-1) + self.dconv(v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
