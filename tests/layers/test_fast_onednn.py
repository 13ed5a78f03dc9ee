"""layers/fast/onednn.py: the fused oneDNN ops against the plain ops, and when they may run. The fast paths built
on them are compared with the readable forwards in test_fast_paths.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vitlab.bench.memory import peak_forward_bytes
from vitlab.layers.fast import onednn
from vitlab.layers.fast.onednn import fused_conv, fused_inference_ok, fused_linear

pytestmark = pytest.mark.skipif(not onednn._fused_ops_work(), reason="this torch has no usable oneDNN fused ops")


def test_fused_linear_and_conv_equal_the_plain_ops():
    torch.manual_seed(0)
    fc, x, r = nn.Linear(6, 5), torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    conv, m = nn.Conv2d(4, 4, 3, 1, 1, groups=4), torch.randn(2, 4, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear(x, fc), fc(x))
        torch.testing.assert_close(fused_linear(x, fc, gelu=True), F.gelu(fc(x)))
        torch.testing.assert_close(fused_linear(x, fc, residual=r), fc(x) + r)
        torch.testing.assert_close(fused_conv(m, conv, gelu=True), F.gelu(conv(m)))
        w2 = conv.weight * 2
        torch.testing.assert_close(fused_conv(m, conv, weight=w2), F.conv2d(m, w2, conv.bias, 1, 1, 1, 4))


def test_fused_path_only_for_cpu_float32_inference_without_autograd():
    module, x = nn.Linear(2, 2).eval(), torch.randn(1, 2)
    assert not fused_inference_ok(x, module)  # autograd on
    with torch.no_grad():
        assert fused_inference_ok(x, module)
        assert not fused_inference_ok(x.double(), module)
        assert not fused_inference_ok(x, module.train())
        module.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_inference_ok(x, module)
        assert torch.func.vmap(lambda t: torch.tensor(fused_inference_ok(t, module)))(x.expand(3, 1, 2)).sum() == 0
        with FlopCounterMode(display=False):
            assert not fused_inference_ok(x, module)
        watched = []
        peak_forward_bytes(lambda: watched.append(fused_inference_ok(x, module)))  # the memory meter only watches
        assert watched == [True]


def test_probe_leaves_the_global_rng_alone():
    onednn._fused_ops_work.cache_clear()
    state = torch.get_rng_state()
    assert onednn._fused_ops_work()
    assert torch.equal(torch.get_rng_state(), state)


def test_plus_identity_folds_the_residual_into_a_depthwise_conv():
    conv = nn.Conv2d(6, 6, (5, 3), padding=(2, 1), groups=6)
    x = torch.randn(2, 6, 7, 4)
    folded = F.conv2d(x, onednn.plus_identity(conv), conv.bias, padding=(2, 1), groups=6)
    torch.testing.assert_close(folded, conv(x) + x, rtol=1e-5, atol=1e-6)
    assert not torch.equal(onednn.plus_identity(conv), conv.weight)  # a copy: the module keeps its weight


@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_batchnorm_equals_conv_then_batchnorm(conv_bias):
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 3, 5, 4)
    weight, bias = onednn.fold_batchnorm(conv, bn)
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)
