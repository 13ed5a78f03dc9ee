"""ViT and DeiT, the baseline every other family is compared with (PAPERS.md row 0).

ViT: "An Image is Worth 16x16 Words" (arXiv:2010.11929), github.com/google-research/vision_transformer.
DeiT: "Training data-efficient image transformers & distillation through attention" (arXiv:2012.12877),
github.com/facebookresearch/deit.

timm implements both faithfully, so the ImageNet variants are reached, not copied: vitlab adds
metadata and ``dynamic_img_size=True, dynamic_img_pad=True`` (any input size: position embeddings
resample, and the image is zero-padded on the right and bottom to whole patches). This file
adds small-image variants for 28-32 px inputs (patch 4, 7x7 or 8x8 tokens), built from timm's
``VisionTransformer`` / ``VisionTransformerDistilled``; their sizes are vitlab's, not a paper's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.models import build_model_with_cfg
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ._variants import Paper, VariantSpec, reach_timm_models, register_variants

VIT = Paper(
    0,
    "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
    "2010.11929",
    "https://github.com/google-research/vision_transformer",
)
DEIT = Paper(
    0,
    "Training data-efficient image transformers & distillation through attention",
    "2012.12877",
    "https://github.com/facebookresearch/deit",
)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)

# The registry-wide contract tests build this instead of the full-size network.
_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}
_ANY_SIZE = {"dynamic_img_size": True, "dynamic_img_pad": True}
_timm = {"kwargs": _ANY_SIZE, "isotropic": True, "test_kwargs": _TINY, "scriptable": True}  # timm scripts them
# timm's distilled head reads the class and distillation tokens: it refuses global_pool=''
_DISTILLED_FX = "timm's VisionTransformerDistilled resamples its position embedding outside timm's FX-wrapped call"
_timm_distilled = {**_timm, "unpooled_output": False, "fx_traceable": False, "fx_reason": _DISTILLED_FX}

# Reference figures: ViT Table 1 (params), DeiT Table 1 (params, FLOPs = multiply-accumulates).
TIMM_VARIANTS = {
    "vit_tiny_patch16_224": VariantSpec(
        VIT, ref_params_m=5.7, ref_gmacs=1.3, ref_source="DeiT Table 1 (ViT-Ti)", **_timm
    ),
    "vit_small_patch16_224": VariantSpec(
        VIT, ref_params_m=22.1, ref_gmacs=4.6, ref_source="DeiT Table 1 (ViT-S)", **_timm
    ),
    "vit_base_patch16_224": VariantSpec(
        VIT, ref_params_m=86.6, ref_gmacs=17.6, ref_source="ViT Table 1, DeiT Table 1", **_timm
    ),
    "vit_large_patch16_224": VariantSpec(
        VIT, ref_params_m=304.3, ref_gmacs=61.6, ref_source="ViT Table 1 (307M)", **_timm
    ),
    "deit_tiny_patch16_224": VariantSpec(DEIT, ref_params_m=5.7, ref_gmacs=1.3, ref_source="DeiT Table 1", **_timm),
    "deit_small_patch16_224": VariantSpec(DEIT, ref_params_m=22.1, ref_gmacs=4.6, ref_source="DeiT Table 1", **_timm),
    "deit_base_patch16_224": VariantSpec(DEIT, ref_params_m=86.6, ref_gmacs=17.6, ref_source="DeiT Table 1", **_timm),
    "deit_tiny_distilled_patch16_224": VariantSpec(
        DEIT, ref_params_m=5.9, ref_gmacs=1.3, ref_source="DeiT Table 1 (⚗)", **_timm_distilled
    ),
    "deit_small_distilled_patch16_224": VariantSpec(
        DEIT, ref_params_m=22.4, ref_gmacs=4.6, ref_source="DeiT Table 1 (⚗)", **_timm_distilled
    ),
    "deit_base_distilled_patch16_224": VariantSpec(
        DEIT, ref_params_m=87.3, ref_gmacs=17.7, ref_source="DeiT Table 1 (⚗)", **_timm_distilled
    ),
}


def _create(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs: Any) -> VisionTransformer:
    return build_model_with_cfg(
        VisionTransformerDistilled if distilled else VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True)
        if distilled
        else checkpoint_filter_fn,
        feature_cfg={
            "out_indices": kwargs.pop("out_indices", min(3, kwargs.get("depth", 12))),
            "feature_cls": "getter",
        },
        **kwargs,
    )


def _small(desc: str, distilled: bool = False, **arch: Any) -> VariantSpec:
    kwargs = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, **_ANY_SIZE, **arch)
    if distilled:
        kwargs["distilled"] = True
    return VariantSpec(
        DEIT if distilled else VIT,
        kwargs=kwargs,
        classifier=("head", "head_dist") if distilled else "head",
        img_size=28,
        in_chans=1,
        num_classes=10,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        ref_source="vitlab small-image size (no paper table)",
        test_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
        isotropic=True,
        unpooled_output=not distilled,
        scriptable=True,  # timm's classes, which timm scripts
        fx_traceable=not distilled,
        fx_reason=_DISTILLED_FX if distilled else "",
        description=desc,
    )


SMALL_VARIANTS = {
    "vit_nano_patch4_28": _small(
        "ViT for 28-32 px, 128 wide, 6 deep", embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0
    ),
    "vit_micro_patch4_28": _small(
        "ViT for 28-32 px, 128 wide, 12 deep (ViT-Ti depth; the token-reduction host)",
        embed_dim=128,
        depth=12,
        num_heads=4,
        mlp_ratio=2.0,
    ),
    "vit_tiny_patch4_28": _small("ViT-Ti width for 28-32 px", embed_dim=192, depth=12, num_heads=3),
    "deit_tiny_distilled_patch4_28": _small(
        "DeiT-Ti with distillation token for 28-32 px", distilled=True, embed_dim=192, depth=12, num_heads=3
    ),
}

reach_timm_models(TIMM_VARIANTS)
register_variants(_create, SMALL_VARIANTS, module=__name__)
