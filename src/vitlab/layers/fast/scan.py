"""MSVMamba's scan at inference (``SelectiveScan2d``, ``d_state = 1``): the compiled op ``vitlab::scan_d1``, else
step-by-step chunked scans in eager PyTorch.

``scan_d1.cpp`` runs a whole scan in one pass (dt product, softplus, decay, ``C``, ``D``, LayerNorm; the routes
adding onto their pixels, the full scale onto the upsampled branch). ``torch.utils.cpp_extension.load`` builds it on
first use (a C++ compiler and ninja) into torch's cache (``$TORCH_EXTENSIONS_DIR``, keyed by source and flags, not
by CPU: machines of different CPUs sharing one need a directory each, for ``-march=native``); ``torch.library``
gives it a fake implementation (``torch.export`` and ``torch.compile`` trace it) and a FLOP formula.
``-ffast-math -fno-associative-math`` vectorises ``expf``/``logf`` (glibc's libmvec): rounding differs from
PyTorch's (tested at 2e-5). Inference only: the op has no backward. A failed build warns once; PyTorch runs.

The chunked path (no autograd, where the op cannot run, maps of ``CHUNKED_MIN_NUMEL`` activations or more) scans
step by step over all chunks at once, a step's slices in cache (``linear_recurrence.py`` explains the chunks):
pass 1 scans each chunk from 0 storing decays and inputs, the chunk carries follow, pass 2 rescans from them and
applies ``C``, ``D``, the norm, the upsampled branch, the SE mean and the gate, ``z`` projected per step. At half
scale ``dt``, decay and input are computed once per pixel, not per route. Softplus drops its ``x > 20`` branch
when no pre-activation can reach 20 (below 88 the two agree to rounding).
"""

from __future__ import annotations

import logging
import platform
import subprocess
import warnings
from collections.abc import Callable, Iterator
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..block import Grid
from ..linear_recurrence import _records, linear_recurrence
from ..multiscale_scan import SelectiveScan2d, _divisor
from ..selective_scan import _acc, selective_scan_macs
from . import FastPath, _autocast_cpu, register_fast_path

__all__ = ["CHUNKED_MIN_NUMEL", "kernel_available", "scan_d1"]

CHUNKED_MIN_NUMEL = 1 << 18  # inner activations (B L d) from which the chunked path runs

