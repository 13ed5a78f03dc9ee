"""PPMA's fused CPU inference path (stem, CPE, FFN) against its modules. The polyline mask and both attention
forms are tested in tests/layers/test_polyline_mask.py, the variants by the registry and parity tests."""

import pytest
import torch

import vitlab
from vitlab.layers import cpu_fusion
from vitlab.models import ppma

_TINY = dict(embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), head_proj_dim=24)


@pytest.mark.skipif(not cpu_fusion._fused_ops_work(), reason="this torch has no usable oneDNN fused ops")
def test_fused_cpu_inference_path_equals_the_modules(monkeypatch):
    torch.manual_seed(0)
    model = vitlab.create_model("ppma_tiny", **_TINY, num_classes=5).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial BN folding
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        torch.nn.init.normal_(bn.weight)
    fused, fusable = [], ppma.fused_inference_ok
    monkeypatch.setattr(ppma, "fused_inference_ok", lambda x, module: fused.append(fusable(x, module)) or fused[-1])
    x = torch.randn(2, 3, 72, 56)
    expected = model(x)  # autograd on: the modules
    assert fused
    assert not any(fused)
    fused.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert fused == [True] * 9  # the stem, then per block (4) the CPE and the FFN
        fused.clear()
        model.train()
        model(x)  # training (batch statistics, drop paths) never fuses
        assert not any(fused)
