"""SVT: "Scattering Vision Transformer: Spectral Mixing Matters" (arXiv:2311.01310, NeurIPS 2023),
https://github.com/badripatro/svt (commit fcbc9b3; PAPERS.md row 6).

The hierarchical SVT-H models: a convolutional stem (7x7/2 and two 3x3 conv-BN-ReLU, then a 3x3/2
projection and LayerNorm), four stages of pre-norm blocks with a PVTv2-style conv FFN (``ConvFfn`` without
the depthwise residual), the scattering mixer (``layers/scattering.py`` on ``layers/dtcwt.py``: DTCWT,
low-band gating, complex Einstein-multiplication channel mixing) in stage 1 and multi-head self-attention
in stages 2-4, then a class-attention block on the mean token and a classifier plus the token-labelling auxiliary head,
combined as ``head(cls) + 0.5 * max_tokens(aux_head(tokens))`` (the official inference rule).
Variants S/B/L follow the official ``svt_s/b/l`` entrypoints (channel mixing, as the official ``Block``).

Deviations: token-labelling training (MixToken, dense targets) is not implemented; the same combined
logits are returned in training. The per-stage LayerNorm of stages 1-3 runs at the start of the next
stage's downsample (same function). Attention uses fused ``qkv`` (official: ``q`` and ``kv``; same
parameters) through SDPA, over all tokens: the official entrypoints pass ``sr_ratios`` that its attention
never reads, so there is no spatial reduction here either. The scattering low-band weight is resampled
for grids other than ``img_size / 4``. FLOPs: torch's counter counts the DTCWT's filter convolutions
(19 taps per output sample, the lowpass zero-padded from 13), the Einstein products and the attention
matrix products; see ``VARIANTS`` for how that compares with the paper's figures.

Reference figures (issue 3): the paper's SVT-H-S/B/L GFLOPs (3.9, 6.3, 12.7) equal SpectFormer-H-S/B/L's
(same authors, same stem, widths and depths). A module-hook counter like the official ``util/flops_counter.py``
(``nn.Linear``/``nn.Conv2d`` only: no attention or Einstein products, no functional DTCWT convolutions)
reproduces them within 0.3% only with the scattering mixer in two stages; the official one-stage models count
4.12/6.51/13.36 GMACs on that basis (+5.6%, +3.4%, +5.2%: stage 2's attention linears), so no counting basis
matches the architecture the official code builds and the variants carry no ``ref_gmacs``
(``tests/models/test_svt.py`` checks the two-stage explanation). Parameters: S and B match with the
token-labelling head (22.05M, 32.88M); L's 54.0M matches the official configuration without it (54.08M).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn as nn

from ..layers import ScatteringMixer
from ..layers.class_attention import ClassAttentionBackbone
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["PAPER_GMACS", "SVT", "SVT_PAPER", "VARIANTS"]

SVT_PAPER = Paper(
    6,
    "Scattering Vision Transformer: Spectral Mixing Matters",
    "2311.01310",
    "https://github.com/badripatro/svt",
)


class SVT(ClassAttentionBackbone):
    """Hierarchical Scattering Vision Transformer (SVT-H), the WaveViT topology of ``layers/class_attention.py``.

    Args:
        num_scatter_stages: how many leading stages use the scattering mixer (the paper's alpha, 1).
        num_blocks: channel blocks of the scattering mixer's complex MLP.
        Other arguments: ``ClassAttentionBackbone``'s; the stem's norm is PyTorch's default LayerNorm (official).
    """

    def __init__(self, num_scatter_stages: int = 1, num_blocks: int = 4, **kwargs: Any) -> None:
        mixer = partial(ScatteringMixer, num_blocks=num_blocks)
        super().__init__(mixer, num_scatter_stages, stem_norm_layer=nn.LayerNorm, **kwargs)

    def init_weights(self) -> None:
        """Truncated-normal linears (timm) and the official fan-out normal init for convolutions."""
        super().init_weights()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, std=(2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SVT:
    return build_with_features(SVT, variant, pretrained, **kwargs)


_TINY = {
    "img_size": 32,
    "stem_hidden_dim": 8,
    "embed_dims": (16, 16, 32, 32),
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 2, 2),
    "mlp_ratios": (2, 2, 2, 2),
}


def _spec(arch: dict[str, Any], params_m: float | None, paper: str) -> VariantSpec:
    return VariantSpec(
        SVT_PAPER,
        kwargs=arch,
        ref_params_m=params_m,
        ref_source=f"paper Table 2 (hierarchical SVT) and the official README: {paper}",
        test_kwargs=_TINY,
        first_conv="stem.conv.0.conv",
        pool_reduction=32,
        classifier=("head", "aux_head"),
        fx_traceable=False,
        fx_reason="the DTCWT builds its filter matrices per grid size in NumPy and writes the bands in place",
        description="Scattering (DTCWT) mixer in stage 1, attention after it (ImageNet-1k, 224 px).",
    )


# No ref_gmacs: the paper's FLOPs (``PAPER_GMACS``, SpectFormer-H's figures) are below what the official
# architecture costs even when only its Linear and Conv2d modules are counted (S 4.12, B 6.51, L 13.36 GMACs);
# torch's counter, which also counts attention products, the DTCWT filters and the Einstein products, gives
# 5.15, 7.70 and 15.78. SVT-H-L builds 54.59M parameters against the paper's 54.0M (1.1%), which is its count
# without the token-labelling head (54.08M); tests/models/test_svt.py checks both explanations.
PAPER_GMACS = {"svt_h_s": 3.9, "svt_h_b": 6.3, "svt_h_l": 12.7}
VARIANTS = {
    "svt_h_s": _spec(
        {"stem_hidden_dim": 32, "embed_dims": (64, 128, 320, 448), "depths": (3, 4, 6, 3)},
        22.0,
        "SVT-H-S 22.0M params, 3.9 GFLOPs",
    ),
    "svt_h_b": _spec(
        {
            "stem_hidden_dim": 64,
            "embed_dims": (64, 128, 320, 512),
            "depths": (3, 4, 12, 3),
            "num_heads": (2, 4, 10, 16),
        },
        32.8,
        "SVT-H-B 32.8M params, 6.3 GFLOPs",
    ),
    "svt_h_l": _spec(
        {
            "stem_hidden_dim": 64,
            "embed_dims": (96, 192, 384, 512),
            "depths": (3, 6, 18, 3),
            "num_heads": (3, 6, 12, 16),
        },
        None,
        "SVT-H-L 54.0M params, 12.7 GFLOPs (not checked here: 54.0M is the count without the aux head)",
    ),
}

register_variants(_create, VARIANTS, module=__name__)