_NAME, _SOURCE = "vitlab_scan_d1", Path(__file__).with_name("scan_d1.cpp")
_CFLAGS = ["-O3", "-ffast-math", "-fno-associative-math", "-march=native", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    _CFLAGS.append("-mprefer-vector-width=512")  # AVX-512 where the CPU has it: half the vector calls of exp and log
# linked without -ffast-math (cpp_extension links with these flags only): with it gcc adds start-up code that sets
# flush-to-zero for the whole process
_LDFLAGS = ["-fopenmp"]
_built: bool | None = None  # None: not tried yet in this process


def kernel_available() -> bool:
    """Whether ``vitlab::scan_d1`` runs here; the first eager call builds and loads it (a traced call only asks)."""
    global _built
    if _built is None and not torch.compiler.is_compiling():
        _built = _build()
    return bool(_built)


def _build() -> bool:
    if platform.system() != "Linux":
        return False  # the flags are gcc's on Linux (OpenMP, -march=native)
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import notes a missing CUDA runtime: irrelevant to a CPU op
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(_NAME, [str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, is_python_module=False)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:  # no compiler or ninja, a failed build
        lines = str(e).splitlines() or [type(e).__name__]
        detail = "; ".join([line.strip() for line in lines if "error:" in line][:3] or [lines[0][:300]])
        warnings.warn(f"vitlab: the compiled scan did not build ({detail}); the PyTorch scan runs", stacklevel=4)
        return False
    finally:
        logger.setLevel(level)
    _register_formulas()
    return True


@cache
def _register_formulas() -> None:
    """What tracers and the FLOP counter need of the op; once per process (a second load finds the op there)."""
    torch.library.register_fake("vitlab::scan_d1", _scan_d1_fake)
    register_flop_formula(torch.ops.vitlab.scan_d1)(_scan_d1_flops)


def _scan_d1_fake(proj: Tensor, u: Tensor, W: Tensor, *args: object) -> None:
    return None  # it writes into its `out` argument: nothing new to describe


def _scan_d1_flops(
    proj: tuple[int, ...], u: tuple[int, ...], W: tuple[int, ...], *args: object, **kwargs: object
) -> int:
    """The scan as ``selective_scan_flops`` counts it (VMamba's formula, with ``D``) plus the ``dt`` product, as
    the readable forward's ops count."""
    (_, batch, dim), rank, steps = u, W[0], args[3][0]  # args: bias, A, D, in_rows, ...
    return 2 * (selective_scan_macs(batch, steps, dim, 1) + steps * batch * rank * dim)  # 2 FLOPs per MAC


def scan_d1(
    proj: Tensor,
    u: Tensor,
    W: Tensor,
    bias: Tensor,
    A: Tensor,
    D: Tensor,
    in_rows: Tensor,
    out_rows: Tensor,
    out: Tensor,
    norm: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """The S6 scan with ``d_state = 1`` over the rows ``in_rows`` of ``u (P, B, d)``, added into rows ``out_rows``
    of ``out (Q, B, d)``: ``dt = softplus(bias + proj[..., :rank] @ W)``, ``h = exp(dt A) h + dt B u``,
    ``out[out_rows] += norm(C h + D u)``, with ``B, C = proj[..., rank], proj[..., rank + 1]``.

    ``proj (P, B, rank + 2)`` is the x_proj output; ``W (rank, d)``, ``bias``, ``A``, ``D (d,)``; ``norm``: a
    LayerNorm's ``(weight, bias, eps)`` over the channels, or None. Rows are integer indices of one length in
    sequence order (an out row may repeat: its values add up); returns ``out``. Contiguous CPU float32 tensors,
    inference only (``vitlab::scan_d1`` has no backward).
    """
    if not kernel_available():
        raise RuntimeError("the compiled scan is not available on this machine (see kernel_available())")
    if any(r.is_floating_point() or r.is_complex() for r in (in_rows, out_rows)):
        raise ValueError("scan_d1's in_rows and out_rows must be integer CPU tensors")
    weight, bias_, eps = (None, None, 1e-5) if norm is None else norm
    rows = [r.to(torch.int64).contiguous() for r in (in_rows, out_rows)]
    torch.ops.vitlab.scan_d1(proj, u, W, bias, A, D, *rows, out, weight, bias_, float(eps))
    return out


def _silu_inplace(act: nn.Module) -> Callable[[Tensor], Tensor]:
    return partial(F.silu, inplace=True) if type(act) is nn.SiLU else act  # its input is a temporary


def _compiled_applies(m: SelectiveScan2d, x: Tensor, grid: Grid) -> bool:
    params = list(m.parameters())
    eager_only = torch.compiler.is_compiling() or (
        not _autocast_cpu()
        and not torch._C._are_functorch_transforms_active()  # no batching rule (vmap)
        and not torch.jit.is_tracing()  # TorchScript (and its ONNX exporter) cannot express the op
    )
    return (
        m.d_state == 1
        and not _records(x, *params)  # the op has no backward
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, *params))
        and eager_only
        and kernel_available()
    )


def _op_scan(m: SelectiveScan2d, k: int, u: Tensor, rows: Tensor, out: Tensor, out_rows: Tensor) -> Tensor:
    """Branch ``k``'s S6 by ``vitlab::scan_d1`` over the pixels ``rows`` of ``u (P, B, d)`` in sequence order,
    normed and added into ``out`` at ``out_rows``; returns ``out``."""
    W, bias, A, D = m._s6_params(k, u)
    proj = F.linear(u, m.x_proj_weight[k])  # (P, B, rank + 2): dt's low-rank input, then B, C
    norm = m.out_norm
    args = (proj, u, W.contiguous(), bias, A[:, 0].contiguous(), D, rows, out_rows, out)
    torch.ops.vitlab.scan_d1(*args, norm.weight, norm.bias, norm.eps)
    return out


def _run_compiled(m: SelectiveScan2d, x: Tensor, grid: Grid) -> Tensor:
    act, B, d = _silu_inplace(m.act), x.shape[0], m.d_inner
    x, u, us = m._maps(x, grid, act)
    half, (W, H) = us.shape[:2], u.shape[:2]
    us, idx, _ = m._half_scale_chunks(us, chunked=False)
    ys = _op_scan(m, 1, us, idx, torch.zeros_like(us), idx)  # the routes summed back onto their pixels
    up = m._upsample(ys, half, grid).contiguous().view(W * H, B, d)
    rows = torch.arange(W * H, device=x.device).view(W, H).t().reshape(-1)  # row-major: (i, j) at pixel j H + i
    y = _op_scan(m, 0, u.view(W * H, B, d), rows, up, rows).view(W, H, B, d)  # the full scale added onto up
    mean = y.mean((0, 1))
    return m._project(y.mul_(act(F.linear(x, m.in_proj.weight[d:]))), mean)


def _softplus_for(bias: Tensor, W: Tensor, dts: Tensor) -> Callable[[Tensor], Tensor]:
    """Softplus for ``bias + dts @ W`` (may work in place): ``log1p(exp(x))``, F.softplus's formula below its
    threshold 20, unless a pre-activation can pass 20 (a strict bound: ``bias + |W|^T max|dts|``)."""
    bound = (bias + W.abs().t() @ dts.abs().flatten(0, -2).amax(0)).max()
    return F.softplus if bound > 20 else lambda x: torch.exp(x, out=x).log1p_()


def _entering(decay: Tensor, h: Tensor) -> Tensor:
    """The state entering each chunk from the chunks' decays and end states (from 0), in sequence order."""
    h = linear_recurrence(decay, h)
    return torch.cat([torch.zeros_like(h[:1]), h[:-1]])


def _s6_steps(mixer: SelectiveScan2d, u: Tensor, x_dbl: Tensor) -> Iterator[tuple[int, Tensor]]:
    """The full-scale S6 (``d_state = 1``) step by step, yielding ``(t, normed y[t] (m, n, B, d))``.

    ``u (T, m, n, B, d)``: ``m n`` chunks of ``T`` steps, chunk ``(j, i)`` being the ``i m + j``-th of the sequence.
    One step's slices at a time, so that they stay in cache: pass 1 scans every chunk from state 0 (storing
    the decays ``a`` and inputs ``b``), the chunk carries follow, pass 2 restarts the chunks from them.
    """
    mixer._count_scan(u)
    (W, bias, A, D), rank = mixer._s6_params(0, u), mixer.dt_rank
    (T, m, n, B, d), dtype, u, x_dbl = u.shape, u.dtype, _acc(u, u), _acc(x_dbl, u).contiguous()
    xd = x_dbl.view(T, m * n * B, rank + 2)
    softplus = _softplus_for(bias, W, xd[..., :rank])
    a, b = u.new_empty(T, m, n, B, d), u.new_empty(T, m, n, B, d)
    h, h_next, decay = u.new_zeros(m, n, B, d), u.new_empty(m, n, B, d), u.new_ones(m, n, B, d)
    # per-step views made once (unbind), to keep the Python work per step small
    a_, b_, u_, Bs, Cs = (t.unbind(0) for t in (a, b, u, x_dbl[..., rank, None], x_dbl[..., rank + 1, None]))
    for t, dts in enumerate(xd[..., :rank].unbind(0)):
        dt = softplus(torch.addmm(bias, dts, W)).view(m, n, B, d)
        torch.exp(torch.mul(dt, A[:, 0]), out=a_[t])  # a_, b_ (streamed to memory) written once each
        torch.mul(dt.mul_(Bs[t]), u_[t], out=b_[t])
        h, h_next = torch.addcmul(b_[t], a_[t], h, out=h_next), h
        decay.mul_(a_[t])
    seq = lambda t: t.transpose(0, 1).reshape(n * m, B, d)  # noqa: E731  chunks in sequence order
    h = _entering(seq(decay), seq(h)).view(n, m, B, d).transpose(0, 1)
    norm = mixer.out_norm
    for t in range(T):
        h = torch.addcmul(b_[t], a_[t], h)
        y = torch.mul(h, Cs[t]).addcmul_(u_[t], D)
        yield t, F.layer_norm(y.to(dtype), (d,), norm.weight, norm.bias, norm.eps)


def _s6_routes(m: SelectiveScan2d, u: Tensor, x_dbl: Tensor, idx: Tensor, T: int) -> Iterator[tuple[int, Tensor]]:
    """The half-scale S6 step by step, yielding ``(t, normed y[t] (n, B, d))``: the sequence is the map's pixels
    ``u (P, B, d)`` (``x_dbl = x_proj(u)``) in the order ``idx`` (step-major, ``T`` steps).

    ``dt``, decay, input and ``D u`` depend on the pixel only, so they are computed once per pixel (not once
    per route) and gathered at each step.
    """
    m._count_scan(u, idx.numel())
    (W, bias, A, D), rank = m._s6_params(1, u), m.dt_rank
    (P, B, d), dtype, u, x_dbl = u.shape, u.dtype, _acc(u, u), _acc(x_dbl, u)
    dt = torch.addmm(bias, x_dbl[..., :rank].reshape(P * B, rank), W).view(P, B, d)
    dt = _softplus_for(bias, W, x_dbl[..., :rank])(dt)
    a = torch.exp(dt * A[:, 0])
    b, du = dt.mul_(u).mul_(x_dbl[..., rank, None]), u * D
    idx_, n = idx.view(T, -1).unbind(0), idx.numel() // T
    Cs = x_dbl[..., rank + 1, None].index_select(0, idx).view(T, n, B, 1).unbind(0)
    h, decay = u.new_zeros(n, B, d), u.new_ones(n, B, d)
    for i in idx_:
        a_t = a.index_select(0, i)
        h = torch.addcmul(b.index_select(0, i), a_t, h)
        decay.mul_(a_t)
    h, norm = _entering(decay, h), m.out_norm
    for t, i in enumerate(idx_):
        h = torch.addcmul(b.index_select(0, i), a.index_select(0, i), h)
        y = torch.addcmul(du.index_select(0, i), h, Cs[t])
        yield t, F.layer_norm(y.to(dtype), (d,), norm.weight, norm.bias, norm.eps)


def _chunked_applies(m: SelectiveScan2d, x: Tensor, grid: Grid) -> bool:
    return (
        m.d_state == 1
        and x.device.type != "meta"  # the softplus shortcut looks at values
        and not _records(x, *m.parameters())
        and x.shape[0] * x.shape[1] * m.d_inner >= CHUNKED_MIN_NUMEL
        and not torch.compiler.is_compiling()
    )


def _run_chunked(m: SelectiveScan2d, x: Tensor, grid: Grid) -> Tensor:
    act, L, d = _silu_inplace(m.act), x.shape[1], m.d_inner
    x, u, us = m._maps(x, grid, act)
    half, (W, H) = us.shape[:2], u.shape[:2]
    us, idx, T1 = m._half_scale_chunks(us)
    ys, n1 = torch.zeros_like(us), idx.numel() // T1  # the routes summed back onto their pixels
    for t, y in _s6_routes(m, us, F.linear(us, m.x_proj_weight[1]), idx, T1):
        ys.index_add_(0, idx[t * n1 : (t + 1) * n1], y)
    ys = m._upsample(ys, half, grid)
    # full scale, then (y + up) * act(z) and the SE gate's mean of y + up, step by step
    T0 = _divisor(W, m._steps)  # each row cut into W / T0 chunks of T0 steps
    split = lambda t: t.view(W // T0, T0, H, *t.shape[2:]).transpose(0, 1)  # noqa: E731  (T0, W / T0, H, B, .)
    y, total = torch.empty_like(u), None
    ys_, x_, y_ = (split(t).unbind(0) for t in (ys, x, y))
    w_z = m.in_proj.weight[d:].t().expand(W // T0, -1, -1)  # z projected step by step, never stored whole
    for t, y_t in _s6_steps(m, split(u), split(F.linear(u, m.x_proj_weight[0]))):
        y_t += ys_[t]
        total = y_t.clone() if total is None else total.add_(y_t)
        z_t = torch.bmm(x_[t].flatten(1, 2), w_z).view_as(y_t)
        torch.mul(y_t, act(z_t), out=y_[t])
    return m._project(y, total.sum((0, 1)) / L)


_SCAN2D = "vitlab.layers.multiscale_scan.SelectiveScan2d"
register_fast_path(
    FastPath(
        "msvmamba_scan_compiled",
        _SCAN2D,
        _compiled_applies,
        _run_compiled,
        "both scans by the compiled op vitlab::scan_d1 (CPU float32, no autograd)",
    )
)
register_fast_path(
    FastPath(
        "msvmamba_scan_chunked",
        _SCAN2D,
        _chunked_applies,
        _run_chunked,
        "both scans step by step over all chunks at once, in cache (no autograd, large maps)",
    )
)
