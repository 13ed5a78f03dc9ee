"""A one-level 2-D dual-tree complex wavelet transform (DTCWT, Kingsbury) in plain PyTorch.

Used by SVT's scattering mixer (``layers/scattering.py``), so the library needs no wavelet package. Level 1
of a DTCWT uses only the biorthogonal filters; these are Kingsbury's ``near_sym_b`` (13/19 taps), the filters
SVT uses; the layout of the outputs follows ``pytorch_wavelets.DTCWTForward(J=1)`` (orientations 15, 45, 75,
105, 135, 165 degrees, real/imaginary last), which the tests check against. Odd sizes are extended by
repeating the last row/column, as the DTCWT toolboxes do, and cropped again after the inverse.

How it runs (CPU speed): each separable filter pass along an axis of length ``n`` is one matrix product
with an ``(outputs, n)`` matrix into which both filters, the half-sample symmetric extension, the odd-size
extension and (inverse) the crop are folded; the matrices depend only on ``n``, are built once per size and
are kept out of any state dict. Everything works on channels-last ``(B, H, W, C)`` maps, the token layout,
so no transposes are needed. A dense ``n x n`` product does ``n / 19`` times the multiply-accumulates of the
filters (about 3x at SVT-H's 56x56 stage-1 grid) but runs near the matmul peak, far faster than 1-D
convolutions; the FLOP counter still sees the filters' nominal count (19 taps per output sample and band,
the lowpass zero-padded from 13) through the ``vitlab::band_matmul`` op's registered formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["dtcwt2d", "idtcwt2d"]

# near_sym_b analysis filters (Kingsbury's DTCWT toolbox), symmetric: the first half, centre tap last
_H0_HALF = (-9 / 5120, 0.0, 114 / 5120, -240 / 5120, -247 / 5120, 1520 / 5120, 2844 / 5120)  # 13 taps
_H1_HALF = (
    -7.062639508928571e-05,
    0.0,
    0.0013419015066964285,
    -0.0018833705357142855,
    -0.007156808035714285,
    0.023856026785714284,
    0.05564313616071428,
    -0.05168805803571428,
    -0.29975760323660716,
    0.5594308035714286,
)  # 19 taps
_TAPS = 2 * len(_H1_HALF) - 1
_Q2C = math.sqrt(0.5)  # the quad -> complex rotation is orthonormal up to this factor


def _symmetric(half: tuple[float, ...]) -> list[float]:
    """Mirror a half filter (centre last) and zero-pad it to ``_TAPS`` taps, centred."""
    full = list(half) + list(half[-2::-1])
    pad = (_TAPS - len(full)) // 2
    return [0.0] * pad + full + [0.0] * pad


def _modulate(taps: list[float]) -> list[float]:
    # biorthogonal synthesis filters: g0[n] = (-1)^(n-c) h1[n], g1[n] = (-1)^(n-c) h0[n] about the centre c
    centre = len(taps) // 2
    return [t * (-1) ** abs(n - centre) for n, t in enumerate(taps)]


_ANALYSIS = (_symmetric(_H0_HALF), _symmetric(_H1_HALF))  # (lowpass h0, highpass h1)
_SYNTHESIS = (_modulate(_ANALYSIS[1]), _modulate(_ANALYSIS[0]))  # (lowpass g0, highpass g1)


def _symmetric_index(n: int, pad: int) -> list[int]:
    """Indices of a half-sample symmetric extension (``x1 x0 | x0 x1 ... | x_{n-1} x_{n-2}``) by ``pad``."""
    period = 2 * n
    return [j if j < n else period - 1 - j for j in (i % period for i in range(-pad, n + pad))]


@lru_cache(maxsize=64)
def _analysis_matrix(n: int) -> np.ndarray:
    """``(2 m, n)``, ``m = n`` rounded up to even: rows ``[lowpass | highpass]`` of a length-``n`` signal.

    Row ``f m + i`` is filter ``f`` at output ``i`` of the extended signal: odd ``n`` repeats its last sample,
    then both ends are extended half-sample symmetrically by ``_TAPS // 2``.
    """
    m = n + n % 2
    source = np.minimum(_symmetric_index(m, _TAPS // 2), n - 1)  # extended position -> input sample
    i, t = np.meshgrid(np.arange(m), np.arange(_TAPS), indexing="ij")
    a = np.zeros((2 * m, n))
    for f, taps in enumerate(_ANALYSIS):
        np.add.at(a, (f * m + i, source[i + t]), np.asarray(taps)[t])
    return a


@lru_cache(maxsize=64)
def _synthesis_matrix(m: int, n: int) -> np.ndarray:
    """``(n, 2 m)``: the inverse of two bands of length ``m`` (columns ``[lowpass | highpass]``), ``n`` outputs."""
    source = np.asarray(_symmetric_index(m, _TAPS // 2))
    i, t = np.meshgrid(np.arange(n), np.arange(_TAPS), indexing="ij")
    s = np.zeros((n, 2 * m))
    for f, taps in enumerate(_SYNTHESIS):
        np.add.at(s, (i, f * m + source[i + t]), np.asarray(taps)[t])
    return s


@torch.library.custom_op("vitlab::band_matmul", mutates_args=())
def _band_matmul(a: torch.Tensor, x: torch.Tensor, nnz: int) -> torch.Tensor:
    """``a (m, n) @ x (b, n, k) -> (b, m, k)`` for a filter matrix ``a`` whose nominal taps number ``nnz``."""
    return torch.matmul(a, x)


@_band_matmul.register_fake
def _(a: torch.Tensor, x: torch.Tensor, nnz: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], a.shape[0], x.shape[2])


def _band_matmul_setup(ctx, inputs, output) -> None:  # torch.library's setup_context signature
    ctx.save_for_backward(inputs[0])
    ctx.nnz = inputs[2]


def _band_matmul_backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
    (a,) = ctx.saved_tensors
    return None, torch.ops.vitlab.band_matmul(a.t(), grad, ctx.nnz), None  # the filter matrix is a constant


_band_matmul.register_autograd(_band_matmul_backward, setup_context=_band_matmul_setup)


@register_flop_formula(torch.ops.vitlab.band_matmul)
def _band_matmul_flops(a_shape, x_shape, nnz, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[2] * nnz  # the filters' taps, not the dense product's


def _filter(matrix: np.ndarray, x: torch.Tensor, taps_per_output: int) -> torch.Tensor:
    """``matrix @ x`` for ``x (b, n, k)``, counted as ``taps_per_output`` multiply-accumulates per output."""
    a = torch.from_numpy(matrix).to(device=x.device, dtype=x.dtype)
    return torch.ops.vitlab.band_matmul(a, x, a.shape[0] * taps_per_output)


def _analysis(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, 2H', 2W', C)``: the four bands, rows ``[low | high along H]``, columns along W."""
    B, H, W, C = x.shape
    y = _filter(_analysis_matrix(H), x.reshape(B, H, W * C), _TAPS)  # (B, 2H', W*C)
    y = _filter(_analysis_matrix(W), y.view(-1, W, C), _TAPS)  # (B*2H', 2W', C)
    return y.view(B, y.shape[0] // B, y.shape[1], C)


def _synthesis(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_analysis`, cropped to ``size``: ``(B, 2H', 2W', C)`` -> ``(B, H, W, C)``."""
    B, H2, W2, C = (y.shape[0], y.shape[1] // 2, y.shape[2] // 2, y.shape[3])
    H, W = size
    x = _filter(_synthesis_matrix(W2, W), y.reshape(-1, 2 * W2, C), 2 * _TAPS)  # (B*2H', W, C)
    x = _filter(_synthesis_matrix(H2, H), x.view(B, 2 * H2, W * C), 2 * _TAPS)  # (B, H, W*C)
    return x.view(B, H, W, C)


def _blocks(t: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``(B, h, w, C)`` -> the view ``(nb, B, h, w, C / nb)``: channel blocks first (batched matmuls)."""
    return t.unflatten(-1, (num_blocks, -1)).permute(3, 0, 1, 2, 4)


def _write(out: torch.Tensor, op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = op(a, b)`` into a view, without a temporary when autograd is not recording (``out=``)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or out.requires_grad):
        out.copy_(op(a, b))
    else:
        op(a, b, out=out)


_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) parity of a, b, c, d
_PAIRS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (orientation pair, real/imaginary) of r1, i1, r2, i2


def _polyphase(y: torch.Tensor, quad: int, phase: int, num_blocks: int) -> torch.Tensor:
    """One polyphase component (``_PHASES``) of high quad ``quad`` (lh, hh, hl) of ``y (B, 2H', 2W', C)``,
    as the view ``(nb, B, H'/2, W'/2, C / nb)``. Views are made just before they are written: autograd
    forbids writing through views made before an earlier write to the same tensor."""
    H2, W2 = y.shape[1] // 2, y.shape[2] // 2
    # lh: low along W, high along H (15/165 deg); hh: diagonal (45/135); hl: high along W (75/105)
    rows, cols = (
        (slice(H2, None), slice(None, W2)),
        (slice(H2, None), slice(W2, None)),
        (slice(None, H2), slice(W2, None)),
    )[quad]
    i, j = _PHASES[phase]
    return _blocks(y[:, rows, cols][:, i::2, j::2], num_blocks)


def _to_complex(y: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The high quads of ``y`` rotated to complex pairs, unscaled: ``(nb, B, 3, 2, H'/2, W'/2, 2, C / nb)``.

    Axis 2 is the quad (lh, hh, hl), axis 3 the orientation pair (15/45/75 first, 165/135/105 second), axis 6
    real/imaginary; multiplied by ``_Q2C`` these are the DTCWT's high bands.
    """
    B, H2, W2, C = y.shape[0], y.shape[1] // 2, y.shape[2] // 2, y.shape[3]
    z = y.new_empty(num_blocks, B, 3, 2, H2 // 2, W2 // 2, 2, C // num_blocks)
    for q in range(3):
        a, b, c, d = (_polyphase(y, q, p, num_blocks) for p in range(4))
        ops = ((torch.sub, a, d), (torch.add, b, c), (torch.add, a, d), (torch.sub, b, c))
        for (k, r), (op, u, v) in zip(_PAIRS, ops, strict=True):
            _write(z[:, :, q, k, :, :, r], op, u, v)  # r1 = a - d, i1 = b + c, r2 = a + d, i2 = b - c
    return z


def _from_complex(z: torch.Tensor, y: torch.Tensor) -> None:
    """Write the inverse rotation of ``z`` (``_to_complex``'s layout, pre-multiplied by ``_Q2C``) into ``y``'s quads."""
    nb = z.shape[0]
    for q in range(3):
        r1, i1, r2, i2 = (z[:, :, q, k, :, :, r] for k, r in _PAIRS)
        ops = ((torch.add, r1, r2), (torch.add, i1, i2), (torch.sub, i1, i2), (torch.sub, r2, r1))
        for p, (op, u, v) in enumerate(ops):
            _write(_polyphase(y, q, p, nb), op, u, v)  # a = r1 + r2, b = i1 + i2, c = i1 - i2, d = r2 - r1


def dtcwt2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-level 2-D DTCWT (``near_sym_b``).

    Args:
        x: ``(B, C, H, W)``; odd ``H``/``W`` are extended to even ``H'``/``W'``.

    Returns:
        ``lowpass (B, C, H', W')`` and ``highpass (B, C, 6, H'/2, W'/2, 2)``: six orientations
        (15, 45, 75, 105, 135, 165 degrees), real and imaginary parts last.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    y = _analysis(x.permute(0, 2, 3, 1))
    H2, W2 = y.shape[1] // 2, y.shape[2] // 2
    z = _to_complex(y, 1)[0] * _Q2C  # (B, 3, 2, h, w, 2, C)
    high = torch.cat([z[:, :, 0], z[:, :, 1].flip(1)], dim=1)  # orientations 15..75, then 105..165
    return y[:, :H2, :W2].permute(0, 3, 1, 2), high.permute(0, 5, 1, 2, 3, 4)


def idtcwt2d(lowpass: torch.Tensor, highpass: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dtcwt2d`: ``(B, C, H, W)`` and ``(B, C, 6, H/2, W/2, 2)`` -> ``(B, C, H, W)``."""
    B, C, H, W = lowpass.shape
    if highpass.shape != (B, C, 6, H // 2, W // 2, 2) or H % 2 or W % 2:
        raise ValueError(
            f"highpass must be (B, C, 6, H/2, W/2, 2) for an even lowpass {tuple(lowpass.shape)}, "
            f"got {tuple(highpass.shape)}"
        )
    y = lowpass.new_empty(B, 2 * H, 2 * W, C)
    y[:, :H, :W] = lowpass.permute(0, 2, 3, 1)
    high = highpass.permute(0, 2, 3, 4, 5, 1) * _Q2C  # (B, 6, h, w, 2, C)
    z = torch.stack([high[:, :3], high[:, 3:].flip(1)], dim=2)  # (B, 3, 2, h, w, 2, C)
    _from_complex(z[None], y)
    return _synthesis(y, (H, W)).permute(0, 3, 1, 2)


def _padded(grid: tuple[int, int]) -> tuple[int, int]:
    return (grid[0] + grid[0] % 2, grid[1] + grid[1] % 2)
