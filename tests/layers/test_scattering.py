"""layers/dtcwt.py and layers/scattering.py: the DTCWT against pytorch_wavelets and perfect reconstruction;
the mixer against a naive complex-arithmetic reference."""

import importlib.resources
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab.layers import MIXERS, ScatteringMixer, dtcwt2d, idtcwt2d

SHAPES = [(2, 3, 8, 10), (1, 2, 7, 9), (1, 1, 4, 4), (1, 1, 3, 2)]  # odd sizes and sizes below the 19 taps


def _pytorch_wavelets(monkeypatch):
    # pytorch_wavelets 1.3 reads its filter tables through pkg_resources, which setuptools>=81 no longer ships
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_stream = lambda pkg, name: importlib.resources.files(pkg).joinpath(name).open("rb")
            monkeypatch.setitem(sys.modules, "pkg_resources", shim)
    return pytest.importorskip("pytorch_wavelets")


@pytest.mark.parametrize("shape", SHAPES)
def test_dtcwt_matches_pytorch_wavelets(monkeypatch, shape):
    pw = _pytorch_wavelets(monkeypatch)
    x = torch.randn(*shape, dtype=torch.float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its filter buffers are made in the default dtype
    try:
        xfm = pw.DTCWTForward(J=1, biort="near_sym_b", qshift="qshift_b")
        ifm = pw.DTCWTInverse(biort="near_sym_b", qshift="qshift_b")
    finally:
        torch.set_default_dtype(default)
    ref_low, ref_high = xfm(x)
    low, high = dtcwt2d(x)
    assert high.shape == ref_high[0].shape
    torch.testing.assert_close(low, ref_low, rtol=0, atol=1e-12)
    torch.testing.assert_close(high, ref_high[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(idtcwt2d(low, high), ifm((ref_low, ref_high)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_perfect_reconstruction(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    low, high = dtcwt2d(x)
    assert low.shape[-2:] == (shape[2] + shape[2] % 2, shape[3] + shape[3] % 2)
    torch.testing.assert_close(idtcwt2d(low, high)[..., : shape[2], : shape[3]], x, rtol=0, atol=1e-12)


def test_constant_image_has_no_high_frequencies():
    # lowpass taps sum to 1 and highpass taps to 0: a flat image is all low band
    x = torch.full((1, 2, 6, 8), 3.0, dtype=torch.float64)
    low, high = dtcwt2d(x)
    torch.testing.assert_close(low, x)
    assert high.abs().max() < 1e-12


def test_oriented_bands_follow_edge_direction():
    # a horizontal edge (varies along H only) excites the 15/165 degree bands, not the 75/105 ones
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[..., 8:, :] = 1.0
    energy = dtcwt2d(x)[1].pow(2).sum(dim=(0, 1, 3, 4, 5))
    assert energy[0] > 100 * energy[2]
    assert energy[5] > 100 * energy[3]


def _naive_mixer(mixer: ScatteringMixer, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The mixer with complex tensors and explicit per-block matrix products (no einsum, no real/imag split)."""
    B, _, C = x.shape
    low, high = dtcwt2d(x.transpose(1, 2).reshape(B, C, *grid))
    low = low * mixer.weight_low
    z = torch.complex(high[..., 0], high[..., 1]).permute(0, 2, 3, 4, 1)  # (B, 6, h, w, C)

    def layer(z, w, b, relu, per_row=False):
        # channel blocks of the last axis, or (per_row) one matrix per row of the (h, w) grid
        blocks = z.unbind(-2) if per_row else z.split(C // mixer.num_blocks, dim=-1)
        out = [blk @ torch.complex(w[0, i], w[1, i]) + torch.complex(b[0, i], b[1, i]) for i, blk in enumerate(blocks)]
        out = torch.stack(out, -2) if per_row else torch.cat(out, -1)
        return torch.complex(out.real.relu(), out.imag.relu()) if relu else out

    z = layer(layer(z, mixer.weight1, mixer.bias1, True), mixer.weight2, mixer.bias2, False)
    if mixer.token_mixing:
        z = z.transpose(-1, -3).transpose(-1, -2)  # (B, 6, C, h, w)
        z = layer(z, mixer.token_weight1, mixer.token_bias1, True, per_row=True)
        z = layer(z, mixer.token_weight2, mixer.token_bias2, False, per_row=True)
        z = z.transpose(-1, -2).transpose(-1, -3)
    high = torch.stack([z.real, z.imag], -1).permute(0, 4, 1, 2, 3, 5)
    return idtcwt2d(low, high).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("token_mixing", [False, True])
def test_mixer_matches_naive_complex_reference(token_mixing):
    mixer = ScatteringMixer(16, grid_size=(6, 8), num_blocks=4, token_mixing=token_mixing).double()
    with torch.no_grad():  # larger weights than the 0.02 init so the ReLUs and products matter
        for p in mixer.parameters():
            p.normal_()
    x = torch.randn(2, 48, 16, dtype=torch.float64)
    torch.testing.assert_close(mixer(x, (6, 8)), _naive_mixer(mixer, x, (6, 8)))


def test_mixer_other_grids_and_gradients():
    mixer = ScatteringMixer(8, grid_size=8, num_blocks=2)
    for grid in [(8, 8), (5, 7), (12, 4)]:
        x = torch.randn(2, grid[0] * grid[1], 8, requires_grad=True)
        out = mixer(x, grid)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


def test_flops_count_the_filter_taps_not_the_dense_products():
    # each of the 2 analysis filters along W, then the 4 along H, and the inverse's 2 + 1 two-band sums, are
    # 19-tap filters: 6 * 19 MACs per sample forward and 6 * 19 inverse, whatever the size of the dense matrices
    x = torch.randn(2, 3, 12, 20)
    for fn, args in ((dtcwt2d, (x,)), (idtcwt2d, dtcwt2d(x))):
        with FlopCounterMode(display=False) as counter:
            fn(*args)
        assert counter.get_total_flops() == 2 * 6 * 19 * x.numel()


def test_gradients_through_the_transform_are_exact():
    # the filter products are a custom op with their own backward (the transposed matrices): check it numerically
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: idtcwt2d(*dtcwt2d(t)), (x,))
    assert torch.autograd.gradcheck(lambda t: dtcwt2d(t)[1], (x,))


def test_registered_as_mixer():
    assert MIXERS["scattering"] is ScatteringMixer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_blocks": 3}, "num_blocks"), ({"grid_size": 0}, "grid_size"), ({"grid_size": (4, 4, 4)}, "grid_size")],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScatteringMixer(8, **kwargs)


def test_bad_inputs_are_named():
    mixer = ScatteringMixer(8, grid_size=4, num_blocks=2, token_mixing=True)
    with pytest.raises(ValueError, match="grid"):
        mixer(torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="tokens"):
        mixer(torch.randn(1, 15, 8), (4, 4))
    with pytest.raises(ValueError, match="token mixing"):
        mixer(torch.randn(1, 36, 8), (6, 6))
    with pytest.raises(ValueError, match="highpass"):
        idtcwt2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 6, 3, 2, 2))
    with pytest.raises(ValueError, match="x must be"):
        dtcwt2d(torch.randn(4, 4))
