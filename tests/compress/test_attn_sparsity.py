"""compress ``attn_sparsity``: the penalty equals mean(log(1 + a^2)) of the attention a hand-written softmax gives,
``"last"`` counts only the last block and ``"all"`` averages every block, gradients reach ``qkv``, weight 0 adds
zero, the forward is unchanged (fused attention stays), eval adds nothing, and ``remove`` takes the hooks off."""

import math

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab import compress

TINY_VIT = {**vitlab.get_variant("vit_micro_patch4_28").test_kwargs, "depth": 3}


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_micro_patch4_28", num_classes=10, in_chans=1, **TINY_VIT).train()
    with torch.no_grad():  # peaked attention, more so in later blocks (freshly initialised, it is near uniform)
        for i, b in enumerate(model.blocks):
            b.attn.qkv.weight.mul_(10 * (i + 1))
    return model


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _by_hand(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per-block mean(log(1 + a^2)) from an explicit attention computation of every block."""
    out, feats = [], []

    def keep(module, args, output):
        feats.append(args[0])

    handles = [b.attn.register_forward_hook(keep) for b in model.blocks]
    model(x)
    for h in handles:
        h.remove()
    for b, f in zip(model.blocks, feats, strict=True):
        a = b.attn
        B, N, C = f.shape
        qkv = f @ a.qkv.weight.T + a.qkv.bias
        q, k = (qkv[..., i * C : (i + 1) * C].reshape(B, N, a.num_heads, -1).transpose(1, 2) for i in range(2))
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(a.head_dim), dim=-1)
        out.append(float(torch.log(1 + probs**2).mean()))
    return out


@pytest.mark.parametrize("layers", ["last", "all"])
def test_penalty_matches_a_hand_computation(layers):
    model, x = _vit(), _x()
    per_block = _by_hand(model, x)
    compress.apply(model, "attn_sparsity", weight=0.5, layers=layers)
    model(x)
    term = compress.aux_losses(model)["attn_sparsity"]
    expected = per_block[-1] if layers == "last" else sum(per_block) / len(per_block)
    assert float(term.detach()) == pytest.approx(0.5 * expected, rel=1e-5)
    # the two forms differ: blocks do not all share the last block's penalty
    assert abs(per_block[-1] - sum(per_block) / len(per_block)) > 1e-3 * per_block[-1]


def test_each_forward_is_counted_once():
    model = _vit()
    compress.apply(model, "attn_sparsity")
    model(_x())
    assert "attn_sparsity" in compress.aux_losses(model)
    assert compress.aux_losses(model) == {}


def test_gradients_reach_qkv_of_the_regularised_blocks_only():
    model = _vit()
    compress.apply(model, "attn_sparsity", layers="last")
    model(_x())
    compress.aux_losses(model)["attn_sparsity"].backward()
    assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the last block's input
    assert model.blocks[-1].attn.proj.weight.grad is None  # the penalty does not involve values or proj
    assert model.head.weight.grad is None


def test_weight_zero_gives_a_zero_term():
    model = _vit()
    compress.apply(model, "attn_sparsity", weight=0.0, layers="all")
    model(_x())
    assert float(compress.aux_losses(model)["attn_sparsity"].detach()) == 0.0


def test_outputs_unchanged_and_eval_adds_nothing():
    model, x = _vit(), _x()
    ref_train = model(x)
    ref_eval = model.eval()(x)
    compress.apply(model, "attn_sparsity", layers="all")
    torch.testing.assert_close(model(x), ref_eval, atol=0, rtol=0)
    assert compress.aux_losses(model) == {}
    model.train()
    torch.testing.assert_close(model(x), ref_train, atol=0, rtol=0)
    assert model.blocks[0].attn.fused_attn  # the block itself still runs fused attention


def test_remove_takes_the_hooks_off_and_reapplying_does_not_double_them():
    model = _vit()
    compress.apply(model, "attn_sparsity", layers="all")
    compress.apply(model, "attn_sparsity", layers="last")
    assert sum(len(b.attn._forward_hooks) for b in model.blocks) == 1
    compress.remove(model)
    model(_x())
    assert compress.aux_losses(model) == {}
    assert all(not b.attn._forward_hooks for b in model.blocks)


@pytest.mark.parametrize(("kw", "match"), [({"weight": -1}, "weight"), ({"layers": "first"}, "layers")])
def test_bad_keywords_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        compress.apply(_vit(), "attn_sparsity", **kw)


def test_a_host_without_vit_attention_is_refused():
    import timm

    with pytest.raises(ValueError, match=r"attn_sparsity supports .* got resnet18"):
        compress.apply(timm.create_model("resnet18"), "attn_sparsity")
