"""A fused CPU kernel for the S6 scan with ``d_state = 1`` (MSVMamba's), built from ``scan_cpu.c`` on first use.

In eager PyTorch the scan costs ~17 elementwise passes over every scanned element (softplus, decay, input,
the recurrence, its chunk fix-up, ``C``, ``D``), each bound by memory traffic; the C loop does them in one
pass, the sequence serial and the channels of a step vectorised. It is an inference fast path: float32, no
autograd, no tracer, compiler or dispatch mode (but those that only watch, like the memory meter), Linux and a C
compiler on the machine. The pure-PyTorch scan stays the reference (and runs whenever the kernel does not);
tests compare the two.

The shared library is compiled once per machine into ``$VITLAB_CACHE`` (default ``~/.cache/vitlab``)/kernels,
keyed by the source, the flags, the compiler and the CPU (``-march=native``), written to a temporary file and
renamed, so concurrent first uses never load a torn file. ``VITLAB_NO_CPU_KERNELS=1`` turns it off; a failed
build warns once and falls back. Compiled with ``-ffast-math`` so that ``expf``/``logf`` vectorise (glibc's
libmvec): results match the reference to float32 rounding (tested at 2e-5).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_fusion import plain_cpu_inference

__all__ = ["kernel_available", "scan_d1", "use_kernel"]

_SOURCE = Path(__file__).with_name("scan_cpu.c")
_FLAGS = ["-O3", "-ffast-math", "-fno-associative-math", "-march=native", "-fPIC", "-std=c11", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    _FLAGS.append("-mprefer-vector-width=512")  # AVX-512 where the CPU has it: half the vector calls of exp and log
# linked without -ffast-math: with it gcc adds start-up code that sets flush-to-zero for the whole process
_LINK = ["-shared", "-fopenmp", "-lm"]


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(keep[:2])


def _compiler() -> list[str] | None:
    """``$CC`` (may carry flags), else ``cc`` or ``gcc`` on the PATH."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return shlex.split(cc) if cc else None


def _build(cc: list[str]) -> Path:
    """Compile ``scan_cpu.c`` into the cache (once per source, flags, compiler and CPU); returns the library."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    parts = [_SOURCE.read_text(), *_FLAGS, *_LINK, version, _cpu_key()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("VITLAB_CACHE") or Path.home() / ".cache" / "vitlab") / "kernels"
    lib = cache_dir / f"scan_cpu-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    try:
        run = partial(subprocess.run, capture_output=True, text=True, check=True, timeout=300)
        run([*cc, *_FLAGS, "-c", "-o", obj, str(_SOURCE)])
        run([*cc, "-o", tmp, obj, *_LINK])
        os.chmod(tmp, 0o755)  # readable by whoever shares the cache (mkstemp makes it private)
        os.replace(tmp, lib)  # atomic: a concurrent build loads either file whole
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return lib


@cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("VITLAB_NO_CPU_KERNELS") or platform.system() != "Linux":
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home directory
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"vitlab: the CPU scan kernel did not build ({detail}); using the PyTorch scan", stacklevel=3)
        return None
    fn = lib.vitlab_scan_d1
    fn.restype = ctypes.c_int
    fn.argtypes = (
        [ctypes.c_void_p] * 8 + [ctypes.c_double] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_void_p]
    )
    return lib


def kernel_available() -> bool:
    """Whether the compiled scan kernel is usable on this machine (builds it on the first call)."""
    return _library() is not None


def use_kernel(*tensors: Tensor) -> bool:
    """Whether a scan over ``tensors`` may take the kernel: ``plain_cpu_inference`` (CPU float32, no autograd,
    autocast, vmap, tracer, compiler or dispatch mode but the memory meter) and the kernel built."""
    return plain_cpu_inference(*tensors) and kernel_available()


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
    sequence order (an out row may repeat: its values add up); returns ``out``.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU scan kernel is not available on this machine (see kernel_available())")
    P, B, d = u.shape
    rank = W.shape[0]
    if proj.shape != (P, B, rank + 2) or W.shape != (rank, d) or not bias.shape == A.shape == D.shape == (d,):
        raise ValueError(
            f"scan_d1 expects u (P, B, d), proj (P, B, rank + 2), W (rank, d), bias, A and D (d,); got u "
            f"{tuple(u.shape)}, proj {tuple(proj.shape)}, W {tuple(W.shape)}, bias {tuple(bias.shape)}, A "
            f"{tuple(A.shape)}, D {tuple(D.shape)}"
        )
    if out.shape[1:] != (B, d) or in_rows.shape != out_rows.shape or in_rows.ndim != 1:
        raise ValueError(
            f"scan_d1 expects out (Q, {B}, {d}) and in_rows, out_rows of one length; got out {tuple(out.shape)}, "
            f"in_rows {tuple(in_rows.shape)}, out_rows {tuple(out_rows.shape)}"
        )
    ln = () if norm is None else norm[:2]
    if any(t.shape != (d,) for t in ln):
        raise ValueError(f"scan_d1's norm weight and bias must be ({d},), got {[tuple(t.shape) for t in ln]}")
    tensors = (proj, u, W, bias, A, D, out, *ln)
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        raise ValueError("scan_d1 runs on contiguous CPU float32 tensors")
    if any(r.device.type != "cpu" or r.is_floating_point() or r.is_complex() for r in (in_rows, out_rows)):
        raise ValueError("scan_d1's in_rows and out_rows must be integer CPU tensors")
    stores = {t.untyped_storage().data_ptr() for t in (proj, u, W, bias, A, D, *ln)}
    if out.untyped_storage().data_ptr() in stores:
        raise ValueError("scan_d1's out must not share memory with its inputs")
    in_rows, out_rows = in_rows.to(torch.int64).contiguous(), out_rows.to(torch.int64).contiguous()
    for name, rows, n in (("in_rows", in_rows, P), ("out_rows", out_rows, out.shape[0])):
        if rows.numel() and not (int(rows.min()) >= 0 and int(rows.max()) < n):
            raise ValueError(f"{name} must lie in [0, {n})")
    threads = max(1, min(torch.get_num_threads(), B * d // 64))  # at least 64 lanes (8 vectors) per thread
    if norm is not None and threads > B:  # the norm needs whole images per thread: fewer images than threads
        raw = scan_d1(proj, u, W, bias, A, D, in_rows, torch.arange(in_rows.numel()), u.new_zeros(len(in_rows), B, d))
        return out.index_add_(0, out_rows, F.layer_norm(raw, (d,), norm[0], norm[1], norm[2]))
    if norm is not None:
        threads = min(threads, B)
    ptrs = [t.data_ptr() for t in (proj, u, W, bias, A, D)]
    ln_ptrs = [None, None] if norm is None else [norm[0].data_ptr(), norm[1].data_ptr()]
    eps = 0.0 if norm is None else float(norm[2])
    rows = [in_rows.data_ptr(), out_rows.data_ptr()]
    if lib.vitlab_scan_d1(*ptrs, *ln_ptrs, eps, *rows, in_rows.numel(), B, d, rank, threads, out.data_ptr()):
        raise MemoryError("scan_d1: the kernel could not allocate its state (out is unchanged)")
    return out
