"""layers/embed.py: ConvEmbed's output grid follows the conv arithmetic and the norm runs over channels."""

import pytest
import torch

from vitlab.layers import ConvEmbed


@pytest.mark.parametrize(("size", "patch", "stride", "padding"), [(32, 7, 4, 2), (57, 3, 2, 1), (16, 4, 4, 0)])
def test_grid_follows_conv_arithmetic(size, patch, stride, padding):
    embed = ConvEmbed(3, 8, patch, stride, padding)
    out = embed(torch.randn(2, 3, size, size + 5))
    expect = [(s + 2 * padding - patch) // stride + 1 for s in (size, size + 5)]
    assert out.shape == (2, *expect, 8)


def test_norm_runs_over_channels_and_formats_agree():
    nhwc = ConvEmbed(1, 16, 7, 4, 2)
    nchw = ConvEmbed(1, 16, 7, 4, 2, output_fmt="NCHW")
    nchw.load_state_dict(nhwc.state_dict())
    x = torch.randn(2, 1, 40, 40)
    y = nhwc(x)
    # freshly built LayerNorm: every position is normalised across its 16 channels
    assert torch.allclose(y.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert torch.equal(nchw(x), y.permute(0, 3, 1, 2))


def test_without_norm_is_the_plain_conv():
    embed = ConvEmbed(3, 8, 3, 2, 1, norm_layer=None, output_fmt="NCHW")
    x = torch.randn(1, 3, 20, 20)
    assert torch.equal(embed(x), embed.proj(x))


def test_bad_output_fmt_is_named():
    with pytest.raises(ValueError, match="output_fmt"):
        ConvEmbed(output_fmt="NLC")
