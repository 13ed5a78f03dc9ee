"""Token mixers by name: ``MIXERS[name]`` is a class ``Mixer(dim, **paper_specific)`` with ``forward(x, grid)``.

Every entry obeys the mixer contract of ``layers/block.py`` (``(B, N, C)`` in and out, ``grid`` for the
mixers that need the 2-D layout), so any ``MetaBlock`` model can swap one for another and
``benchmarks/scaling.py`` can time them side by side. One line per mixer, so parallel additions do not collide.
"""

from __future__ import annotations

import torch.nn as nn

from .attention import Attention
from .hyena import HyenaMixer
from .maf import MultiScaleAttentionFusion
from .msa_conv import MSAConv
from .multiscale_scan import SelectiveScan2d
from .polyline_mask import PolylinePathAttention
from .retention import Retention
from .scattering import ScatteringMixer
from .spectral import SpectralGating
from .strip_attention import StripAttention
from .window_attention import WindowAttention

__all__ = ["MIXERS", "get_mixer"]

MIXERS: dict[str, type[nn.Module]] = {}
MIXERS["attention"] = Attention
MIXERS["hyena"] = HyenaMixer
MIXERS["maf"] = MultiScaleAttentionFusion
MIXERS["msa_conv"] = MSAConv
MIXERS["polyline_attention"] = PolylinePathAttention
MIXERS["retention"] = Retention
MIXERS["scattering"] = ScatteringMixer
MIXERS["selective_scan_2d"] = SelectiveScan2d
MIXERS["spectral"] = SpectralGating
MIXERS["strip_attention"] = StripAttention
MIXERS["window_attention"] = WindowAttention


def get_mixer(name: str) -> type[nn.Module]:
    """The mixer class registered as ``name`` (error listing the known names)."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {sorted(MIXERS)}")
    return MIXERS[name]
