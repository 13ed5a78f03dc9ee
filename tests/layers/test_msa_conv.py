"""MSA-Conv against a naive per-position reference (window gather + softmax), at several grid sizes."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab.layers import MIXERS, MetaBlock, MSAConv, msa_conv_windows


def _naive(m: MSAConv, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Loop over tokens and heads: gather the window taps by index arithmetic, softmax, weighted sum."""
    B, N, C = x.shape
    H, W = grid
    nh, hd, k, d, f = m.num_heads, C // m.num_heads, m.kernel_size, m.dilation, m.pool_size
    q, key, val = m.qkv(x).view(B, H, W, 3, C).unbind(3)  # (B, H, W, C)
    if m.kv_pool is not None:  # the pooled key/value maps of the zero-padded image
        Hp, Wp = math.ceil(H / f) * f, math.ceil(W / f) * f
        kv = torch.zeros(B, 2 * C, Hp, Wp)
        kv[:, :, :H, :W] = torch.cat([key, val], -1).permute(0, 3, 1, 2)
        key, val = m.kv_pool(kv).permute(0, 2, 3, 1).chunk(2, -1)
    h, w = key.shape[1:3]
    # head -> (row, col) roll of its keys/values: four contiguous head groups, up/down/left/right
    s = m.shift_size if m.shift else 0
    rolls = [(s, 0), (-s, 0), (0, s), (0, -s)]
    group = torch.cat([torch.full((len(g),), i) for i, g in enumerate(torch.arange(nh).tensor_split(4))])
    out = torch.zeros(B, H, W, C)
    for b in range(B):
        for y in range(H):
            for xx in range(W):
                for hh in range(nh):
                    dy, dx = rolls[int(group[hh])]
                    sl = slice(hh * hd, (hh + 1) * hd)
                    keys, vals = [], []
                    for i in range(k):
                        for j in range(k):
                            ky, kx = y // f + d * (i - k // 2), xx // f + d * (j - k // 2)
                            inside = 0 <= ky < h and 0 <= kx < w
                            # a rolled map holds at (ky, kx) the source ((ky - dy) mod h, (kx - dx) mod w)
                            sy, sx = (ky - dy) % h, (kx - dx) % w
                            keys.append(key[b, sy, sx, sl] if inside else torch.zeros(hd))
                            vals.append(val[b, sy, sx, sl] if inside else torch.zeros(hd))
                    attn = torch.softmax(torch.stack(keys) @ q[b, y, xx, sl] * hd**-0.5, dim=0)
                    out[b, y, xx, sl] = attn @ torch.stack(vals)
    return m.proj(out.reshape(B, N, C))


CASES = [
    {"dim": 8, "num_heads": 1, "kernel_size": 3},  # the official operator: one map over all channels
    {"dim": 8, "num_heads": 2, "kernel_size": 5, "dilation": 2},  # dilated
    {"dim": 4, "num_heads": 4, "kernel_size": 3},  # depthwise: one map per channel
    {"dim": 12, "num_heads": 6, "kernel_size": 3, "shift": True},  # cyclic shift, 4 uneven head groups
    {"dim": 8, "num_heads": 2, "kernel_size": 3, "pool_size": 2},  # inter-pooling
    {"dim": 8, "num_heads": 4, "kernel_size": 3, "pool_size": 3, "shift": True, "shift_size": 1},
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("grid", [(5, 7), (6, 6), (1, 4)])
def test_msa_conv_matches_naive_reference_at_any_grid(kwargs, grid):
    torch.manual_seed(0)
    m = MSAConv(**kwargs).eval()
    x = torch.randn(2, grid[0] * grid[1], kwargs["dim"])
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid), _naive(m, x, grid), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [CASES[1], CASES[3], CASES[5]])
def test_blocked_halo_attention_is_exact_across_blocks(kwargs):
    # blocks of 2 cells on a 5x7 grid: several blocks, halos crossing block edges, queries padded to whole blocks
    torch.manual_seed(0)
    m = MSAConv(**kwargs).eval()
    m.block_size = 2
    x = torch.randn(2, 35, kwargs["dim"])
    with torch.no_grad():
        torch.testing.assert_close(m(x, (5, 7)), _naive(m, x, (5, 7)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [2, 7])
def test_flop_count_is_the_nominal_window_cost(block_size):
    # inference counts k*k taps per query and head (q.k and attn.v), not the masked halo products
    m = MSAConv(8, num_heads=2, kernel_size=3, pool_size=2).eval()
    m.block_size = block_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(3, 5 * 7, 8), (5, 7))
    H, W = 6, 8  # padded to whole 2x2 cells
    window = 3 * H * W * 9 * 2 * 4 * 2  # B * queries * k*k * (qk + av) * head_dim * heads
    linears = 3 * 35 * (8 * 24 + 8 * 8)
    pool = 3 * 12 * 16 * 4  # depthwise 2x2 conv on 2C = 16 channels at 3x4 cells
    assert counter.get_total_flops() == 2 * (window + linears + pool)


