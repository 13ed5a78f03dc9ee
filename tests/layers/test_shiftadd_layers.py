"""layers.shiftadd: power-of-two shift weights with a straight-through gradient, binary q/k codes, and the binary
linear attention's shapes and gradients."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.layers.shiftadd import BinaryLinearAttention, ShiftLinear, binarize_ste, round_power_of_two


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_shift_weights_are_signed_powers_of_two(bits):
    layer = ShiftLinear(32, 16, weight_bits=bits)
    w = layer.shift_weight().detach()
    nonzero = w[w != 0]
    exps = torch.log2(nonzero.abs())
    torch.testing.assert_close(exps, exps.round(), atol=0, rtol=0)  # exact powers of two
    assert exps.min() >= -(2 ** (bits - 1) - 1)
    assert exps.max() <= 0
    assert torch.equal(torch.sign(w[w != 0]), torch.sign(layer.weight[w != 0]))
    # the forward really uses them
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), atol=0, rtol=0)


def test_rounding_is_to_the_nearest_exponent():
    w = torch.tensor([0.3, -0.7, 0.0, 1e-9, 5.0, -0.126])
    q = round_power_of_two(w, 5)
    # log2 0.3 = -1.74 -> 2^-2; log2 0.7 = -0.51 -> 2^-1; tiny -> smallest shift; > 1 -> clamped to 2^0
    torch.testing.assert_close(q, torch.tensor([0.25, -0.5, 0.0, 2.0**-15, 1.0, -0.125]))


def test_straight_through_gradients():
    w = torch.randn(10, requires_grad=True)
    g = torch.randn(10)
    round_power_of_two(w).backward(g)
    torch.testing.assert_close(w.grad, g)  # identity through the rounding
    x = torch.linspace(-0.45, 1.55, 9, requires_grad=True)
    binarize_ste(x, dims=(0,)).sum().backward()
    torch.testing.assert_close(x.grad, ((x > 0) & (x < 1)).float().detach())  # d clamp(x, 0, 1)
    layer = ShiftLinear(8, 4)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.weight.grad is not None
    assert layer.weight.grad.abs().sum() > 0


def test_from_linear_copies_the_dense_weights():
    dense = nn.Linear(8, 6)
    shift = ShiftLinear.from_linear(dense, weight_bits=4)
    torch.testing.assert_close(shift.weight, dense.weight)
    torch.testing.assert_close(shift.bias, dense.bias)
    torch.testing.assert_close(shift.shift_weight(), round_power_of_two(dense.weight, 4))


def test_binary_attention_codes_and_output():
    attn = BinaryLinearAttention(24, num_heads=3)
    x = torch.randn(2, 20, 24, requires_grad=True)
    y = attn(x, (4, 5))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    q, k = attn.codes
    assert q.shape == k.shape == (2, 3, 20, 8)
    assert set(q.unique().tolist()) <= {0.0, 1.0}
    assert set(k.unique().tolist()) <= {0.0, 1.0}
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0
    assert attn.q.weight.grad.abs().sum() > 0  # the STE reaches the query projection


def test_binary_attention_matches_its_formula():
    attn = BinaryLinearAttention(8, num_heads=2, res_kernel_size=3).eval()
    x = torch.randn(1, 6, 8)
    B, N, C, h, d = 1, 6, 8, 2, 4
    q = F.normalize(attn.q(x).reshape(B, N, h, d).transpose(1, 2), dim=-1)
    k, v = attn.kv(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)
    k = F.normalize(k, dim=-1)
    qb = (q > q.mean((-2, -1), keepdim=True)).float()
    kb = (k > k.mean((-2, -1), keepdim=True)).float()
    out = torch.zeros(B, h, N, d)
    for n in range(N):  # token by token: sum over keys of (q_n . k_m) v_m, an addition of the v rows
        out[:, :, n] = 0.5 * v[:, :, n] + (qb[:, :, n, None, :] * kb).sum(-1).unsqueeze(-1).mul(v).sum(2) / math.pi
    out = F.normalize(out, dim=-1) + attn.dconv(v)
    ref = attn.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="weight_bits"):
        ShiftLinear(4, 4, weight_bits=1)
    with pytest.raises(ValueError, match="divisible"):
        BinaryLinearAttention(10, num_heads=3)
    with pytest.raises(ValueError, match="odd"):
        BinaryLinearAttention(8, num_heads=2, res_kernel_size=4)
