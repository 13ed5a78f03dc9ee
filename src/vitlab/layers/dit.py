"""DiT parts: adaLN-Zero conditioned transformer blocks, timestep and label embeddings, the patch output layer.

Scalable Diffusion Models with Transformers (Peebles & Xie, arXiv:2212.09748, github.com/facebookresearch/DiT).
What is new here is only the conditioning: a vector ``c`` (timestep embedding plus class embedding) regresses,
per block, a shift, a scale and a gate for each of the two residual branches (adaLN-Zero, Sec. 3.2); the regression
starts at zero, so every block starts as the identity. Attention is ``layers.attention.Attention`` and the MLP
timm's ``Mlp``; ``AdaLNZeroBlock.adopt`` takes them from an existing isotropic block instead (a timm ``Block`` or
a vitlab ``MetaBlock`` with any token mixer), so a DiT can be built on any plain ViT's blocks.

Deviations: the timestep is ``t`` in [0, 1] (flow matching) scaled by 1000 before the sinusoid, as DiT's integer
steps; an adopted block's own affine norms are dropped (adaLN-Zero's norms have no affine parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import Mlp

from .attention import Attention
from .block import Grid, MetaBlock, _call

__all__ = [
    "AdaLNZeroBlock",
    "DiTOutputLayer",
    "LabelEmbedder",
    "TimestepEmbedder",
    "modulate",
    "patchify",
    "timestep_embedding",
    "unpatchify",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal code of times ``t`` (B,) -> ``(B, dim)``: ``[cos(s t f_k), sin(s t f_k)]`` with geometric ``f_k``."""
    if t.ndim != 1:
        raise ValueError(f"t must be a (B,) tensor of times, got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]
    code = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([code, torch.zeros_like(code[:, :1])], dim=-1) if dim % 2 else code


class TimestepEmbedder(nn.Module):
    """Times ``(B,)`` -> ``(B, dim)``: the sinusoidal code through a two-layer SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


class LabelEmbedder(nn.Module):
    """Class ids ``(B,)`` -> ``(B, dim)``; id ``num_classes`` is the learned "no class" entry of guidance."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` per sample: ``x`` (B, N, C), ``shift``/``scale`` (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero_linear(dim: int, out: int) -> nn.Linear:
    layer = nn.Linear(dim, out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class AdaLNZeroBlock(nn.Module):
    """``x + g1 * mixer(mod(norm1(x)))`` then ``x + g2 * mlp(mod(norm2(x)))``; shifts, scales, gates from ``c``.

    ``forward(x (B, N, C), c (B, C), grid=None) -> (B, N, C)``. Children keep timm's names (``norm1``, ``attn``
    or the mixer's own name, ``norm2``, ``mlp``) plus ``ada_ln`` (SiLU -> Linear(C, 6C), zero-initialised).

    Args:
        mixer: the token mixer (default ``Attention(dim, num_heads)``); ``mixer_uses_grid`` says it takes
            ``(x, grid)`` (vitlab mixers) rather than ``x`` alone (timm's attention).
        mlp: the channel MLP (default timm's ``Mlp`` with tanh-GELU, DiT's).
        mixer_name: the mixer's child name.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        *,
        mixer: nn.Module | None = None,
        mlp: nn.Module | None = None,
        mixer_name: str = "attn",
        mixer_uses_grid: bool = False,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer_name = mixer_name
        self.add_module(mixer_name, mixer if mixer is not None else Attention(dim, num_heads))
        self.mixer_uses_grid = mixer_uses_grid if mixer is not None else True
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = mlp if mlp is not None else Mlp(dim, hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada_ln = nn.Sequential(nn.SiLU(), _zero_linear(dim, 6 * dim))

    @classmethod
    def adopt(cls, block: nn.Module, dim: int) -> AdaLNZeroBlock:
        """An adaLN-Zero block owning ``block``'s token mixer and MLP (a timm ``Block`` or a vitlab ``MetaBlock``).

        The host's norms, layer scales and drop paths are not kept (module docstring).
        """
        if isinstance(block, MetaBlock):
            return cls(dim, mixer=block.token_mixer, mlp=block.mlp, mixer_name=block.mixer_name, mixer_uses_grid=True)
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
            raise ValueError(
                f"cannot adopt {type(block).__name__}: an adaLN-Zero block needs a host block with 'attn' and 'mlp' "
                "children (timm's Block) or a vitlab MetaBlock"
            )
        return cls(dim, mixer=attn, mlp=mlp, mixer_uses_grid=isinstance(attn, Attention))

    @property
    def token_mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        h = self.token_mixer(h, grid) if self.mixer_uses_grid else self.token_mixer(h)
        x = x + gate1[:, None] * h
        return x + gate2[:, None] * _call(self.mlp, modulate(self.norm2(x), shift2, scale2), grid)


class DiTOutputLayer(nn.Module):
    """Tokens ``(B, N, C)`` -> per-patch pixels ``(B, N, patch_size**2 * out_chans)``: adaLN norm + zero Linear."""

    def __init__(self, dim: int, patch_size: int, out_chans: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Sequential(nn.SiLU(), _zero_linear(dim, 2 * dim))
        self.proj = _zero_linear(dim, patch_size * patch_size * out_chans)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(c).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, p*p*C)`` patch pixels (row-major patches of ``(p, p, C)``): the inverse
    of :func:`unpatchify` (MAE- and CroCo-style pixel targets)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {(H, W)} must be a multiple of the patch size {p}")
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, grid: Grid, patch_size: int, chans: int) -> torch.Tensor:
    """``(B, H*W, p*p*chans)`` patch pixels (row-major patches of ``(p, p, chans)``) -> ``(B, chans, H*p, W*p)``."""
    B = x.shape[0]
    H, W = grid
    x = x.reshape(B, H, W, patch_size, patch_size, chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, chans, H * patch_size, W * patch_size)
