"""layers.temporal: the depthwise temporal convolution (UniFormerV2's local MHRA) and the block wrapper."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from vitlab.layers import MetaBlock
from vitlab.layers.attention import Attention
from vitlab.layers.temporal import DepthwiseTemporalConv, InflatedPatchConv, TemporalConvBlock

B, T, H, W, C = 2, 4, 3, 3, 16


def _tokens(prefix: int = 1) -> torch.Tensor:
    return torch.randn(B * T, prefix + H * W, C, generator=torch.Generator().manual_seed(0))


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    for name, p in module.named_parameters():
        if "temporal" in name or isinstance(module, DepthwiseTemporalConv):
            torch.nn.init.normal_(p, std=0.3)


def _hosts() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [Block(C, num_heads=2), MetaBlock(C, lambda d: Attention(d, num_heads=2), layer_scale=0.5)]


def test_zero_init_is_the_identity():
    conv = DepthwiseTemporalConv(C, T, (H, W))
    x = _tokens()
    assert torch.equal(conv(x), x)
    assert conv.reduce.out_channels == int(C // 1.5)
    assert conv.conv.groups == conv.conv.in_channels == conv.conv.out_channels  # depthwise
    assert conv.conv.kernel_size == (3, 1, 1)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_update_is_local_in_time_and_space_and_leaves_prefix_tokens(prefix):
    conv = DepthwiseTemporalConv(C, T, (H, W), num_prefix_tokens=prefix, kernel_size=3).eval()
    _randomise(conv)
    x = _tokens(prefix)
    y = conv(x)
    assert torch.equal(y[:, :prefix], x[:, :prefix])
    assert not torch.allclose(y[:, prefix:], x[:, prefix:])
    # change one patch token of clip 0, frame 1: only that patch position at frames 0..2 of clip 0 may change
    x2 = x.clone()
    x2[1, prefix + 4] += 1.0
    diff = (conv(x2) - y - (x2 - x)).abs().sum(-1).view(B, T, prefix + H * W)
    changed = {(b, t, n) for b, t, n in (diff > 1e-6).nonzero().tolist()}
    assert changed == {(0, t, prefix + 4) for t in (0, 1, 2)}


@pytest.mark.parametrize("train", [False, True])
def test_update_matches_the_official_conv3d_pipeline(train):
    # reference: BatchNorm3d -> Conv3d 1x1x1 -> depthwise Conv3d (3, 1, 1) -> Conv3d 1x1x1 on (B, C, T, H, W) maps
    conv = DepthwiseTemporalConv(C, T, (H, W), num_prefix_tokens=1)
    _randomise(conv)
    conv.train(train)
    x = _tokens()
    maps = x[:, 1:].reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
    bn = conv.norm
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    h = F.batch_norm(maps, mean, var, bn.weight, bn.bias, training=train, eps=bn.eps)
    h = F.conv3d(F.conv3d(h, conv.reduce.weight, conv.reduce.bias), conv.conv.weight, conv.conv.bias,
                 padding=(1, 0, 0), groups=conv.conv.groups)  # fmt: skip
    ref = F.conv3d(h, conv.expand.weight, conv.expand.bias).permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
    assert torch.allclose(conv(x)[:, 1:] - x[:, 1:], ref, atol=1e-5)
    if train:  # the running statistics move as BatchNorm3d's would
        assert torch.allclose(bn.running_mean, mean, atol=1e-6)


def test_bad_token_shapes_are_named():
    conv = DepthwiseTemporalConv(C, T, (H, W))
    with pytest.raises(ValueError, match="temporal conv expects"):
        conv(torch.randn(B * T + 1, 1 + H * W, C))
    with pytest.raises(ValueError, match="temporal conv expects"):
        conv(torch.randn(B * T, H * W, C))
    with pytest.raises(ValueError, match="odd kernel_size"):
        DepthwiseTemporalConv(C, T, (H, W), kernel_size=2)


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("host", [0, 1], ids=["timm_block", "vitlab_metablock"])
def test_wrapped_block_equals_host_at_init(double, host):
    block = _hosts()[host].eval()
    wrapped = TemporalConvBlock(block, C, T, (H, W), double=double).eval()
    assert wrapped.block is block  # the host is kept whole, its parameters shared
    x = _tokens()
    args = ((H, W),) if host == 1 else ()
    assert torch.allclose(wrapped(x, *args), block(x, *args), atol=1e-6)
    names = {n for n, _ in wrapped.named_parameters()}
    assert {f"block.{n}" for n, _ in block.named_parameters()} <= names
    assert any(n.startswith("temporal2.") for n in names) == double


@pytest.mark.parametrize("host", [0, 1], ids=["timm_block", "vitlab_metablock"])
def test_double_puts_the_second_conv_between_attention_and_mlp(host):
    block = _hosts()[host].eval()
    wrapped = TemporalConvBlock(block, C, T, (H, W), double=True).eval()
    _randomise(wrapped)
    x = _tokens()
    args = ((H, W),) if host == 1 else ()
    # reference: temporal1, then the host with its MLP branch fed by temporal2's output via a second wrapper
    x1 = wrapped.temporal1(x)
    mixer = block.token_mixer if host == 1 else block.attn
    x2 = x1 + block.ls1(mixer(block.norm1(x1), *args))
    x3 = wrapped.temporal2(x2)
    ref = x3 + block.ls2(block.mlp(block.norm2(x3)))
    assert torch.allclose(wrapped(x, *args), ref, atol=1e-5)
    single = TemporalConvBlock(block, C, T, (H, W)).eval()
    single.temporal1.load_state_dict(wrapped.temporal1.state_dict())
    assert not torch.allclose(single(x, *args), ref, atol=1e-3)  # the second conv matters


def test_gradients_reach_the_zero_initialised_branch():
    wrapped = TemporalConvBlock(_hosts()[0], C, T, (H, W), double=True).train()
    wrapped(_tokens()).square().mean().backward()
    assert wrapped.temporal1.expand.weight.grad.abs().sum() > 0
    assert wrapped.temporal2.expand.weight.grad.abs().sum() > 0


def test_double_refuses_a_block_without_branches():
    with pytest.raises(ValueError, match="lacks"):
        TemporalConvBlock(torch.nn.Linear(C, C), C, T, (H, W), double=True)
    TemporalConvBlock(torch.nn.Identity(), C, T, (H, W))  # single wraps anything that maps tokens to tokens


def test_inflated_patch_conv_starts_as_the_image_conv_and_mixes_neighbouring_frames():
    torch.manual_seed(0)
    conv2d = torch.nn.Conv2d(2, 8, 4, 4)
    inflated = InflatedPatchConv(conv2d, T, kernel_size=3)
    frames = torch.randn(B * T, 2, 12, 12)
    assert inflated.weight.shape == (8, 2, 3, 4, 4)
    assert torch.allclose(inflated(frames), conv2d(frames), atol=1e-6)
    with torch.no_grad():
        inflated.weight.normal_()
    y = inflated(frames)
    moved = frames.clone()
    moved[1] += 1.0  # clip 0, frame 1: frames 0..2 of clip 0 change, nothing else
    changed = (inflated(moved) - y).abs().flatten(1).amax(1) > 1e-5
    assert changed.tolist() == [True, True, True] + [False] * (B * T - 3)


def test_inflated_patch_conv_refuses_what_it_cannot_inflate():
    with pytest.raises(ValueError, match="plain Conv2d"):
        InflatedPatchConv(torch.nn.Linear(4, 4), T)
    with pytest.raises(ValueError, match="odd temporal kernel"):
        InflatedPatchConv(torch.nn.Conv2d(1, 4, 2, 2), T, kernel_size=2)
    with pytest.raises(ValueError, match="expects"):
        InflatedPatchConv(torch.nn.Conv2d(1, 4, 2, 2), T)(torch.randn(T + 1, 1, 4, 4))
