"""Hyena N-D: the FFT long convolution against direct convolution, the mixer against a naive reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vitlab.layers import MIXERS
from vitlab.layers.hyena import HyenaFilter, HyenaMixer, fft_long_conv, filter_spectrum, spectral_long_conv

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _direct_causal_conv(u, k):
    """Per-channel causal convolution through torch's conv (cross-correlation with the flipped filter)."""
    ndim = k.ndim - 1
    pad = []
    for s in reversed(k.shape[1:]):
        pad += [s - 1, 0]  # left-pad every axis by L - 1: output p sees inputs q <= p
    weight = k.flip(list(range(1, ndim + 1))).unsqueeze(1)  # (C, 1, *S)
    return _CONV[ndim](F.pad(u, pad), weight, groups=k.shape[0])


# batch 3: odd, so one real image has no partner in the complex packing; 11 pads to 24, not 2 * 11
@pytest.mark.parametrize("sizes", [(7,), (11,), (4, 5), (2, 11), (3, 4, 2)])
def test_fft_long_conv_equals_direct_convolution(sizes):
    torch.manual_seed(0)
    u, k = torch.randn(3, 3, *sizes, dtype=torch.float64), torch.randn(3, *sizes, dtype=torch.float64)
    y = fft_long_conv(u.float(), k.float(), ndim=len(sizes))
    torch.testing.assert_close(y.double(), _direct_causal_conv(u, k), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
def test_conjugate_spectrum_convolves_anti_causally(batch):
    torch.manual_seed(0)
    u, k = torch.randn(batch, 3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    flipped = _direct_causal_conv(u.flip(-2, -1), k).flip(-2, -1)  # y[p] = sum_{q >= p} k[q - p] u[q]
    k_f = filter_spectrum(k.float()).conj()
    for grad in (False, True):  # without autograd the spectra are multiplied in place
        with torch.set_grad_enabled(grad):
            y = spectral_long_conv(u.float(), k_f)
        torch.testing.assert_close(y.double(), flipped, atol=1e-4, rtol=1e-4)


def test_packed_pairs_count_the_flops_of_the_real_ffts_they_replace():
    u, k = torch.randn(2, 3, 5, 6), torch.randn(3, 5, 6)
    k_f, k_half = filter_spectrum(k), torch.fft.rfftn(k, s=(10, 12))
    with FlopCounterMode(display=False) as ours:
        spectral_long_conv(u, k_f)
    with FlopCounterMode(display=False) as real:  # the real-FFT form: rfftn of each image, irfftn of each product
        torch.fft.irfftn(torch.fft.rfftn(u, s=(10, 12)) * k_half, s=(10, 12))
    assert ours.get_total_flops() == real.get_total_flops() > 0


def test_spectral_long_conv_rejects_a_spectrum_too_short_for_linear_convolution():
    u = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="L >= 2 S - 1"):
        spectral_long_conv(u, filter_spectrum(torch.randn(3, 3, 3)))  # 6 < 2 * 4 - 1
    with pytest.raises(ValueError, match="k_f"):
        spectral_long_conv(u[0], filter_spectrum(torch.randn(3, 4, 4)))


def test_fft_long_conv_rejects_mismatched_filter():
    with pytest.raises(ValueError, match="filter shape"):
        fft_long_conv(torch.randn(1, 3, 4, 4), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="axes"):
        fft_long_conv(torch.randn(1, 3, 4, 4), torch.randn(3, 4, 4), ndim=3)


@pytest.mark.parametrize("sizes", [(6,), (3, 5), (2, 3, 4)])
def test_filter_shape_and_window(sizes):
    filt = HyenaFilter(8, ndim=len(sizes), filter_order=16)
    h = filt(sizes)
    assert h.shape == (8, *sizes)
    # the window reaches `target` (1e-2) at slow_decay_pct (1.5) .. fast_decay_pct (0.3) of each axis
    torch.testing.assert_close(filt.decay_rates[0], torch.tensor(math.log(100) / 1.5))
    torch.testing.assert_close(filt.decay_rates[-1], torch.tensor(math.log(100) / 0.3))


def test_filter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="emb_dim"):
        HyenaFilter(8, emb_dim=4)
    with pytest.raises(ValueError, match="sizes"):
        HyenaFilter(8, ndim=2)((4,))


