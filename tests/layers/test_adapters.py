"""Adapter utilities: zero-initialised copies equal the base at init, LoRA fits or refuses, adapters switch."""

import pytest
import timm
import torch
import torch.nn as nn

from vitlab.layers.adapters import (
    AdapterError,
    add_lora,
    freeze,
    lora_names,
    set_lora,
    trainable_parameters,
    zero_init_copy,
)

pytest.importorskip("peft")


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()


def test_zero_init_copy_keeps_weights_and_outputs_zero():
    attn = _vit().blocks[0].attn
    branch = zero_init_copy(attn, "proj")
    x = torch.randn(2, 17, attn.qkv.in_features)
    assert torch.equal(branch(x), torch.zeros_like(x))
    assert torch.equal(branch.qkv.weight, attn.qkv.weight)
    assert branch.qkv.weight is not attn.qkv.weight
    assert all(p.requires_grad for p in branch.parameters())
    # the copy learns: one gradient step on its output moves it off zero while the base is untouched
    before = attn.qkv.weight.clone()
    (branch(x) * torch.randn_like(x)).sum().backward()
    assert branch.proj.weight.grad.abs().sum() > 0
    assert torch.equal(attn.qkv.weight, before)


def test_zero_init_copy_rejects_unknown_or_empty_output():
    attn = _vit().blocks[0].attn
    with pytest.raises(AdapterError, match="'out'"):
        zero_init_copy(attn, "out")
    with pytest.raises(AdapterError, match="no parameters"):
        zero_init_copy(attn, "attn_drop")
    with pytest.raises(AdapterError, match="at least one"):
        zero_init_copy(attn, [])


def test_lora_starts_at_base_then_trains_only_adapters():
    model, base = _vit(), _vit()
    x = torch.randn(2, 3, 32, 32)
    matched = add_lora(model, ["qkv", "fc1"], rank=4, name="zoom")
    assert sorted(matched) == sorted(f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1"))
    torch.testing.assert_close(model(x), base(x))  # B is zero-initialised
    per_block = 4 * (192 + 3 * 192) + 4 * (192 + 4 * 192)
    assert trainable_parameters(model) == 2 * per_block
    freeze(model, keep=[model.head])
    assert trainable_parameters(model) == model.head.weight.numel() + model.head.bias.numel()


def test_lora_switches_between_adapters_and_base():
    model, base = _vit(), _vit()
    x = torch.randn(2, 3, 32, 32)
    add_lora(model, "qkv", rank=2, name="pan")
    add_lora(model, "qkv", rank=2, name="tilt")
    assert lora_names(model) == ["pan", "tilt"]
    for layer in (m for n, m in model.named_modules() if n.endswith("lora_B")):
        for lin in layer.values():
            nn.init.normal_(lin.weight)
    set_lora(model, "pan")
    out_pan = model(x)
    set_lora(model, "tilt")
    out_tilt = model(x)
    assert not torch.allclose(out_pan, out_tilt)
    set_lora(model, None)
    torch.testing.assert_close(model(x), base(x))
    set_lora(model, "pan")
    torch.testing.assert_close(model(x), out_pan)


def test_lora_that_does_not_fit_is_refused():
    model = _vit()
    with pytest.raises(AdapterError, match=r"\['to_q'\] match no"):
        add_lora(model, ["qkv", "to_q"])
    with pytest.raises(AdapterError, match="rank"):
        add_lora(model, "qkv", rank=0)
    add_lora(model, "qkv", name="zoom")
    with pytest.raises(AdapterError, match="already has"):
        add_lora(model, "qkv", name="zoom")
    with pytest.raises(AdapterError, match="unknown LoRA"):
        set_lora(model, "spin")
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        set_lora(_vit(), "zoom")
