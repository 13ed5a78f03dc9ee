"""Swin Transformer: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(arXiv:2103.14030), github.com/microsoft/Swin-Transformer (PAPERS.md row 1).

timm's ``SwinTransformer`` is faithful to the official code (its checkpoints load unchanged), so the
paper's variants are reached, not copied: this file adds vitlab metadata and ``dynamic_img_size=True``,
with which timm pads the token grid to whole windows and builds the shifted-window attention mask for
each input size, and timm's ``PatchEmbed`` with ``dynamic_img_pad=True`` (the image zero-padded on the right
and bottom to whole patches), so a model runs at any resolution. Deviation: none in the architecture; the
mask is built per forward instead of once per size.
"""

from __future__ import annotations

from functools import partial

from timm.layers import PatchEmbed

from ._variants import Paper, VariantSpec, reach_timm_models

__all__ = ["SWIN", "VARIANTS"]

SWIN = Paper(
    1,
    "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
    "2103.14030",
    "https://github.com/microsoft/Swin-Transformer",
)

# Two stages of two blocks (the second block of each is the shifted one) at 32 px: 8x8 then 4x4 tokens,
# windows of 4, so the contract tests exercise shifting, masking and, at 48 px, padding.
_TINY = {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "window_size": 4, "img_size": 32}
_timm = {
    "kwargs": {"dynamic_img_size": True, "embed_layer": partial(PatchEmbed, dynamic_img_pad=True)},
    "test_kwargs": _TINY,
    "classifier": "head.fc",
    "ref_params_rounding": 1.0,  # the paper gives whole millions
    "scriptable": True,  # timm's class, which timm scripts
    "fx_traceable": False,
    "fx_reason": "timm's Swin with dynamic_img_size builds its shift mask by item assignment (timm's own model)",
}

# Swin Table 1: params and FLOPs (multiply-accumulates), ImageNet-1k head; (b) holds the 22k-pretrained L.
VARIANTS = {
    "swin_tiny_patch4_window7_224": VariantSpec(
        SWIN, ref_params_m=28.0, ref_gmacs=4.5, ref_source="Swin Table 1a (Swin-T)", **_timm
    ),
    "swin_small_patch4_window7_224": VariantSpec(
        SWIN, ref_params_m=50.0, ref_gmacs=8.7, ref_source="Swin Table 1a (Swin-S)", **_timm
    ),
    "swin_base_patch4_window7_224": VariantSpec(
        SWIN, ref_params_m=88.0, ref_gmacs=15.4, ref_source="Swin Table 1a (Swin-B)", **_timm
    ),
    "swin_base_patch4_window12_384": VariantSpec(
        SWIN, img_size=384, ref_params_m=88.0, ref_gmacs=47.0, ref_source="Swin Table 1a (Swin-B 384²)", **_timm
    ),
    "swin_large_patch4_window7_224": VariantSpec(
        SWIN, ref_params_m=197.0, ref_gmacs=34.5, ref_source="Swin Table 1b (Swin-L)", **_timm
    ),
    "swin_large_patch4_window12_384": VariantSpec(
        SWIN, img_size=384, ref_params_m=197.0, ref_gmacs=103.9, ref_source="Swin Table 1b (Swin-L 384²)", **_timm
    ),
}

reach_timm_models(VARIANTS)
