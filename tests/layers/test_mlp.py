"""ConvFfn against the official 1x1-conv formulation, its use inside MetaBlock, and its errors (its fused CPU path:
test_fast_paths.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.layers import ConvFfn, MetaBlock


def _conv_reference(m: ConvFfn, x_map: torch.Tensor) -> torch.Tensor:
    # MSVMamba's ConvFFN on a (B, C, H, W) map: 1x1 conv, x + dwconv(x), GELU, 1x1 conv
    x = F.conv2d(x_map, m.fc1.weight[:, :, None, None], m.fc1.bias)
    y = m.dwconv(x)
    x = F.gelu(x + y if m.dw_residual else y)
    return F.conv2d(x, m.fc2.weight[:, :, None, None], m.fc2.bias)


@pytest.mark.parametrize("dw_residual", [True, False])
def test_conv_ffn_equals_conv_formulation(dw_residual):
    m = ConvFfn(8, 16, dw_residual=dw_residual)
    x_map = torch.randn(2, 8, 5, 3)
    tokens = x_map.flatten(2).transpose(1, 2)
    out = m(tokens, (5, 3))
    expected = _conv_reference(m, x_map).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_conv_ffn_mixes_neighbours_only_within_kernel():
    # a change at one token reaches its 3x3 neighbourhood and nothing further
    m = ConvFfn(4, 8).eval()
    x = torch.randn(1, 6 * 6, 4)
    y = x.clone()
    y[0, 2 * 6 + 2] += 1.0
    diff = (m(x, (6, 6)) - m(y, (6, 6))).abs().sum(-1).view(6, 6) > 0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[1:4, 1:4] = True
    assert torch.equal(diff, expected)


class _ZeroMixer(nn.Module):
    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        return torch.zeros_like(x)  # isolates the FFN branch of the block


def test_metablock_passes_the_grid_to_conv_ffn():
    block = MetaBlock(8, mixer=lambda d: _ZeroMixer(), mlp=ConvFfn, mlp_ratio=2.0).eval()
    x = torch.randn(2, 12, 8)
    expected = x + block.mlp(block.norm2(x), (3, 4))
    torch.testing.assert_close(block(x, (3, 4)), expected)
    assert block.mlp.fc1.out_features == 16


def test_conv_ffn_errors():
    m = ConvFfn(8, 16)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="grid tokens do not fill grid"):
        m(torch.randn(1, 5, 8), (2, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        ConvFfn(8, 16, kernel_size=4)
    with pytest.raises(ValueError, match="in_features"):
        ConvFfn(0)
