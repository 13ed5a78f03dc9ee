"""mamba_ssm's CUDA selective scan (github.com/state-spaces/mamba), when it is importable, for ``selective_scan``
and for ``SelectiveScan2d`` (whose routes are then written out as sequences, ``forward_routes``).

Before its first use the kernel is checked against the PyTorch scan on a small random input on that device
(``mamba_agrees``): if they differ by more than mamba_ssm's own float32 test tolerance (``rtol=6e-4,
atol=2e-3``), or the kernel raises, a warning says so once and the PyTorch scan runs from then on.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..block import Grid
from ..multiscale_scan import SelectiveScan2d
from ..selective_scan import selective_scan_torch
from . import FastPath, register_fast_path

__all__ = ["mamba_agrees"]

try:  # NOTE: optional CUDA kernels; the PyTorch scan computes the same function
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan_fn
except ImportError:  # pragma: no cover - depends on the environment
    _mamba_scan_fn = None

RTOL, ATOL = 6e-4, 2e-3  # mamba_ssm's tests/ops/test_selective_scan.py, float32
_verdict: bool | None = None  # None: not checked yet in this process


def _on_cuda(t: Tensor) -> bool:
    return t.is_cuda  # a function of its own, so tests can check the dispatch on CPU tensors


def _self_check(device: torch.device) -> bool:
    """Run ``_mamba_scan_fn`` and ``selective_scan_torch`` on one small random input (every option MSVMamba uses:
    ``D``, ``z``, ``delta_bias``, softplus) on ``device``; warn and return False when they disagree."""
    g = torch.Generator().manual_seed(0)  # a private generator: the check leaves the global RNG alone
    batch, dim, d_state, length = 2, 8, 4, 33

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    u, delta, z = rand(batch, dim, length), rand(batch, dim, length).mul(0.5), rand(batch, dim, length)
    A = -torch.rand(dim, d_state, generator=g).add(0.5).to(device)
    B, C, D, bias = rand(batch, d_state, length), rand(batch, d_state, length), rand(dim), rand(dim)
    args = (u, delta, A, B, C, D, z, bias, True)
    try:
        with torch.no_grad():
            got, expected = _mamba_scan_fn(*args).float(), selective_scan_torch(*args).float()
        detail = f"max |diff| {(got - expected).abs().max().item():.2e}"
        ok = got.shape == expected.shape and torch.allclose(got, expected, rtol=RTOL, atol=ATOL)
    except (RuntimeError, TypeError, ValueError) as e:  # a kernel built for another device or torch
        ok, detail = False, f"it raised {type(e).__name__}: {e}"
    if not ok:
        warnings.warn(
            f"vitlab: mamba_ssm's selective_scan_fn disagrees with the PyTorch scan on {device} ({detail}; "
            f"tolerance rtol={RTOL}, atol={ATOL}): the PyTorch scan runs from now on",
            RuntimeWarning,
            stacklevel=4,
        )
    return ok


def mamba_agrees(t: Tensor) -> bool:
    """Whether mamba_ssm's kernel may scan ``t``: importable, ``t`` on CUDA, and the check passed (run on first use;
    a traced call before any eager one keeps the PyTorch scan)."""
    global _verdict
    if _mamba_scan_fn is None or not _on_cuda(t):
        return False
    if _verdict is None and not torch.compiler.is_compiling():
        _verdict = _self_check(t.device)
    return bool(_verdict)


def _scan(fn: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *rest: Any) -> Tensor:
    return _mamba_scan_fn(u, delta, A.float(), B, C, *rest)  # its kernel takes A in float32


register_fast_path(
    FastPath(
        "selective_scan_mamba",
        "vitlab.layers.selective_scan.selective_scan",
        lambda fn, u, *rest: mamba_agrees(u),
        _scan,
        "mamba_ssm's CUDA kernel (checked on first use)",
    )
)


def _routes(m: SelectiveScan2d, x: Tensor, grid: Grid) -> Tensor:
    return m.forward_routes(x, grid)  # each route a sequence for selective_scan, hence mamba_ssm's kernel


register_fast_path(
    FastPath(
        "msvmamba_scan_mamba",
        "vitlab.layers.multiscale_scan.SelectiveScan2d",
        lambda m, x, grid: mamba_agrees(x),
        _routes,
        "the routes written out as sequences for mamba_ssm's CUDA kernel",
    )
)
