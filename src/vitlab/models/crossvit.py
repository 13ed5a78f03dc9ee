"""CrossViT: "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification"
(arXiv:2103.14899), github.com/IBM/CrossViT (PAPERS.md row 3).

timm's ``CrossVit`` is a port of the official code (its checkpoints load with a key rename), so the
paper's variants are reached, not copied; this file adds vitlab metadata. timm names them after the
small-patch branch's input (``*_240``, ``*_408``): the large-patch branch sees the image rescaled to
224 (384), which is what the paper's tables describe.

Declared limits (timm's, kept rather than patched): learned position embeddings are built for the
``img_size`` the model is constructed with and other inputs are rescaled to it (``dynamic_size=False``:
build with ``img_size=`` for another resolution); gradient checkpointing is not implemented; ``global_pool=''``
is refused (two branches of tokens have no single unpooled output).
"""

from __future__ import annotations

from typing import Any

import torch

from ._variants import Paper, VariantSpec, reach_timm_models

__all__ = ["CROSSVIT", "VARIANTS"]

CROSSVIT = Paper(
    3,
    "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification",
    "2103.14899",
    "https://github.com/IBM/CrossViT",
)

# One multi-scale block (one transformer block per branch, one cross-attention fusion) at 32 px:
# 8x8 small patches of 4 px and 2x2 large patches of 8 px (the large branch sees the image rescaled to
# 16 px; timm counts patches right only where the rescaled size is a multiple of the patch).
_TINY = {
    "img_size": 32,
    "img_scale": (1.0, 0.5),
    "patch_size": (4, 8),
    "embed_dim": (16, 32),
    "depth": ((1, 1, 0),),
    "num_heads": (2, 2),
    "mlp_ratio": (2.0, 2.0, 1.0),
}


# NOTE: the † three-conv patch embedding exists for 12 and 16 px patches only, and its strides need the
# large branch's input to be a multiple of 16 px: at 240 px (224 for the large branch) and 360 px it is.
_TINY_DAGGER = {**_TINY, "img_size": 240, "patch_size": (12, 16), "img_scale": (1.0, 224 / 240)}


def _spec(
    params_m: float | None, gmacs: float | None, source: str, img_size: int = 240, dagger: bool = False
) -> VariantSpec:
    return VariantSpec(
        CROSSVIT,
        img_size=img_size,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=source,
        test_kwargs=_TINY_DAGGER if dagger else _TINY,
        dynamic_size=False,
        grad_checkpointing=False,
        unpooled_output=False,
        scriptable=True,  # timm's class, which timm scripts
        first_conv="patch_embed.0.proj.0" if dagger else "patch_embed.0.proj",
        classifier=("head.0", "head.1"),
    )


# The CrossViT paper's ImageNet1K tables (Ti/S/B against DeiT; 9/15/18, † = three-conv patch embedding):
# params and FLOPs (multiply-accumulates) at 224 px for the large-patch branch.
VARIANTS = {
    # NOTE: the paper lists CrossViT-Ti at 6.9M / 1.6G, but the official configuration (which timm
    # follows) has 7.01M parameters, 1.6% more; no reference is checked for it.
    "crossvit_tiny_240": _spec(None, None, "CrossViT paper (6.9M, 1.6G; official code builds 7.01M)"),
    "crossvit_small_240": _spec(26.7, 5.6, "CrossViT ImageNet1K tables (CrossViT-S)"),
    "crossvit_base_240": _spec(104.7, 21.2, "CrossViT ImageNet1K tables (CrossViT-B)"),
    "crossvit_9_240": _spec(8.6, 1.8, "CrossViT ImageNet1K tables (CrossViT-9)"),
    "crossvit_15_240": _spec(27.4, 5.8, "CrossViT ImageNet1K tables (CrossViT-15)"),
    "crossvit_18_240": _spec(43.3, 9.0, "CrossViT ImageNet1K tables (CrossViT-18)"),
    "crossvit_9_dagger_240": _spec(8.8, 2.0, "CrossViT ImageNet1K tables (CrossViT-9†)", dagger=True),
    "crossvit_15_dagger_240": _spec(28.2, 6.1, "CrossViT ImageNet1K tables (CrossViT-15†)", dagger=True),
    "crossvit_18_dagger_240": _spec(44.3, 9.5, "CrossViT ImageNet1K tables (CrossViT-18†)", dagger=True),
    "crossvit_15_dagger_408": _spec(
        28.5, 21.4, "CrossViT ImageNet1K tables (CrossViT-15† at 384)", img_size=408, dagger=True
    ),
    "crossvit_18_dagger_408": _spec(
        44.6, 32.4, "CrossViT ImageNet1K tables (CrossViT-18† at 384)", img_size=408, dagger=True
    ),
}

# CrossViT-18: width 224/448, 7 heads, MLP ratio 3, three multi-scale blocks of (1, 6) transformer blocks.
_CROSSVIT_18 = dict(
    img_scale=(1.0, 224 / 240),
    patch_size=[12, 16],
    embed_dim=[224, 448],
    depth=[[1, 6, 0]] * 3,
    num_heads=[7, 7],
    mlp_ratio=[3, 3, 1],
)


def _crossvit_18_240(pretrained: bool = False, **kwargs: Any) -> Any:
    from timm.models.crossvit import _create_crossvit

    return _create_crossvit("crossvit_18_240", pretrained=pretrained, **{**_CROSSVIT_18, **kwargs})


def _mend_crossvit_18() -> None:
    """FIXME(timm<=1.0.31): its ``crossvit_18_240`` entrypoint puts ``kwargs`` into its architecture arguments
    and passes them again, so any override of those (``embed_dim=`` ...) raises TypeError. Only in that case is
    the entrypoint (nothing else: names, pretrained cfg, module) swapped for one building the same model."""
    import timm.models._registry as registry

    broken = registry._model_entrypoints.get("crossvit_18_240")
    if broken is None:
        return
    try:
        with torch.device("meta"):
            broken(embed_dim=[16, 32], num_heads=[2, 2], depth=[[1, 1, 0]], num_classes=2)
    except TypeError:
        registry._model_entrypoints["crossvit_18_240"] = _crossvit_18_240


_mend_crossvit_18()
reach_timm_models(VARIANTS)
