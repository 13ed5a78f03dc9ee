"""compress ``magnitude``: global L1 pruning reaches the asked sparsity, is permanent (same keys and parameter
objects, no masks left), ranks weights across layers, and leaves the classifier dense unless asked."""

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab import compress

TINY_VIT = vitlab.get_variant("vit_micro_patch4_28").test_kwargs


def _vit() -> nn.Module:
    return vitlab.create_model("vit_micro_patch4_28", **TINY_VIT).eval()


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9])
def test_reaches_the_asked_sparsity_and_stays_a_plain_model(amount):
    model = _vit()
    keys, params = list(model.state_dict()), list(model.parameters())
    head = model.head.weight.clone()
    compress.apply(model, "magnitude", amount=amount)
    assert compress.sparsity(model) == pytest.approx(amount, abs=1e-3)
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # an optimizer keeps working
    assert not [n for n, _ in model.named_buffers() if n.endswith("_mask")]
    torch.testing.assert_close(model.head.weight, head, atol=0, rtol=0)
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_ranking_is_global_and_covers_convs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.fill_(10.0)  # the largest weights: a global ranking keeps all of them
        model[2].weight.uniform_(-1, 1)
    model.pretrained_cfg = {"classifier": "3"}
    compress.apply(model, "magnitude", amount=0.5)
    assert (model[0].weight != 0).all()
    assert (model[3].weight != 0).all()  # the classifier is left out
    assert (model[2].weight == 0).float().mean() > 0.5


def test_include_head_prunes_the_classifier():
    model = _vit()
    compress.apply(model, "magnitude", amount=0.5, include_head=True)
    assert (model.head.weight == 0).any()
    assert compress.sparsity(model, include_head=True) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.1, True, "0.5"])
def test_amount_outside_the_open_interval_is_refused(amount):
    with pytest.raises(ValueError, match=r"0 < amount < 1"):
        compress.apply(_vit(), "magnitude", amount=amount)


@pytest.mark.parametrize("keep_mask", [True, False])
def test_keep_mask_holds_the_zeros_through_optimizer_steps(keep_mask):
    model = _vit().train()
    compress.apply(model, "magnitude", amount=0.5, keep_mask=keep_mask)
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.ndim > 1 and (p == 0).any()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 1, 28, 28)).square().mean().backward()
        opt.step()
        compress.after_step(model)  # what vitlab train calls after every step
    params = dict(model.named_parameters())
    still_zero = all((params[n][z] == 0).all() for n, z in zeros.items())
    assert still_zero is keep_mask  # without the mask, AdamW moves every pruned weight
    assert list(model.state_dict()) == list(_vit().state_dict())  # the mask is no buffer
