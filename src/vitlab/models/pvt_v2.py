"""PVTv2-b0 as ShiftAddViT's host: "ShiftAddViT: Mixture of Multiplication Primitives Towards Efficient Vision
Transformer" (arXiv:2306.06446, github.com/GATECH-EIC/ShiftAddViT; PAPERS.md row 17) converts PVTv2
("PVT v2: Improved Baselines with Pyramid Vision Transformer", arXiv:2106.13797, github.com/whai362/PVT).

timm's ``pvt_v2_b0`` is PVTv2's official architecture, so it is reached, not copied: this file adds vitlab
metadata, so ``vitlab train --model pvt_v2_b0``, ``load_trained`` and ``vitlab eval`` rebuild it, and
``compress.apply(model, "shiftadd", ...)`` (``compress/shiftadd.py``) converts it. timm's constructor has no
``img_size`` (it runs at any size whose stages divide: multiples of 32 px).

Reference: the official README lists PVTv2-b0 at 3.7M parameters and 0.6 GFLOPs. The paper's table says
3.4M; timm builds 3.67M, as the official code does. The 0.6 G is rounded to 0.1 G, coarser than the 5% check
(0.566 GMACs counted), so no GMACs reference is checked.
"""

from __future__ import annotations

from ._variants import Paper, VariantSpec, reach_timm_models

__all__ = ["SHIFTADDVIT", "VARIANTS"]

SHIFTADDVIT = Paper(
    17,
    "ShiftAddViT: Mixture of Multiplication Primitives Towards Efficient Vision Transformer",
    "2306.06446",
    "https://github.com/GATECH-EIC/ShiftAddViT",
    kind="B+T",
)

_TINY = {"embed_dims": (8, 16, 24, 32), "num_heads": (1, 2, 3, 4), "depths": (1, 1, 1, 1), "mlp_ratios": (2, 2, 2, 2)}

VARIANTS = {
    "pvt_v2_b0": VariantSpec(
        SHIFTADDVIT,
        ref_params_m=3.7,
        ref_params_rounding=0.1,
        ref_source="PVTv2 official README (b0: 3.7M; the paper's table says 3.4M)",
        test_kwargs=_TINY,
        img_size_arg=False,
        pool_reduction=32,
        scriptable=True,  # timm's class, which timm scripts
        description="timm's PVTv2-b0, the host ShiftAddViT converts (compress.apply(model, 'shiftadd'))",
    ),
}

reach_timm_models(VARIANTS)
