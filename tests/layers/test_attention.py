"""attend's explicit branch (values wider than queries/keys) against SDPA itself, and the routing between the two."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vitlab.layers.attention as attention_module
from vitlab.layers import attend


def _qkv(d_qk=2, d_v=6, B=2, h=3, N=5, M=7):
    torch.manual_seed(0)
    q, k = torch.randn(B, h, N, d_qk), torch.randn(B, h, M, d_qk)
    return q, k, torch.randn(B, h, M, d_v)


def _masks():
    bias = torch.randn(1, 3, 5, 7)  # broadcast over the batch
    mask = torch.rand(2, 1, 5, 7) > 0.4
    mask[..., 0] = True
    mask[1, 0, 3] = False  # a row with nothing to attend: SDPA gives 0 there
    return [None, bias, mask]


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_wider_values_equal_sdpa_outputs_and_gradients(which, scale):
    bias = _masks()[which]
    q, k, v = (t.requires_grad_() for t in _qkv())
    if bias is not None and bias.is_floating_point():
        bias.requires_grad_()
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    out = attend(q, k, v, bias, scale=scale)
    assert out.shape == (2, 3, 5, 6)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # SDPA's math path
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    if which == 2:
        assert out[1, 0, 3].abs().max() == 0


def test_dropout_in_the_explicit_branch_is_sdpas():
    q, k, v = _qkv(d_qk=1, d_v=4)
    torch.manual_seed(1)
    out = attend(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    ref = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # same RNG draws, same mask, same 1/(1-p)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, attend(q, k, v))


def test_equal_widths_stay_on_sdpa_and_wider_values_do_not(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return torch.zeros(())

    monkeypatch.setattr(attention_module, "_attend_explicit", spy)
    attend(*_qkv(d_qk=4, d_v=4))
    attend(*_qkv(d_qk=1, d_v=1))
    assert calls == []
    attend(*_qkv(d_qk=1, d_v=4))
    assert calls == [(2, 3, 5, 1)]


def _flops(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("bias", [None, "mask"])
def test_cpu_fused_sdpa_flops_equal_the_math_path(bias):
    q, k, v = _qkv(d_qk=4, d_v=4)  # (2, 3, 5, 4) queries over 7 keys
    mask = _masks()[2] if bias else None
    expected = 2 * 2 * 3 * 5 * 7 * (4 + 4)  # q kᵀ and p v, 2 FLOPs per multiply-accumulate
    assert _flops(F.scaled_dot_product_attention, q, k, v, mask) == expected
    meta = [t.to("meta") for t in (q, k, v)]  # the math path: two bmm, counted by torch itself
    assert _flops(F.scaled_dot_product_attention, *meta, None if mask is None else mask.to("meta")) == expected


def test_cpu_fused_sdpa_backward_flops():
    q, k, v = (t.requires_grad_() for t in _qkv(d_qk=4, d_v=4))
    forward = 2 * 2 * 3 * 5 * 7 * (4 + 4)
    backward = 2 * 2 * 3 * 5 * 7 * (3 * 4 + 2 * 4)  # recomputed q kᵀ, then dp, dv, dq, dk
    assert _flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == forward + backward
