"""S2AFormer: the HPB's four residual equations, strides 4-32, and the variant table's closed-form counts."""

import math

import pytest
import torch

import vitlab
from vitlab.bench import count_flops_meta, count_params_meta
from vitlab.layers import StripAttention
from vitlab.models.s2aformer import VARIANTS, HybridPerceptionBlock

_TINY = VARIANTS["s2aformer_tiny"].test_kwargs


def _closed_form(embed_dims, depths, num_heads, sr_ratios=(8, 4, 2, 1), stem_dim=None, img=224, classes=1000):
    """(params, MACs) by hand: convs, linears, norms, attention matmuls (what torch's counter counts)."""
    s0 = stem_dim or embed_dims[0] // 2
    params = 9 * 3 * s0 + 2 * s0 + 2 * (9 * s0 * s0 + 2 * s0)  # three bias-free convs + BatchNorms
    side = math.ceil(img / 2)
    macs = (9 * 3 * s0 + 2 * 9 * s0 * s0) * side * side
    prev = s0
    for C, L, h, s in zip(embed_dims, depths, num_heads, sr_ratios, strict=True):
        side = math.ceil(side / 2)
        N, Nr, d, r = side * side, math.ceil(side / s) ** 2, h, 4 * C
        params += 9 * prev * C + C + 2 * C  # patch embedding conv + LayerNorm
        macs += 9 * prev * C * N
        block_p = 10 * C + 3 * 2 * C  # depthwise conv, three norms
        block_p += (C * d + d) + (C * (d + C) + d + C) + (C * C + C)  # q, kv, proj
        block_p += (s * s * C + C + 2 * C) if s > 1 else 0  # reduction conv + its norm
        block_p += 2 * (C * C + C) + 10 * C + (C * r + r + r * C + C)  # LIM, MLP
        block_m = 9 * C * N + N * C * d + Nr * C * (d + C) + N * Nr * (d + C) + N * C * C
        block_m += (s * s * C * Nr if s > 1 else 0) + 2 * N * C * C + 9 * C * N + 2 * N * C * r
        params, macs, prev = params + L * block_p, macs + L * block_m, C
    params += 2 * prev + prev * classes + classes
    macs += prev * classes
    return params, macs


def test_closed_form_counts_the_built_model_exactly():
    kwargs = VARIANTS["s2aformer_tiny"].kwargs
    params, macs = _closed_form(**kwargs)
    assert count_params_meta("s2aformer_tiny") == params
    assert count_flops_meta("s2aformer_tiny") == 2 * macs
    # 200 px: odd grids 25 and 13 exercise the zero-padded K/V reduction
    assert count_flops_meta("s2aformer_tiny", img_size=200) == 2 * _closed_form(**kwargs, img=200)[1]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_table_figures_are_the_closed_form(name):
    # the parity test (tests/models/test_parity.py) checks the built model against these same figures
    spec = VARIANTS[name]
    params, macs = _closed_form(**spec.kwargs)
    assert spec.ref_params_m == pytest.approx(params / 1e6, abs=0.005)
    assert spec.ref_gmacs == pytest.approx(macs / 1e9, abs=0.005)
    assert spec.ref_source.startswith("reconstructed:")


def test_hybrid_perception_block_follows_the_four_equations():
    torch.manual_seed(0)
    blk = HybridPerceptionBlock(16, lambda d: StripAttention(d, 2, sr_ratio=2)).eval()
    grid, x = (4, 6), torch.randn(2, 24, 16)

    def as_map(t):
        return t.transpose(1, 2).reshape(2, 16, *grid)

    f_conv = x + blk.local(as_map(x)).flatten(2).transpose(1, 2)
    f_ssa = f_conv + blk.attn(blk.norm1(f_conv), grid)
    f_lim = f_ssa + blk.lim(blk.norm2(f_ssa), grid)
    f_mlp = f_lim + blk.mlp(blk.norm3(f_lim))
    torch.testing.assert_close(blk(x, grid), f_mlp)


def test_strides_and_intermediates_at_odd_size():
    model = vitlab.create_model("s2aformer_tiny", **{**_TINY, "num_classes": 3}).eval()
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        final, feats = model.forward_intermediates(torch.randn(1, 3, 50, 38))
    assert [tuple(f.shape[2:]) for f in feats] == [(13, 10), (7, 5), (4, 3), (2, 2)]
    assert [f.shape[1] for f in feats] == list(_TINY["embed_dims"])
    assert final.shape == (1, 32, 2, 2)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="num_heads"):
        vitlab.create_model("s2aformer_tiny", **{**_TINY, "num_heads": (1, 2)})
    with pytest.raises(ValueError, match="depths"):
        vitlab.create_model("s2aformer_tiny", **{**_TINY, "depths": (1, 0, 1, 1)})
    with pytest.raises(ValueError, match="mlp_ratio"):
        HybridPerceptionBlock(8, lambda d: StripAttention(d), mlp_ratio=0)
