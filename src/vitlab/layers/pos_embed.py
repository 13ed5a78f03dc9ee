"""Position encodings that follow the input size: ResFormer's global-local embedding and 2-D RoPE.

- ``GlobalPosEmbed`` and ``LocalPosEmbed``: the global-local positional embedding (GLPE) of "ResFormer:
  Scaling ViTs with Multi-Resolution Training" (arXiv:2212.00776, Sec. 4.2, github.com/ruitian12/resformer).
  The global part is a sine-cosine embedding of *normalised* patch coordinates (the same relative location
  gets the same code at every grid size, so it changes smoothly with the input size) passed through a
  learned depthwise 3x3 convolution; the local part is a depthwise 3x3 convolution of each head's values,
  added to the attention output (``softmax(qkᵀ)v + H(v)``, Eq. 5). As in the official code, the local
  convolution's weights are shared by all heads and start at zero.
- ``rope_2d_angles`` / ``apply_rope``: 2-D rotary position embedding for native-resolution ViTs (UniViTAR,
  arXiv:2504.01792, github.com/MM-MVR/UniViTAR): half of each head's rotation angles come from the patch row,
  half from the column, in the rotate-half layout. Positions are explicit integer ``(row, col)`` pairs, so a
  packed sequence of several images (``layers/packing.py``) gets each image's own coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .block import Grid
from .tracing import is_fx_tracing

__all__ = ["GlobalPosEmbed", "LocalPosEmbed", "apply_rope", "grid_positions", "rope_2d_angles", "sincos_2d_normalized"]


@torch.fx.wrap  # one FX graph node: it builds index tensors from sizes
def sincos_2d_normalized(
    grid: Grid, dim: int, temperature: float = 10000.0, scale: float = 2 * math.pi, device: torch.device | None = None
) -> torch.Tensor:
    """Sine-cosine code of normalised patch coordinates: ``(H, W, dim)``, rows first then columns.

    Coordinates are ``1..H`` divided by ``H`` (and ``1..W`` by ``W``) times ``scale``, so the last patch always
    sits at ``scale`` whatever the grid size (DETR's normalised embedding, as ResFormer's GPE uses).
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sine-cosine code, got {dim}")
    H, W = grid
    half = dim // 2
    # frequency j pairs channels (2i, 2i+1): sin on the even one, cos on the odd one
    freq = temperature ** (2 * (torch.arange(half, device=device) // 2) / half)
    ys = torch.arange(1, H + 1, device=device, dtype=torch.float32) / H * scale
    xs = torch.arange(1, W + 1, device=device, dtype=torch.float32) / W * scale

    def code(p: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, half), sin/cos interleaved
        a = p[:, None] / freq
        return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=-1).flatten(1)

    cy, cx = code(ys), code(xs)
    return torch.cat((cy[:, None].expand(H, W, half), cx[None].expand(H, W, half)), dim=-1)


class GlobalPosEmbed(nn.Module):
    """ResFormer's GPE: normalised sine-cosine code -> depthwise 3x3 conv, added to a ``(B, H, W, C)`` map."""

    def __init__(self, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"dim must be a multiple of 4, got {dim}")
        self.dim = dim
        self.temperature = temperature
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def embedding(self, grid: Grid, device: torch.device | None = None) -> torch.Tensor:
        """The embedding for ``grid``: ``(H, W, dim)``."""
        code = sincos_2d_normalized(grid, self.dim, self.temperature, device=device)
        code = code.to(self.proj.weight.dtype).permute(2, 0, 1)[None]  # (1, dim, H, W)
        return self.proj(code)[0].permute(1, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_fx_tracing() and (x.ndim != 4 or x.shape[-1] != self.dim):
            raise ValueError(f"GlobalPosEmbed expects a (B, H, W, {self.dim}) map, got {tuple(x.shape)}")
        return x + self.embedding((x.shape[1], x.shape[2]), x.device)


class LocalPosEmbed(nn.Module):
    """ResFormer's LPE: a depthwise 3x3 conv of the values on the token grid, shared by the heads.

    ``v (B, heads, P + H*W, head_dim)`` -> same shape; the ``P`` prefix (class) tokens get zeros.
    Initialised to zero, so a fresh block starts as plain attention (the official initialisation).
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(head_dim, head_dim, 3, padding=1, groups=head_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, v: torch.Tensor, grid: Grid, num_prefix_tokens: int = 0) -> torch.Tensor:
        B, h, N, d = v.shape
        H, W = grid
        if not is_fx_tracing() and N - num_prefix_tokens != H * W:
            raise ValueError(f"LocalPosEmbed: {N - num_prefix_tokens} grid tokens do not fill grid {tuple(grid)}")
        maps = v[:, :, num_prefix_tokens:].transpose(-2, -1).reshape(B * h, d, H, W)
        out = self.proj(maps).reshape(B, h, d, H * W).transpose(-2, -1)
        return torch.cat((out.new_zeros(B, h, num_prefix_tokens, d), out), dim=2)


def grid_positions(grid: Grid, device: torch.device | None = None) -> torch.Tensor:
    """Integer ``(row, col)`` of every patch of ``grid`` in row-major order: ``(H*W, 2)``."""
    return _grid_positions(grid[0], grid[1], device)


@torch.fx.wrap  # one FX graph node: it builds index tensors from sizes
def _grid_positions(H: int, W: int, device: torch.device | None) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    return torch.stack((rows.flatten(), cols.flatten()), dim=-1)


def rope_2d_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``(..., head_dim // 2)`` for ``(..., 2)`` integer ``(row, col)`` positions.

    The first ``head_dim // 4`` angles rotate by the row, the next ``head_dim // 4`` by the column, each with
    frequencies ``theta ** (-2i / (head_dim / 2))``.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE, got {head_dim}")
    if not is_fx_tracing() and positions.shape[-1] != 2:
        raise ValueError(f"positions must end in (row, col) pairs, got shape {tuple(positions.shape)}")
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=positions.device, dtype=torch.float32) / half)
    p = positions.float()
    return torch.cat((p[..., 0:1] * inv_freq, p[..., 1:2] * inv_freq), dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, heads, N, head_dim)`` by ``angles`` ``(N, head_dim // 2)`` or ``(B, N, head_dim // 2)``.

    Rotate-half layout: channel ``i`` pairs with ``i + head_dim // 2``. Computed in float32.
    """
    # (1, N, d/2) or (B, 1, N, d/2): the same rotation for every head (no branch on ndim, so FX traces it)
    angles = angles.unsqueeze(-3)
    ang = torch.cat((angles, angles), dim=-1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * ang.cos() + rotated * ang.sin()).to(x.dtype)
