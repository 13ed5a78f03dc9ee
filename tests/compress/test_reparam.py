"""compress ``reparam``: the deploy form equals the training form in eval mode and is smaller; a model with
nothing to fold is refused. BatchNorm statistics are randomised so a wrong fold cannot hide behind init values."""

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab import compress

TINY = {k: v for k, v in vitlab.get_variant("fmvit_small").test_kwargs.items() if k != "img_size"}


def _fmvit() -> nn.Module:
    model = vitlab.create_model("fmvit_small", num_classes=7, **TINY)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_reparam_keeps_eval_outputs_and_drops_parameters():
    model = _fmvit()
    x = torch.randn(2, 3, 32, 32)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        compress.apply(model, "reparam")
        out = model(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    report = compress.surgery_of(model)[0]["report"]
    assert report["params_after"] < report["params_before"]
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert set(model.state_dict()) != keys  # why the record is replayed before weights are loaded


def test_reparam_uses_timm_walk_for_module_hooks():
    from timm.models.fastvit import MobileOneBlock

    model = nn.Sequential(MobileOneBlock(8, 8, 3), nn.Flatten(), nn.LazyLinear(4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 8, 6, 6)
        ref = model(x)
        compress.apply(model, "reparam")
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_nothing_to_reparameterise_is_an_error():
    model = vitlab.create_model("vit_micro_patch4_28", **vitlab.get_variant("vit_micro_patch4_28").test_kwargs)
    with pytest.raises(ValueError, match="vit_micro_patch4_28 has nothing to reparameterise"):
        compress.apply(model, "reparam")
    assert compress.surgery_of(model) == []
