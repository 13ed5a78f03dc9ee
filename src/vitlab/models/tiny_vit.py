"""TinyViT: "TinyViT: Fast Pretraining Distillation for Small Vision Transformers" (arXiv:2207.10666),
github.com/microsoft/Cream/tree/main/TinyViT (PAPERS.md row 4).

timm's ``TinyVit`` is faithful to the official code and is reused as is: the paper's ImageNet
variants (5M/11M/21M at 224, 21M at 384/512) are reached, not copied. This file adds a
small-image variant for 28-32 px inputs, vitlab's quickstart default: the MBConv stem and
stage give convolutional inductive bias (fast convergence on small data), windowed attention
follows. Its size is vitlab's choice (three stages, no paper table). TinyVit takes any input
size (no position embeddings; attention biases are per window and the grid is padded to whole
windows), so ``img_size`` is accepted and ignored. Missing here: the fast pretraining distillation
with stored sparse teacher logits.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg
from timm.models.tiny_vit import TinyVit, checkpoint_filter_fn

from ._variants import Paper, VariantSpec, reach_timm_models, register_variants

TINY_VIT = Paper(
    4,
    "TinyViT: Fast Pretraining Distillation for Small Vision Transformers",
    "2207.10666",
    "https://github.com/microsoft/Cream/tree/main/TinyViT",
    kind="BT",
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> TinyVit:
    kwargs.pop("img_size", None)  # size-agnostic: no position embedding to build for a size
    return build_model_with_cfg(
        TinyVit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2)},
        **kwargs,
    )


# The TinyViT paper's ImageNet-1k table (and the official model zoo): params and FLOPs (multiply-accumulates). timm's
# default weights for the 224 variants are the 21,841-class ImageNet-22k ones; the table is for the 1000-class head.
_TIMM_TINY = {
    "embed_dims": (16, 32, 48, 64),
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 2, 3, 4),
    "window_sizes": (4, 4, 4, 4),
    "img_size": 32,
}
_timm = {
    "kwargs": {"num_classes": 1000},
    "test_kwargs": _TIMM_TINY,
    "img_size_arg": False,
    "first_conv": "patch_embed.conv1.conv",
    "classifier": "head.fc",
    "scriptable": True,  # timm's class, which timm scripts
}
TIMM_VARIANTS = {
    "tiny_vit_5m_224": VariantSpec(
        TINY_VIT, ref_params_m=5.4, ref_gmacs=1.3, ref_source="TinyViT IN-1k table (TinyViT-5M)", **_timm
    ),
    "tiny_vit_11m_224": VariantSpec(
        TINY_VIT,
        ref_params_m=11.0,
        ref_gmacs=2.0,
        ref_params_rounding=1.0,
        ref_source="TinyViT IN-1k table (TinyViT-11M)",
        **_timm,
    ),
    "tiny_vit_21m_224": VariantSpec(
        TINY_VIT,
        ref_params_m=21.0,
        ref_gmacs=4.3,
        ref_params_rounding=1.0,
        ref_source="TinyViT IN-1k table (TinyViT-21M)",
        **_timm,
    ),
    "tiny_vit_21m_384": VariantSpec(
        TINY_VIT,
        img_size=384,
        ref_params_m=21.0,
        ref_gmacs=13.8,
        ref_params_rounding=1.0,
        ref_source="TinyViT IN-1k table (TinyViT-21M↑384)",
        **_timm,
    ),
    "tiny_vit_21m_512": VariantSpec(
        TINY_VIT,
        img_size=512,
        ref_params_m=21.0,
        ref_gmacs=27.0,
        ref_params_rounding=1.0,
        ref_source="TinyViT IN-1k table (TinyViT-21M↑512)",
        **_timm,
    ),
}

VARIANTS = {
    "tiny_vit_1m_28": VariantSpec(
        TINY_VIT,
        kwargs={
            "in_chans": 1,
            "num_classes": 10,
            "embed_dims": (64, 128, 160),
            "depths": (2, 2, 2),
            "num_heads": (2, 4, 5),
            "window_sizes": (7, 7, 7),
            "drop_path_rate": 0.0,
        },
        img_size=28,
        in_chans=1,
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        ref_source="vitlab small-image size (no paper table)",
        test_kwargs={"embed_dims": (16, 32, 48), "depths": (1, 1, 1), "num_heads": (1, 2, 3)},
        description="TinyViT for 28-32 px (3 stages), the Fashion-MNIST quickstart default",
        first_conv="patch_embed.conv1.conv",
        pool_reduction=16,  # 28 px -> 7, 4, 2 (stride-2 merges round up)
        classifier="head.fc",
        scriptable=True,
    ),
}

reach_timm_models(TIMM_VARIANTS)
register_variants(_create, VARIANTS, module=__name__)
