"""TinyViT: "TinyViT: Fast Pretraining Distillation for Small Vision Transformers" (arXiv:2207.10666),
github.com/wkcn/TinyViT (PAPERS.md row 4).

timm's ``TinyVit`` is faithful to the official code and is reused as is. This file adds a
small-image variant for 28-32 px inputs, vitlab's quickstart default: the MBConv stem and
stage give convolutional inductive bias (fast convergence on small data), windowed attention
follows. Its size is vitlab's choice (three stages, no paper table). TinyVit takes any input
size (no position embeddings), so ``img_size`` is accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg
from timm.models.tiny_vit import TinyVit, checkpoint_filter_fn

from ._variants import Paper, VariantSpec, register_variants

TINY_VIT = Paper(
    4,
    "TinyViT: Fast Pretraining Distillation for Small Vision Transformers",
    "2207.10666",
    "https://github.com/wkcn/TinyViT",
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
        classifier="head.fc",
    ),
}

register_variants(_create, VARIANTS, module=__name__)
