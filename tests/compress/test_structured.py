"""compress ``structured``: removing heads / MLP channels really shrinks the tensors, 0% is the identity, removing
a head that contributes nothing is exact, the parameter count falls as predicted, and a saved pruned model
rebuilds on load; timm's ViT and vitlab's MetaBlock ViT both work."""

import pytest
import timm
import torch
import torch.nn as nn

import vitlab
from vitlab import compress
from vitlab.compress.structured import importance, prune_structured
from vitlab.engine.checkpoint import save_weights
from vitlab.engine.inference import load_trained

TINY_VIT = {**vitlab.get_variant("vit_micro_patch4_28").test_kwargs, "num_heads": 4}  # 32 wide, 2 deep


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return vitlab.create_model("vit_micro_patch4_28", num_classes=10, in_chans=1, **TINY_VIT).eval()


def _hosts() -> dict[str, tuple[nn.Module, int]]:
    """name -> (eval model, input channels); every host accepts 28 and 36 px inputs."""
    torch.manual_seed(0)
    timm_vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        embed_dim=48,
        depth=2,
        num_heads=4,
        num_classes=5,
        dynamic_img_size=True,
    )
    kw = {**vitlab.get_variant("channelvit_nano_patch4_28").test_kwargs, "img_size": 28, "patch_size": 4}
    channel = vitlab.create_model("channelvit_nano_patch4_28", **kw)
    return {"vit_micro": (_vit(), 1), "timm_vit_tiny": (timm_vit.eval(), 3), "vitlab_metablock": (channel.eval(), 4)}


def _input(chans: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(1))


def test_zero_fractions_are_the_identity():
    model = _vit()
    x = _input()
    ref = model(x)
    compress.apply(model, "structured", heads=0.0, mlp=0.0)
    report = compress.surgery_of(model)[-1]["report"]
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    assert report["params_after"] == report["params_before"]
    assert report["heads_kept"] == [4, 4]


@pytest.mark.parametrize("name", ["vit_micro", "timm_vit_tiny", "vitlab_metablock"])
def test_shapes_shrink_and_forward_works_at_another_resolution(name):
    model, chans = _hosts()[name]
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    n, d, hidden, dim = attn.num_heads, attn.head_dim, mlp.fc1.out_features, attn.proj.out_features
    report = prune_structured(model, heads=0.5, mlp=0.25)
    kept_h, kept_m = n - n // 2, hidden - round(hidden * 0.25)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert report["heads_kept"] == [kept_h] * len(model.blocks)
    assert report["mlp_kept"] == [kept_m] * len(model.blocks)
    assert attn.num_heads == kept_h
    assert tuple(attn.qkv.weight.shape) == (3 * kept_h * d, dim)
    assert tuple(attn.proj.weight.shape) == (dim, kept_h * d)
    assert getattr(attn, "attn_dim", kept_h * d) == kept_h * d
    assert tuple(mlp.fc1.weight.shape) == (kept_m, dim)
    assert tuple(mlp.fc2.weight.shape) == (dim, kept_m)
    # fewer parameters exactly as counted: per block 4 weight matrices' rows/cols (+ qkv / fc1 biases)
    removed_h, removed_m = (n - kept_h) * d, hidden - kept_m
    per_block = removed_h * dim * 4 + removed_h * 3 * (attn.qkv.bias is not None) + removed_m * (2 * dim + 1)
    assert report["params_before"] - report["params_after"] == per_block * len(model.blocks)
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    out = model(_input(chans, 36))
    assert out.shape[0] == 2
    assert torch.isfinite(out).all()


def test_removing_a_head_that_contributes_nothing_is_exact():
    model = _vit()
    with torch.no_grad():
        for b in model.blocks:  # head 2 writes nothing: its proj columns are zero
            b.attn.proj.weight[:, 2 * b.attn.head_dim : 3 * b.attn.head_dim] = 0
    x = _input()
    ref = model(x)
    scores = {"heads": [torch.tensor([4.0, 3.0, 0.0, 2.0])] * 2, "mlp": [torch.ones(64)] * 2}
    prune_structured(model, heads=0.25, scores=scores)
    assert [b.attn.num_heads for b in model.blocks] == [3, 3]
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)


