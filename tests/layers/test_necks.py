"""Necks: declared strides and widths hold at odd map sizes, gradients reach every parameter, bad input is named."""

import pytest
import torch

from vitlab.layers import FeaturePyramidNeck, SimpleFeaturePyramid


def _all_params_get_grad(module: torch.nn.Module, outputs: list[torch.Tensor]) -> None:
    sum(o.sum() for o in outputs).backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize(("height", "width"), [(16, 16), (7, 9), (5, 3)])
def test_simple_feature_pyramid_default_strides(height, width):
    neck = SimpleFeaturePyramid(in_channels=32, in_stride=16, out_channels=24)
    assert neck.out_strides == (4, 8, 16, 32)
    assert neck.out_channels == 24
    x = torch.randn(2, 32, height, width, requires_grad=True)
    outs = neck([x])
    # up: exact multiples; down: ceil division (ceil-mode pooling covers every input position)
    expected = [(4 * height, 4 * width), (2 * height, 2 * width), (height, width), (-(-height // 2), -(-width // 2))]
    assert [tuple(o.shape[-2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 24) for o in outs)
    _all_params_get_grad(neck, outs)
    assert x.grad is not None


def test_simple_feature_pyramid_chosen_strides_and_one_map_per_level():
    neck = SimpleFeaturePyramid(in_channels=8, in_stride=4, out_channels=16, out_strides=(4, 8, 16, 32))
    assert neck.out_strides == (4, 8, 16, 32)
    maps = [torch.randn(1, 8, 9, 9) for _ in range(4)]
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(1, 16, 9, 9), (1, 16, 5, 5), (1, 16, 3, 3), (1, 16, 2, 2)]
    # a level sees only its own map
    maps[0] = maps[0] + 1.0
    assert torch.equal(neck(maps)[1], outs[1])


def test_simple_feature_pyramid_fractional_strides():
    neck = SimpleFeaturePyramid(in_channels=8, in_stride=14, out_channels=8)
    assert neck.out_strides == (3.5, 7, 14, 28)


@pytest.mark.parametrize("strides", [(3,), (0,), ()])
def test_simple_feature_pyramid_refuses_strides_off_the_power_of_two_ladder(strides):
    with pytest.raises(ValueError, match="out_strides"):
        SimpleFeaturePyramid(in_channels=8, in_stride=4, out_strides=strides)


def test_feature_pyramid_neck_odd_sizes():
    channels, strides = (8, 16, 24, 32), (4, 8, 16, 32)
    neck = FeaturePyramidNeck(channels, strides, out_channels=12)
    assert neck.out_strides == strides
    assert neck.out_channels == 12
    # a 30x27 image through stride-2 stages with padding: 8x7, 4x4, 2x2, 1x1
    sizes = [(8, 7), (4, 4), (2, 2), (1, 1)]
    maps = [torch.randn(2, c, h, w, requires_grad=True) for c, (h, w) in zip(channels, sizes, strict=True)]
    outs = neck(maps)
    assert [tuple(o.shape) for o in outs] == [(2, 12, h, w) for h, w in sizes]
    _all_params_get_grad(neck, outs)
    assert all(m.grad is not None for m in maps)


def test_feature_pyramid_neck_top_down_reaches_fine_levels():
    neck = FeaturePyramidNeck((4, 4), (8, 16), out_channels=4).eval()
    fine, coarse = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3)
    before = neck([fine, coarse])
    after = neck([fine, coarse + 1.0])
    assert not torch.equal(before[0], after[0])  # the coarse map flows into the fine level
    assert torch.equal(neck([fine + 1.0, coarse])[1], before[1])  # but not the other way


def test_necks_name_bad_input():
    neck = FeaturePyramidNeck((8, 16), (4, 8), out_channels=8)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        neck([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"feature map 1 must be \(B, 16, H, W\)"):
        neck([torch.randn(1, 8, 4, 4), torch.randn(1, 15, 2, 2)])
    with pytest.raises(ValueError, match="fine to coarse"):
        FeaturePyramidNeck((8, 16), (8, 4))
    sfp = SimpleFeaturePyramid(in_channels=8, in_stride=4, out_strides=(4, 8))
    with pytest.raises(ValueError, match=r"feature map 0 must be \(B, 8, H, W\)"):
        sfp([torch.randn(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        sfp([torch.randn(1, 8, 4, 4)] * 3)
