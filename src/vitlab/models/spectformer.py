"""SpectFormer: "SpectFormer: Frequency and Attention is what you need in a Vision Transformer"
(arXiv:2304.06446), github.com/badripatro/SpectFormers (PAPERS.md row 5).

The first blocks mix tokens with spectral gating (``layers.SpectralGating``: FFT, learnable complex filter,
inverse FFT), the later ones with multi-head attention. Two families, as in the paper and the official code:

- ``SpectFormer`` (vanilla, T/XS/S/B): a DeiT-style isotropic ViT without class token (average pooling); the
  first ``num_spectral`` (alpha = 4) blocks are GFNet blocks ``x + mlp(norm2(filter(norm1(x))))`` (one
  residual, as in the official ``Block``), the rest pre-norm attention blocks (``MetaBlock``).
- ``SpectFormerH`` (hierarchical, H-S/B/L): the official WaveViT-derived four-stage model: conv stem (stride 4),
  spectral gating in stages 1-2 and attention in stages 3-4, PVTv2 conv FFNs (``ConvFfn``), per-stage norms,
  then a class-attention block on a mean-initialised class token, a final norm and the token-labelling
  auxiliary head (inference logits ``head(cls) + 0.5 * max_tokens aux_head(tokens)``, as the official model).

Deviations: attention goes through SDPA (equal in eval); the official vanilla code hard-codes 6 heads (which
cannot divide SpectFormer-B's 512 channels), here heads have 64 channels (T 4, XS/S 6, B 8); convs keep
PyTorch's init; the spectral filters resample for other input sizes (see ``layers/spectral.py``); token
labelling's training side (MixToken, dense targets) is not implemented.

Reference figures are the official READMEs' model-zoo tables. FLOPs counted here include the FFTs
(``layers/spectral.py`` registers their cost with torch's counter, GFNet's ``HWD log2 HW``); the README's
hierarchical GMACs leave out attention matmuls and FFTs, so they are checked on that basis (``H_REF_GMACS``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, to_2tuple

from ..layers import Attention, Grid, IsotropicBackbone, MetaBlock, SpectralGating
from ..layers.class_attention import ClassAttentionBackbone
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["H_REF_GMACS", "SPECTFORMER", "VARIANTS", "SpectFormer", "SpectFormerH"]

SPECTFORMER = Paper(
    5,
    "SpectFormer: Frequency and Attention is what you need in a Vision Transformer",
    "2304.06446",
    "https://github.com/badripatro/SpectFormers",
)


def _image_size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    size = to_2tuple(img_size)
    if not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"img_size must be a positive integer or a pair of them, got {img_size!r}")
    return size


class _GlobalFilterBlock(nn.Module):
    """GFNet block, the official spectral layer: ``x + drop_path(mlp(norm2(filter(norm1(x)))))``."""

    def __init__(
        self,
        dim: int,
        grid_size: Grid,
        mlp_ratio: float,
        drop_path: float,
        proj_drop: float,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.filter = SpectralGating(dim, grid_size)  # official key name: blocks.i.filter.complex_weight
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x), grid))))


class SpectFormer(IsotropicBackbone):
    """Vanilla SpectFormer: ``num_spectral`` GFNet blocks, then attention blocks, on one patch grid.

    Args:
        num_spectral: how many leading blocks use spectral gating (the paper's alpha).
        proj_drop_rate: dropout in the MLPs and after attention (the official ``drop_rate`` inside blocks).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 384,
        depth: int = 12,
        num_spectral: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        if not isinstance(num_spectral, int) or not 0 <= num_spectral <= depth:
            raise ValueError(f"num_spectral must be an integer in [0, depth={depth}], got {num_spectral!r}")
        size = _image_size(img_size)
        grid = (size[0] // patch_size, size[1] // patch_size)  # the filters' grid (timm PatchEmbed floors)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        attn = partial(Attention, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate)

        def block_fn(index: int, drop_path: float) -> nn.Module:
            if index < num_spectral:
                return _GlobalFilterBlock(embed_dim, grid, mlp_ratio, drop_path, proj_drop_rate, norm_layer)
            mixer = partial(attn, proj_drop=proj_drop_rate)
            return MetaBlock(embed_dim, mixer, None, norm_layer, mlp_ratio, drop_path, proj_drop_rate)

        super().__init__(
            block_fn,
            depth,
            embed_dim,
            img_size=size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            class_token=False,  # the official model averages the normed tokens
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
        )


class SpectFormerH(ClassAttentionBackbone):
    """Hierarchical SpectFormer: spectral-gating stages, then attention stages, then a class-attention head
    (the WaveViT topology of ``layers/class_attention.py``).

    Args:
        num_spectral_stages: how many leading stages use spectral gating (the official code: 2).
        Other arguments: ``ClassAttentionBackbone``'s.
    """

    def __init__(self, num_spectral_stages: int = 2, **kwargs: Any) -> None:
        super().__init__(SpectralGating, num_spectral_stages, **kwargs)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    cls = SpectFormerH if "embed_dims" in kwargs else SpectFormer
    return build_with_features(cls, variant, pretrained, **kwargs)


# Vanilla: 32 px, patch 8 (4x4 grid), one spectral and one attention block; at 48 px the filter resamples.
_TINY = {"embed_dim": 32, "depth": 2, "num_spectral": 1, "num_heads": 2, "patch_size": 8, "img_size": 32}
# Hierarchical: 32 px -> grids 8, 4, 2, 1; two spectral and two attention stages, class block and aux head.
_TINY_H = {
    "embed_dims": (16, 24, 32, 48),
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 2, 2),
    "mlp_ratios": (2, 2, 2, 2),
    "stem_hidden_dim": 8,
    "img_size": 32,
}
_README = "official README model zoo"


def _spec(arch: dict[str, Any], params_m: float, gmacs: float | None, source: str, rounding: float) -> VariantSpec:
    hierarchical = "embed_dims" in arch
    return VariantSpec(
        SPECTFORMER,
        kwargs=arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_params_rounding=rounding,
        ref_source=source,
        test_kwargs=_TINY_H if hierarchical else _TINY,
        isotropic=not hierarchical,
        first_conv="stem.conv.0.conv" if hierarchical else "patch_embed.proj",
        pool_reduction=32 if hierarchical else None,
        classifier=("head", "aux_head") if hierarchical else "head",
        description="Hierarchical (SpectFormer-H)" if hierarchical else "Vanilla (isotropic, patch 16)",
    )


def _h(dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...], stem: int) -> dict[str, Any]:
    return {"embed_dims": dims, "depths": depths, "num_heads": heads, "stem_hidden_dim": stem}