def _naive_mixer(m, x, grid):
    """The mixer recomputed from its parameters with an explicit (anti-)causal double sum per position."""
    B, _, C = x.shape
    H, W = grid
    u = m.short_conv(m.in_proj(x).transpose(1, 2).reshape(B, -1, H, W))
    parts = u.split(C, dim=1)
    gates, v = parts[:-1], parts[-1]
    k = m.filter((H, W)).view(m.order - 1, C, H, W) / math.sqrt(4 * H * W)
    for i, gate in enumerate(reversed(gates[1:])):
        v = v * gate
        y = torch.zeros_like(v)
        for p in range(H):
            for q in range(W):
                for a in range(H):
                    for b in range(W):
                        di, dj = (a - p, b - q) if m.reverse else (p - a, q - b)
                        if di >= 0 and dj >= 0:
                            y[..., p, q] += k[i][:, di, dj] * v[..., a, b]
        v = y + v * m.skip[i].view(1, C, 1, 1)
    return m.out_proj((v * gates[0]).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("order", [2, 3])
def test_mixer_matches_naive_reference(reverse, order):
    torch.manual_seed(0)
    m = HyenaMixer(8, order=order, filter_order=16, reverse=reverse).eval()
    grid = (3, 4)
    x = torch.randn(3, 12, 8)  # odd batch: two images share one complex FFT, the third has none
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid), _naive_mixer(m, x, grid), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_mixer_is_causal_in_its_direction(reverse):
    # output (2, 2) sees inputs up to one step ahead (the 3x3 short conv) and nothing beyond in its direction
    torch.manual_seed(0)
    m = HyenaMixer(8, filter_order=16, reverse=reverse)
    x = torch.randn(1, 36, 8, requires_grad=True)
    m(x, (6, 6)).view(1, 6, 6, 8)[0, 2, 2].sum().backward()
    g = x.grad.view(6, 6, 8).abs().sum(-1)
    far = g[4:, :].sum() + g[:, 4:].sum() if not reverse else g[:1, :].sum() + g[:, :1].sum()
    near = g[:2, :2].sum() if not reverse else g[3:, 3:].sum()
    assert near > 0
    assert far < 1e-6 * near  # zero up to the FFT's float32 round-off


def test_mixer_any_grid_shape_grad_and_registry():
    assert MIXERS["hyena"] is HyenaMixer
    m = HyenaMixer(16, filter_order=8)
    for grid in [(2, 2), (3, 5), (7, 4)]:
        x = torch.randn(2, grid[0] * grid[1], 16, requires_grad=True)
        y = m(x, grid)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


def test_mixer_errors_name_the_argument():
    m = HyenaMixer(8, filter_order=8)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 5, 8), (2, 2))
    with pytest.raises(ValueError, match="order"):
        HyenaMixer(8, order=1)


def _filter_calls(m):
    calls = []
    m.filter.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_filter_spectra_are_cached_without_autograd_only():
    torch.manual_seed(0)
    m = HyenaMixer(8, filter_order=8).eval()
    calls, x = _filter_calls(m), torch.randn(2, 12, 8)
    reference = m(x, (3, 4))  # autograd on: computed, not cached
    assert len(calls) == 1
    assert m._spectrum_cache is None
    with torch.no_grad():
        first, second = m(x, (3, 4)), m(x, (3, 4))
        assert len(calls) == 2  # the second no-grad forward reused the spectra
        m(torch.randn(2, 20, 8), (4, 5))  # another grid: recomputed
        assert len(calls) == 3
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    m(x, (3, 4)).sum().backward()  # autograd on again: recomputed, gradients reach the filter
    assert len(calls) == 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.filter.parameters())
    assert m.skip.grad.abs().sum() > 0


def _changes(m, name):
    """Ways a parameter changes after the spectra were cached."""
    if name == "in_place":
        with torch.no_grad():
            m.filter.proj_out.weight.mul_(2.0)
    elif name == "optimizer":
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    elif name == "load_state_dict":
        m.load_state_dict(HyenaMixer(8, filter_order=8).state_dict())
    elif name == "data_then_eval":  # writes through .data bypass version counters; eval() drops the cache
        m.skip.data.add_(1.0)
        m.eval()
    elif name == "reverse":
        m.reverse = not m.reverse


@pytest.mark.parametrize("change", ["in_place", "optimizer", "load_state_dict", "data_then_eval", "reverse"])
def test_changed_parameters_invalidate_the_cache(change):
    torch.manual_seed(0)
    m = HyenaMixer(8, filter_order=8).eval()
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        before = m(x, (3, 4))
    _changes(m, change)
    with torch.no_grad():
        after = m(x, (3, 4))
    m.clear_cache()
    fresh = m(x, (3, 4))  # autograd on: never cached
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh)


def test_cache_adds_no_state():
    m = HyenaMixer(8, filter_order=8).eval()
    keys = set(m.state_dict())
    with torch.no_grad():
        m(torch.randn(1, 12, 8), (3, 4))
    assert m._spectrum_cache is not None
    assert set(m.state_dict()) == keys
    assert "_spectrum_cache" not in dict(m.named_buffers())


def test_frozen_mixer_gives_input_gradients_after_cached_forwards():
    m = HyenaMixer(8, filter_order=8).eval().requires_grad_(False)
    x = torch.randn(1, 12, 8, requires_grad=True)
    with torch.inference_mode():
        m(x.detach(), (3, 4))
    m(x, (3, 4)).sum().backward()  # frozen filters may be cached with autograd on, but not inference tensors
    assert x.grad.abs().sum() > 0
