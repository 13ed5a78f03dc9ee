"""Spectral gating (the global filter of GFNet, arXiv:2107.00645, github.com/raoyongming/GFNet), as used by
SpectFormer (arXiv:2304.06446, github.com/badripatro/SpectFormers).

``SpectralGating`` mixes tokens in the frequency domain: a 2-D real FFT over the token grid, an element-wise
product with a learnable complex filter (one per channel), and the inverse FFT. That is a circular
convolution of each channel with a learned full-size kernel, at ``O(N log N)`` cost. ``global_filter`` is the
same operation as a function for other spectral mixers.

The filter is learned for one grid (``grid_size``). On another grid it is resampled as a function of
normalised frequency (cycles per token): each new frequency bin reads the old filter there by linear
interpolation, periodic along the full axis and clamped along the half (``rfft``) axis, so bins that exist
on both grids keep their values exactly. Deviation: GFNet resamples checkpoints by bicubic interpolation of
the stored array (frequency origin in a corner), which mixes positive and negative frequencies at the wrap.

FLOPs: ``torch.utils.flop_counter`` counts no FFT. Importing this module registers a formula for the real
FFTs (``aten._fft_r2c`` / ``aten._fft_c2r``): ``N * ceil(log2 N) / 2`` multiply-accumulates per channel for
each transform over ``N = H * W`` points, so the forward + inverse pair costs GFNet's ``HWD ceil(log2 HW)``
(its Table 1). The element-wise gating (``HWD`` complex products) is not counted, as no element-wise op is.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .block import Grid
from .tracing import is_fx_tracing

__all__ = ["SpectralGating", "global_filter", "resample_spectral_filter"]


def _check_grid(name: str, grid: Grid) -> tuple[int, int]:
    if len(grid) != 2 or not all(isinstance(s, int) and s >= 1 for s in grid):
        raise ValueError(f"{name} must be two integers >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _lerp_index(
    size_new: int, size_old: int, count: int, periodic: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Old-array indices ``(i0, i1)`` and weights ``t`` that read frequency bin ``k`` of a ``size_new`` grid.

    Bin ``k`` is at ``k / size_new`` cycles per token (signed when ``periodic``), i.e. at old index
    ``k * size_old / size_new``; ``count`` bins are produced (``size_new`` on the full axis, ``size_new // 2 + 1``
    on the half axis).
    """
    k = torch.arange(count, device=device, dtype=torch.float64)
    if periodic:
        k = torch.where(k > (size_new - 1) // 2, k - size_new, k)  # signed frequencies (fftfreq order)
    pos = k * size_old / size_new
    i0 = torch.floor(pos)
    t = (pos - i0).to(torch.float32)
    i0 = i0.long()
    if periodic:
        return i0 % size_old, (i0 + 1) % size_old, t
    last = size_old // 2  # the half axis ends at the old grid's highest frequency
    return i0.clamp(max=last), (i0 + 1).clamp(max=last), t


@torch.fx.wrap  # one FX graph node: it checks and compares sizes
def resample_spectral_filter(weight: torch.Tensor, grid_size: Grid, new_grid: Grid) -> torch.Tensor:
    """Resample a filter ``(H, W // 2 + 1, C, ...)`` learned for grid ``grid_size = (H, W)`` to ``new_grid``.

    Works on the real ``(..., 2)`` parameter layout and on complex filters alike. Bilinear in normalised
    frequency (see the module docstring); returns ``weight`` itself when the grids agree.
    """
    H, W = _check_grid("grid_size", grid_size)
    H2, W2 = _check_grid("new_grid", new_grid)
    if weight.ndim < 2 or weight.shape[0] != H or weight.shape[1] != W // 2 + 1:
        raise ValueError(
            f"weight must start with (H, W // 2 + 1) = ({H}, {W // 2 + 1}) for grid_size {(H, W)}, "
            f"got {tuple(weight.shape)}"
        )
    if (H, W) == (H2, W2):
        return weight
    extra = (1,) * (weight.ndim - 1)
    i0, i1, t = _lerp_index(H2, H, H2, periodic=True, device=weight.device)
    t = t.to(weight.real.dtype).view(-1, *extra)
    weight = weight[i0] * (1 - t) + weight[i1] * t  # rows: (H2, W // 2 + 1, C, ...)
    j0, j1, s = _lerp_index(W2, W, W2 // 2 + 1, periodic=False, device=weight.device)
    s = s.to(weight.real.dtype).view(1, -1, *extra[1:])
    return weight[:, j0] * (1 - s) + weight[:, j1] * s


@torch.fx.wrap  # one FX graph node: it reads the dtype
def _full_precision(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.fx.wrap  # one FX graph node: it checks sizes
def global_filter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``irfft2(rfft2(x) * weight)`` over the grid of an ``(B, H, W, C)`` map, orthonormal FFTs.

    ``weight``: complex ``(H, W // 2 + 1, C)``. Equals the circular convolution of each channel with the
    kernel ``irfft2(weight, norm="backward")``. Half-precision inputs are transformed in float32 (half FFTs
    need power-of-two sizes); the result has ``x``'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"global_filter expects a (B, H, W, C) map, got shape {tuple(x.shape)}")
    _, H, W, C = x.shape
    if tuple(weight.shape) != (H, W // 2 + 1, C):
        raise ValueError(f"weight must be (H, W // 2 + 1, C) = {(H, W // 2 + 1, C)}, got {tuple(weight.shape)}")
    y = torch.fft.rfft2(_full_precision(x), dim=(1, 2), norm="ortho") * weight
    return torch.fft.irfft2(y, s=(H, W), dim=(1, 2), norm="ortho").to(x.dtype)


class SpectralGating(nn.Module):
    """Spectral gating network / GFNet global filter: a learnable complex filter per channel on the token grid.

    Args:
        grid_size: the token grid ``(H, W)`` the filter is learned for (resampled for other grids).

    ``forward(x, grid)``: ``x`` is ``(B, P + H*W, C)``; ``P = N - H*W`` prefix (class) tokens pass through
    unchanged. ``grid=None`` means a square grid without prefix tokens.
    """

    def __init__(self, dim: int, grid_size: Grid = (14, 14)) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self.grid_size = _check_grid("grid_size", tuple(grid_size))
        H, W = self.grid_size
        # (H, W // 2 + 1, C, 2): real and imaginary parts, GFNet's layout and init (official key name)
        self.complex_weight = nn.Parameter(torch.randn(H, W // 2 + 1, dim, 2) * 0.02)

    def filter(self, grid: Grid) -> torch.Tensor:
        """The complex filter ``(H, W // 2 + 1, C)`` for ``grid``."""
        weight = resample_spectral_filter(self.complex_weight, self.grid_size, grid)
        return torch.view_as_complex(_full_precision(weight).contiguous())

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if grid is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"grid is needed: {N} tokens do not form a square grid")
            grid = (side, side)
        H, W = grid
        num_prefix = N - H * W
        if not is_fx_tracing() and num_prefix < 0:
            raise ValueError(f"{N} tokens cannot hold grid {tuple(grid)}")
        y = global_filter(x[:, num_prefix:].reshape(B, H, W, C), self.filter((H, W))).reshape(B, H * W, C)
        # traced, num_prefix is a proxy: concatenate always (an empty prefix adds nothing)
        return torch.cat([x[:, :num_prefix], y], dim=1) if is_fx_tracing() or num_prefix else y


def _real_fft_flops(real_shape: torch.Size, dim: list[int]) -> int:
    # FLOPs (2 per MAC) of one real FFT over ``dim``: N * ceil(log2 N) / 2 MACs per transformed signal
    n = math.prod(real_shape[d] for d in dim)
    return math.prod(real_shape) * max(math.ceil(math.log2(n)), 1) if n > 1 else 0


def _r2c_flops(x_shape: torch.Size, dim: list[int], *args, **kwargs) -> int:
    return _real_fft_flops(x_shape, dim)


def _c2r_flops(x_shape: torch.Size, dim: list[int], *args, out_shape: torch.Size, **kwargs) -> int:
    return _real_fft_flops(out_shape, dim)


def _c2c_flops(x_shape: torch.Size, dim: list[int], *args, **kwargs) -> int:
    return 2 * _real_fft_flops(x_shape, dim)  # a complex FFT costs two real ones (Hyena's packed image pairs)


# NOTE: registered once per process and only where torch has no formula of its own (none as of torch 2.15)
_FFT_FORMULAS = (
    (torch.ops.aten._fft_r2c, _r2c_flops),
    (torch.ops.aten._fft_c2r, _c2r_flops),
    (torch.ops.aten._fft_c2c, _c2c_flops),
)
for _op, _formula in _FFT_FORMULAS:
    if _op not in flop_registry:
        register_flop_formula(_op)(_formula)