def test_same_weights_run_on_every_size_and_behave_like_a_convolution():
    # no size-dependent state; away from the borders, shifting the input shifts the output (equivariance)
    torch.manual_seed(0)
    m = MSAConv(8, num_heads=2, kernel_size=3).eval()
    x = torch.randn(1, 8, 9, 12)
    with torch.no_grad():
        full = m(x.flatten(2).transpose(1, 2), (9, 12)).transpose(1, 2).view(1, 8, 9, 12)
        crop = x[:, :, 2:, 3:]  # (7, 9) crop: its interior sees the same windows as the full map
        part = m(crop.flatten(2).transpose(1, 2), (7, 9)).transpose(1, 2).view(1, 8, 7, 9)
    torch.testing.assert_close(part[:, :, 1:-1, 1:-1], full[:, :, 3:-1, 4:-1])


def test_windows_layout_and_zero_padding():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    win = msa_conv_windows(x, 3)  # (1, 12, 9, 1)
    assert win.shape == (1, 12, 9, 1)
    assert win[0, 5, :, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # centre (1, 1): its 3x3 neighbourhood
    assert win[0, 0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]  # corner: zero padding
    assert msa_conv_windows(x, 3, dilation=2)[0, 5, :, 0].tolist() == [0, 0, 0, 0, 5, 7, 0, 0, 0]


def test_padding_taps_enter_the_softmax_with_logit_zero():
    # one token, 3x3 window: 8 zero taps + itself, so the output is softmax weight of itself times v
    m = MSAConv(4, kernel_size=3).eval()
    x = torch.randn(1, 1, 4)
    with torch.no_grad():
        q, k, v = m.qkv(x).chunk(3, -1)
        logit = (q * k).sum() / 2.0
        expected = m.proj(torch.exp(logit) / (torch.exp(logit) + 8) * v)
        torch.testing.assert_close(m(x, (1, 1)), expected)


def test_is_a_registered_mixer_and_learns_through_a_block():
    assert MIXERS["msa_conv"] is MSAConv
    block = MetaBlock(8, lambda d: MSAConv(d, 2, 3, pool_size=2, shift=True), mixer_name="attn")
    x = torch.randn(2, 15, 8, requires_grad=True)
    block(x, (3, 5)).sum().backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 6, "num_heads": 4}, "num_heads"),
        ({"dim": 8, "kernel_size": 4}, "kernel_size"),
        ({"dim": 8, "dilation": 0}, "dilation"),
        ({"dim": 8, "pool_size": 0}, "pool_size"),
        ({"dim": 8, "shift_size": -1}, "shift_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSAConv(**kwargs)


def test_bad_inputs_are_named():
    m = MSAConv(8)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 7, 8), (2, 3))
