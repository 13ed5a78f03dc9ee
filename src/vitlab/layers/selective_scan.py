"""Selective scan (S6): Mamba's input-dependent state space recurrence.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv:2312.00752,
github.com/state-spaces/mamba); MSVMamba's mixer (``multiscale_scan.py``) uses it. ``selective_scan`` takes
mamba_ssm's ``selective_scan_fn`` arguments and runs ``selective_scan_torch`` (``linear_recurrence``: chunks of
~sqrt(L) steps scanned in parallel, then their carries), checked against the step-by-step ``selective_scan_ref``;
mamba_ssm's CUDA kernel is its fast path (``layers/fast/mamba.py``). torch's
``FlopCounterMode`` does not see the recurrence, so every scan also emits the no-op
``vitlab::selective_scan_flops`` op whose registered formula adds VMamba's count (``selective_scan_macs``:
``9 BLDN`` MACs, plus ``BDL`` for ``D`` and for ``z``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .fast import fast_forward
from .linear_recurrence import linear_recurrence

__all__ = ["selective_scan", "selective_scan_macs", "selective_scan_ref", "selective_scan_torch"]


def selective_scan_macs(
    batch: int, length: int, dim: int, d_state: int, with_d: bool = True, with_z: bool = False
) -> int:
    """Multiply-accumulates of one selective scan as VMamba counts them (``flops_selective_scan_fn``)."""
    return 9 * batch * length * dim * d_state + batch * dim * length * (int(with_d) + int(with_z))


@torch.library.custom_op("vitlab::selective_scan_flops", mutates_args=())
def _scan_flops_marker(u: torch.Tensor, b: torch.Tensor, with_d: bool, with_z: bool) -> torch.Tensor:
    return u.new_empty(0)  # carries shapes to the FLOP counter; computes nothing


@_scan_flops_marker.register_fake
def _(u: torch.Tensor, b: torch.Tensor, with_d: bool, with_z: bool) -> torch.Tensor:
    return u.new_empty(0)


@register_flop_formula(torch.ops.vitlab.selective_scan_flops)
def _scan_flop_formula(u_shape, b_shape, with_d, with_z, *args, **kwargs) -> int:
    batch, dim, length = u_shape
    return 2 * selective_scan_macs(batch, length, dim, b_shape[-2], with_d, with_z)  # torch counts 2 per MAC


def _acc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(like.dtype, torch.float32))


def _check(u, delta, A, B, C, D, z, delta_bias) -> int:
    """Validate mamba_ssm's shapes; returns the number of groups ``G`` of ``B``/``C``."""
    if u.ndim != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, d_state), got shape {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.ndim not in (3, 4) or t.shape[0] != batch or t.shape[-2:] != (A.shape[1], length):
            raise ValueError(
                f"{name} must be (batch, [groups,] d_state={A.shape[1]}, length={length}), got {tuple(t.shape)}"
            )
    groups = B.shape[1] if B.ndim == 4 else 1
    if dim % groups or (C.shape[1] if C.ndim == 4 else 1) != groups:
        raise ValueError(
            f"B and C need the same number of groups dividing dim={dim}, got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    return groups


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Step-by-step reference: ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t + D u_t``.

    Shapes as mamba_ssm's ``selective_scan_fn``: ``u, delta, z (batch, dim, L)``, ``A (dim, N)``,
    ``B, C (batch, N, L)`` or ``(batch, G, N, L)``, ``D, delta_bias (dim,)``. Slow; for tests.
    """
    groups = _check(u, delta, A, B, C, D, z, delta_bias)
    dt = _acc(delta, u) + (_acc(delta_bias, u)[:, None] if delta_bias is not None else 0.0)
    dt = F.softplus(dt) if delta_softplus else dt
    expand = u.shape[1] // groups  # each group of channels reads its own B_t, C_t
    Bx = _acc(B if B.ndim == 4 else B[:, None], u).repeat_interleave(expand, dim=1)  # (batch, dim, N, L)
    Cx = _acc(C if C.ndim == 4 else C[:, None], u).repeat_interleave(expand, dim=1)
    h = _acc(u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), u)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * _acc(A, u)) * h + (dt[..., t] * _acc(u[..., t], u))[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    y = y + _acc(u, u) * _acc(D, u)[:, None] if D is not None else y
    y = y * F.silu(_acc(z, u)) if z is not None else y
    return y.to(u.dtype)


def _transpose(t: Tensor, rows: int | None = None) -> Tensor:
    """``(..., L) -> (L, ...)`` (or, given ``rows = L``, ``(L, ...) -> (..., L)`` flattened) as one 2-D
    transpose, which torch copies block-wise."""
    if rows is None:
        return t.reshape(-1, t.shape[-1]).t().contiguous().view(t.shape[-1], *t.shape[:-1])
    return t.reshape(rows, -1).t().contiguous()


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Pure-PyTorch selective scan (fp32 inside) by ``linear_recurrence``: Python loops of ~sqrt(L) steps, not L.

    Same arguments and result as ``selective_scan_ref``; ``chunk_size`` overrides the scan's chunk length.
    The decays ``exp(dt A)`` lie in (0, 1] for ``A < 0``, so products of them never overflow (a
    cumulative-sum-of-logs form can).
    """
    groups = _check(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size is not None and chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    batch, dim, length = u.shape
    dt = _acc(delta, u) + (_acc(delta_bias, u)[:, None] if delta_bias is not None else 0.0)
    dt = F.softplus(dt) if delta_softplus else dt
    shape = (batch, groups, dim // groups, 1, length)  # channels split into B/C groups, a state axis
    a = torch.exp(dt.view(shape) * _acc(A, u).view(groups, dim // groups, -1, 1))  # (batch, G, dim/G, N, L)
    Bg = _acc(B if B.ndim == 4 else B[:, None], u).unsqueeze(2)  # (batch, G, 1, N, L)
    Cg = _acc(C if C.ndim == 4 else C[:, None], u).unsqueeze(2)
    b = (dt * _acc(u, u)).view(shape) * Bg
    h = linear_recurrence(_transpose(a), _transpose(b), chunk_size)  # sequence-major: (L, batch, G, dim/G, N)
    h = _transpose(h, length).view(a.shape)
    y = (h * Cg).sum(3).view(batch, dim, length)  # elementwise, so the FLOP counter adds nothing here
    y = y + _acc(u, u) * _acc(D, u)[:, None] if D is not None else y
    y = y * F.silu(_acc(z, u)) if z is not None else y
    return y.to(u.dtype)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """S6 scan with mamba_ssm's ``selective_scan_fn`` arguments (its CUDA kernel is a fast path)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    torch.ops.vitlab.selective_scan_flops(u.detach(), B.detach(), D is not None, z is not None)
    if (out := fast_forward(selective_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus)) is not None:
        return out
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
