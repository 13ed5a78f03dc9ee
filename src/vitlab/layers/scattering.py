"""SVT's scattering token mixer on the dual-tree complex wavelet transform (``layers/dtcwt.py``).

"Scattering Vision Transformer: Spectral Mixing Matters" (arXiv:2311.01310, NeurIPS 2023),
https://github.com/badripatro/svt. The mixer splits a token map with a one-level 2-D DTCWT into a
full-resolution low-frequency band and six oriented complex high-frequency bands at half resolution. The
low band is gated by a learnable per-channel, per-position weight (spectral gating); the high bands go
through a two-layer complex MLP that multiplies channel blocks with Einstein multiplication (channel
mixing), optionally followed by a per-row complex MLP along the width (token mixing); the inverse DTCWT
brings the map back. The complex MLP runs as one real batched matrix product per layer
(``[re, im] @ [[Wr, Wi], [-Wi, Wr]]`` per channel block), on the transform's channels-last bands.

Deviations from the official code: the low-band weight is resampled (bilinear) when the grid differs from
the one the layer was built for, so models run at other resolutions; the transform runs in the input's
dtype (the official code casts to float32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dtcwt import _Q2C, _analysis, _from_complex, _padded, _synthesis, _to_complex, _write

__all__ = ["ScatteringMixer"]


def _complex_mlp(
    z: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    in_scale: float = 1.0,
    out_scale: float = 1.0,
) -> torch.Tensor:
    """Two complex block-diagonal layers with ReLU between (Einstein multiplication per block), as real products.

    ``z (nb, M, 2d)``: per block, ``M`` rows of ``[re, im]`` of its ``d`` inputs; weights ``(2, nb, d, d)`` and
    biases ``(2, nb, d)`` (real, imaginary first). Each layer is ``[re, im] @ [[Wr, Wi], [-Wi, Wr]] + [br, bi]``,
    the complex product ``(re + i im)(Wr + i Wi)``; ``in_scale`` multiplies the input, ``out_scale`` the output.
    """

    def real_form(w: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.cat([torch.cat([w[0], w[1]], -1), torch.cat([-w[1], w[0]], -1)], -2)  # (nb, 2d, 2d)
        return weight * scale, torch.cat([b[0], b[1]], -1).unsqueeze(1)  # (nb, 1, 2d)

    weight, bias = real_form(w1, b1, in_scale)
    z = F.relu(torch.baddbmm(bias, z, weight), inplace=True)
    weight, bias = real_form(w2, b2, out_scale)
    return torch.baddbmm(bias * out_scale, z, weight)


class ScatteringMixer(nn.Module):
    """SVT's scattering token mixer: DTCWT, low-band gating, complex Einstein-multiplication MLP, inverse.

    Args:
        grid_size: the token grid the low-band weight is built for (resampled for other grids).
        num_blocks: channel blocks of the block-diagonal complex channel MLP (``dim`` must divide).
        token_mixing: also mix the high bands along the width with a complex MLP per row (built for
            ``grid_size``, so that grid only); the official SVT-H models use channel mixing alone.
    """

    def __init__(
        self, dim: int, grid_size: int | tuple[int, int] = 14, num_blocks: int = 4, token_mixing: bool = False
    ) -> None:
        super().__init__()
        grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
            raise ValueError(f"grid_size must be a positive int or (H, W), got {grid_size!r}")
        if num_blocks < 1 or dim % num_blocks:
            raise ValueError(f"dim {dim} must be divisible by num_blocks {num_blocks} (>= 1)")
        self.dim, self.grid_size, self.num_blocks = dim, grid, num_blocks
        self.token_mixing = token_mixing
        d = dim // num_blocks
        # 0.02 * randn as in the official code; the low band starts near zero, so early blocks lean on the skip
        self.weight_low = nn.Parameter(torch.randn(dim, *_padded(grid)) * 0.02)
        self.weight1 = nn.Parameter(torch.randn(2, num_blocks, d, d) * 0.02)
        self.bias1 = nn.Parameter(torch.randn(2, num_blocks, d) * 0.02)
        self.weight2 = nn.Parameter(torch.randn(2, num_blocks, d, d) * 0.02)
        self.bias2 = nn.Parameter(torch.randn(2, num_blocks, d) * 0.02)
        if token_mixing:
            h, w = (s // 2 for s in _padded(grid))
            self.token_weight1 = nn.Parameter(torch.randn(2, h, w, w) * 0.02)
            self.token_bias1 = nn.Parameter(torch.randn(2, h, w) * 0.02)
            self.token_weight2 = nn.Parameter(torch.randn(2, h, w, w) * 0.02)
            self.token_bias2 = nn.Parameter(torch.randn(2, h, w) * 0.02)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("ScatteringMixer needs the token grid (H, W)")
        B, N, C = x.shape
        H, W = grid
        if N != H * W:
            raise ValueError(f"{N} tokens do not fill grid {tuple(grid)}")
        if self.token_mixing and _padded(grid) != _padded(self.grid_size):
            raise ValueError(f"token mixing was built for grid {self.grid_size}, got {tuple(grid)}")
        nb, (H2, W2) = self.num_blocks, _padded(grid)
        y = _analysis(x.reshape(B, H, W, C))  # (B, 2H', 2W', C) bands
        # channel mixing as real batched products on (nb, B*6*h*w, [re, im] of C/nb); the rotation's scale
        # folds into the first layer's input and into the last layer's output
        h, w, d = H2 // 2, W2 // 2, C // nb
        z = _to_complex(y, nb).flatten(1, -3).flatten(-2)
        out_scale = 1.0 if self.token_mixing else _Q2C
        z = _complex_mlp(z, self.weight1, self.bias1, self.weight2, self.bias2, _Q2C, out_scale)
        z = z.view(nb, B, 3, 2, h, w, 2, d)
        if self.token_mixing:  # the same along the width, one complex matrix per row: (h, B*6*C, [re, im] of w)
            perm = (4, 1, 2, 3, 0, 7, 6, 5)  # swaps the block and row axes and the channel and column axes
            t = z.permute(perm).reshape(h, -1, 2 * w)
            t = _complex_mlp(t, self.token_weight1, self.token_bias1, self.token_weight2, self.token_bias2, 1.0, _Q2C)
            z = t.view(h, B, 3, 2, nb, d, 2, w).permute(perm)
        weight = self.weight_low
        if weight.shape[-2:] != (H2, W2):
            weight = F.interpolate(weight[None], size=(H2, W2), mode="bilinear", align_corners=False)[0]
        bands = torch.empty_like(y)
        _write(bands[:, :H2, :W2], torch.mul, y[:, :H2, :W2], weight.permute(1, 2, 0))  # low-band gating
        _from_complex(z, bands)
        return _synthesis(bands, grid).view(B, N, C)