# Vanilla configs: official vanilla_architecture/main_spectformer.py (alpha = 4 spectral blocks). Params/FLOPs:
# the official README (whole millions, one-decimal GMACs, attention matmuls included); XS params from the
# official training log (n_parameters 20,028,520), as the README's "22M" disagrees with its own configuration.
# Hierarchical: official hierarchical_architecture/spectformer.py configs; params from its README (one-decimal
# millions, aux head included). Its GMACs leave out the attention matmuls and the FFTs (a module-hook counter,
# like the official util/flops_counter.py), so they are not a ``ref_gmacs`` for the full count: the full count
# is 3-5% higher (H-S 4.08, H-B 6.62, H-L 13.22 GMACs); tests/models/test_spectformer.py checks
# ``H_REF_GMACS`` on the README's basis.
H_REF_GMACS = {"spectformer_h_s": 3.9, "spectformer_h_b": 6.3, "spectformer_h_l": 12.7}
VARIANTS = {
    "spectformer_t": _spec({"embed_dim": 256, "num_heads": 4}, 9.0, 1.8, f"{_README} (SpectFormer-T)", 1.0),
    "spectformer_xs": _spec(
        {"embed_dim": 384, "num_heads": 6}, 20.03, 4.0, "official training log (XS params), README (GMACs)", 0.0
    ),
    "spectformer_s": _spec({"embed_dim": 384, "depth": 19}, 32.0, 6.6, f"{_README} (SpectFormer-S)", 1.0),
    "spectformer_b": _spec(
        {"embed_dim": 512, "depth": 19, "num_heads": 8}, 57.0, 11.5, f"{_README} (SpectFormer-B)", 1.0
    ),
    "spectformer_h_s": _spec(
        _h((64, 128, 320, 448), (3, 4, 6, 3), (2, 4, 10, 14), 32), 22.2, None, f"{_README} (H-S)", 0.1
    ),
    "spectformer_h_b": _spec(
        _h((64, 128, 320, 512), (3, 4, 12, 3), (2, 4, 10, 16), 64), 33.1, None, f"{_README} (H-B)", 0.1
    ),
    "spectformer_h_l": _spec(
        _h((96, 192, 384, 512), (3, 6, 18, 3), (3, 6, 12, 16), 64), 54.7, None, f"{_README} (H-L)", 0.1
    ),
}

register_variants(_create, VARIANTS, module=__name__)