def test_removing_unused_mlp_channels_is_exact_and_l1_finds_them():
    model = _vit()
    with torch.no_grad():
        for b in model.blocks:  # channels 0..15: no input weight, no output weight -> contribute nothing
            b.mlp.fc1.weight[:16] = 0
            b.mlp.fc1.bias[:16] = 0
            b.mlp.fc2.weight[:, :16] = 0
    x = _input()
    ref = model(x)
    scores = importance(model)
    assert all((s[:16] == 0).all() and (s[16:] > 0).all() for s in scores["mlp"])
    compress.apply(model, "structured", mlp=0.25)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [48, 48]
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)


def test_taylor_importance_ranks_a_silent_head_last_and_leaves_grads_alone():
    model = _vit()
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, :8] = 0  # head 0 of block 1 cannot change the loss
    batches = [{"image": torch.randn(4, 1, 28, 28), "label": torch.randint(0, 10, (4,))} for _ in range(2)]
    scores = importance(model, batches, criterion="taylor")
    assert [s.shape for s in scores["heads"]] == [torch.Size([4])] * 2
    assert [s.shape for s in scores["mlp"]] == [torch.Size([64])] * 2
    assert scores["heads"][1][0] == 0
    assert (scores["heads"][1][1:] > 0).all()
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_save_and_load_rebuilds_the_pruned_model(tmp_path):
    torch.manual_seed(0)  # load_trained builds the registered size, so this is the full (12-block) host
    model = vitlab.create_model("vit_micro_patch4_28", num_classes=10, in_chans=1).eval()
    compress.apply(model, "structured", heads=0.5, mlp=0.5)
    meta = {"model": "vit_micro_patch4_28", "num_classes": 10, "in_chans": 1, "img_size": 28}
    path = save_weights(model, tmp_path / "pruned.safetensors", {**meta, "surgery": compress.surgery_of(model)})
    loaded, _, _ = load_trained(path)
    assert [b.attn.num_heads for b in loaded.blocks] == [2] * 12
    assert [b.mlp.fc1.out_features for b in loaded.blocks] == [128] * 12
    x = _input()
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-5)


def test_data_driven_scores_recorded_by_hand_replay_from_the_report(tmp_path):
    from vitlab.engine.surgery import records_from_meta, replay

    model = _vit()
    scores = {"heads": [torch.tensor([0.0, 1, 2, 3]), torch.tensor([3.0, 2, 1, 0])], "mlp": [torch.rand(64)] * 2}
    report = prune_structured(model, heads=0.5, mlp=0.5, scores=scores)
    compress.record_surgery(model, "compress", "structured", {"heads": 0.5, "mlp": 0.5}, report)
    fresh = _vit()
    replay(fresh, records_from_meta({"surgery": compress.surgery_of(model)}), "build")
    assert fresh.load_state_dict(model.state_dict()) is not None
    x = _input()
    torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"heads": 1.0}, {"mlp": -0.1}, {"heads": True}, {"mlp": "0.5"}])
def test_fractions_outside_zero_one_are_refused(kw):
    with pytest.raises(ValueError, match=r"0 <= (heads|mlp) < 1"):
        compress.apply(_vit(), "structured", **kw)


def test_a_host_without_the_layout_is_refused():
    convnet = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match=r"structured pruning supports .* got resnet18"):
        compress.apply(convnet, "structured", heads=0.25)


def test_taylor_through_apply_says_where_the_data_goes():
    with pytest.raises(ValueError, match=r"needs data"):
        compress.apply(_vit(), "structured", heads=0.25, importance_criterion="taylor")


def test_at_least_one_head_and_channel_stay():
    model = _vit()
    report = prune_structured(model, heads=0.99, mlp=0.999)
    assert report["heads_kept"] == [1, 1]
    assert report["mlp_kept"] == [1, 1]
    assert torch.isfinite(model(_input())).all()
