"""compress ``shiftadd`` on timm's PVT-v2: which layers convert, forward/backward with the balance loss, the
checkpoint round trip through the surgery record, the dense-routed mixture equal to the host, op counts, and
bad options."""

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.pvt_v2 import Attention as PvtAttention

import vitlab
from vitlab import compress
from vitlab.bench.opcount import count_ops
from vitlab.compress.shiftadd import expert_counts
from vitlab.engine.checkpoint import load_weights, save_weights
from vitlab.engine.surgery import records_from_meta, replay
from vitlab.layers.moe import MixtureOfExperts
from vitlab.layers.shiftadd import BinaryLinearAttention, ShiftLinear

TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))


def _pvt() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("pvt_v2_b0", num_classes=10, in_chans=1, **TINY)


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 32, 32)


def test_default_conversion_layout_and_training_step():
    model = compress.apply(_pvt(), "shiftadd")
    stages = model.stages
    assert all(isinstance(s.blocks[0].attn, BinaryLinearAttention) for s in stages[:3])
    assert isinstance(stages[3].blocks[0].attn, PvtAttention)  # the last stage keeps softmax attention
    for s in stages:
        for fc in (s.blocks[0].mlp.fc1, s.blocks[0].mlp.fc2):
            assert isinstance(fc, MixtureOfExperts)
            assert type(fc.experts[0]) is nn.Linear
            assert isinstance(fc.experts[1], ShiftLinear)
            assert fc.latency == (6.0, 4.0)
            assert fc.router.noise is not None
    report = compress.surgery_of(model)[-1]["report"]
    assert report["binary_attention"] == 3
    assert report["moe"] == 8
    model.train()
    out = model(_x())
    aux = compress.aux_losses(model)
    assert set(aux) == {"moe_balance"}
    assert torch.isfinite(aux["moe_balance"])
    (out.logsumexp(-1).sum() + aux["moe_balance"]).backward()
    routed = [n for n, p in model.named_parameters() if p.grad is None]
    assert not routed, routed
    assert expert_counts(model).sum() == 2 * 2 * (64 + 16 + 4 + 1)  # fc1 + fc2, batch 2, top-1, tokens per stage


def test_checkpoint_round_trip(tmp_path):
    model = compress.apply(_pvt(), "shiftadd", moe_attn=True).eval()
    assert isinstance(model.stages[0].blocks[0].attn.kv, MixtureOfExperts)
    assert type(model.stages[3].blocks[0].attn.kv) is nn.Linear  # the softmax stage stays dense, as released
    assert compress.surgery_of(model)[-1]["report"]["moe"] == 8 + 3 * 3
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights a fresh model cannot have
    x = _x()
    expected = model(x)
    path = save_weights(model, tmp_path / "m.safetensors", {"surgery": compress.surgery_of(model)})
    fresh = timm.create_model("pvt_v2_b0", num_classes=10, in_chans=1, **TINY)
    meta = {"surgery": compress.surgery_of(model)}
    replay(fresh, records_from_meta(meta), "build")
    load_weights(fresh, path)
    torch.testing.assert_close(fresh.eval()(x), expected, atol=0, rtol=0)


def test_mixture_routed_to_the_dense_expert_equals_the_host():
    host = _pvt().eval()
    x = _x()
    expected = host(x)
    model = compress.apply(host, "shiftadd", attention="msa", mlp="moe", balance="released", moe_attn=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MixtureOfExperts):
                m.router.gate.weight.zero_()
                m.router.gate.bias.copy_(torch.tensor([10.0, -10.0]))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with count_ops(model) as c, torch.no_grad():
        model(x)
    assert c["shifts"] == 0
    assert c["images"] == 2


def test_balance_options():
    released = compress.apply(_pvt(), "shiftadd", balance="released")
    cv2 = compress.apply(_pvt(), "shiftadd", balance="cv2")
    for model in (released, cv2):
        model.train()(_x())
    moes = [m for m in released.modules() if isinstance(m, MixtureOfExperts)]
    assert all(m.router.noise is None for m in moes)  # NaiveGate: top-1 without noise
    assert compress.aux_losses(released) == {}  # the released engine zeroes the balance loss
    assert all(m.latency is None for m in cv2.modules() if isinstance(m, MixtureOfExperts))
    assert "moe_balance" in compress.aux_losses(cv2)


def test_shift_mlp_op_counts_and_vit_host():
    model = compress.apply(_pvt(), "shiftadd", mlp="shift").eval()
    mlp_macs = 0
    for s, n in zip(model.stages, (64, 16, 4, 1), strict=True):
        fc1, fc2 = s.blocks[0].mlp.fc1, s.blocks[0].mlp.fc2
        assert isinstance(fc1, ShiftLinear)
        assert isinstance(fc2, ShiftLinear)
        mlp_macs += n * (fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)
    with count_ops(model) as c, torch.no_grad():
        model(_x())
    assert c.per_image()["shifts"] == mlp_macs
    vit = vitlab.create_model("vit_micro_patch4_28", **vitlab.get_variant("vit_micro_patch4_28").test_kwargs)
    compress.apply(vit, "shiftadd", attention="msa", mlp="shift")
    assert all(isinstance(b.mlp.fc1, ShiftLinear) for b in vit.blocks)
    assert torch.isfinite(vit(torch.randn(2, 1, 28, 28))).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "hamming"}, "attention"),
        ({"mlp": "adder"}, "mlp"),
        ({"balance": "switch"}, "balance"),
        ({"binary_stages": [4]}, "binary_stages"),
        ({"k": 3}, "k must"),
        ({"expert_latency": [1.0]}, "expert_latency"),
        ({"balance_weight": -1.0}, "balance_weight"),
        ({"attention": "msa", "mlp": "dense"}, "changes nothing"),
        ({"weight_bits": 1}, "weight_bits"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress.apply(_pvt(), "shiftadd", **kwargs)


def test_binary_attention_needs_a_pvt_host():
    vit = vitlab.create_model("vit_micro_patch4_28", **vitlab.get_variant("vit_micro_patch4_28").test_kwargs)
    with pytest.raises(ValueError, match="PVT"):
        compress.apply(vit, "shiftadd")
    with pytest.raises(ValueError, match="converted twice"):
        compress.apply(compress.apply(_pvt(), "shiftadd", mlp="shift"), "shiftadd", attention="msa", mlp="shift")
    with pytest.raises(ValueError, match="converted twice"):
        compress.apply(compress.apply(_pvt(), "shiftadd", mlp="dense"), "shiftadd", mlp="dense")
