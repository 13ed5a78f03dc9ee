"""Hyena-DeiT: "Multi-Dimensional Hyena for Spatial Inductive Bias" (arXiv:2309.13600),
github.com/Itamarzimm/HyenaND (PAPERS.md row 13).

A DeiT whose token mixers are Hyena N-D layers (``layers.HyenaMixer``: implicit 2-D filters from positional
features, FFT long convolution over the patch grid, multiplicative gates), and the paper's hybrid: Hyena in
the first blocks, softmax attention after (the official ``--method hyena2dattn``: Hyena for blocks
``i <= depth // 2``, 7 of 12). Consecutive Hyena blocks alternate the long convolution's direction (the
official ``--directional_mode seq``: even blocks anti-causal). DeiT-T/S sizes as in the paper; no class
token (a Hyena layer needs a pure grid), learned position embedding, LayerNorm eps 1e-6.

Reference figures: the paper's tables were not readable here, so ref_params_m / ref_gmacs are
reconstructed from the official code's configuration (order 2, filter MLP width 64 with 2 inner layers,
positional features of width 3 per axis): parameters summed by hand from its layer definitions, MACs
counted as torch's flop counter counts them (linears, convs, attention) plus the official real FFTs by
vitlab's formula (``layers/spectral.py``). Ours count 0.7-2.3% more at batch 1: ``layers/hyena.py`` packs
two images into one complex FFT, and a single image leaves half of that FFT empty.
Deviations: average pooling of the tokens (the official code, without a class token, classifies the first
patch token); positional features of the filters are recomputed per grid (see ``layers/hyena.py``) instead
of 3 * 14 learned values per layer, so models run at any resolution.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn

from ..layers import Attention, HyenaMixer, IsotropicBackbone, MetaBlock
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["HYENA", "VARIANTS", "HyenaViT"]

HYENA = Paper(
    13,
    "Multi-Dimensional Hyena for Spatial Inductive Bias",
    "2309.13600",
    "https://github.com/Itamarzimm/HyenaND",
)


class HyenaViT(IsotropicBackbone):
    """ViT/DeiT with Hyena N-D mixers in the first ``num_hyena_blocks`` blocks and attention after.

    Args:
        num_hyena_blocks: leading blocks that use Hyena (default all: the attention-free model).
        hyena_order: Hyena's recurrence depth; ``filter_order``: width of the implicit filter MLP.
        alternate_direction: even Hyena blocks convolve anti-causally (the paper's "seq" mode).
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_hyena_blocks: int | None = None,
        hyena_order: int = 2,
        filter_order: int = 64,
        alternate_direction: bool = True,
        proj_drop_rate: float = 0.0,
        global_pool: str = "avg",
        **kwargs: Any,
    ) -> None:
        num_hyena = depth if num_hyena_blocks is None else num_hyena_blocks
        if not 0 <= num_hyena <= depth:
            raise ValueError(f"num_hyena_blocks must be in [0, depth={depth}], got {num_hyena_blocks}")
        self.num_hyena_blocks = num_hyena
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        def block_fn(i: int, drop_path: float) -> nn.Module:
            if i < num_hyena:
                reverse = alternate_direction and i % 2 == 0
                mixer = partial(
                    HyenaMixer, order=hyena_order, filter_order=filter_order, reverse=reverse, proj_drop=proj_drop_rate
                )
            else:
                mixer = partial(Attention, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop_rate)
            return MetaBlock(embed_dim, mixer, norm_layer=norm_layer, mlp_ratio=mlp_ratio, drop_path=drop_path)

        super().__init__(
            block_fn, depth, embed_dim, class_token=False, global_pool=global_pool, norm_layer=norm_layer, **kwargs
        )


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HyenaViT:
    return build_with_features(HyenaViT, variant, pretrained, **kwargs)


# 32 px, patch 8: a 4x4 grid, two blocks (the hybrid's first is Hyena, its second attention)
_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32, "filter_order": 16}
_SOURCE = "reconstructed: official code config (DeiT-{} sizes, --method {} --hyena2d_filter); paper table unread"


def _spec(size: str, arch: dict[str, Any], params_m: float, gmacs: float, hybrid: bool) -> VariantSpec:
    method = "hyena2dattn" if hybrid else "hyena2d"
    kind = "hybrid: Hyena N-D in blocks 0-6, attention after" if hybrid else "attention-free"
    return VariantSpec(
        HYENA,
        kwargs={**arch, "num_hyena_blocks": 7} if hybrid else arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=_SOURCE.format(size, method),
        test_kwargs={**_TINY, "num_hyena_blocks": 1} if hybrid else _TINY,
        isotropic=True,
        fx_traceable=False,
        fx_reason="HyenaMixer evaluates its implicit filters (and caches their spectra) per grid size in Python",
        description=f"Hyena-DeiT-{size}, {kind}",
    )


_DEIT_T = {"embed_dim": 192, "depth": 12, "num_heads": 3}
_DEIT_S = {"embed_dim": 384, "depth": 12, "num_heads": 6}

VARIANTS = {
    "hyena_deit_tiny_patch16_224": _spec("T", _DEIT_T, 6.042, 1.158, hybrid=False),
    "hyena_deit_small_patch16_224": _spec("S", _DEIT_S, 22.594, 4.377, hybrid=False),
    "hyena_deit_hybrid_tiny_patch16_224": _spec("T", _DEIT_T, 5.907, 1.195, hybrid=True),
    "hyena_deit_hybrid_small_patch16_224": _spec("S", _DEIT_S, 22.367, 4.459, hybrid=True),
}

register_variants(_create, VARIANTS, module=__name__)
