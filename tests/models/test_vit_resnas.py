"""ViT-ResNAS: structure parity with the official searched network_defs, their MAC budgets, and the residual
spatial reduction's residual path (average pool, zero-padded channels)."""

import ast

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.bench import count_flops, gmacs
from vitlab.models.vit_resnas import (
    SMALL_NETWORK_DEF,
    TINY_NETWORK_DEF,
    BlockSpec,
    ResidualSpatialReduction,
    ResNASSpec,
    StageSpec,
    ViTResNAS,
    count_macs,
    parse_network_def,
)

# model name, official network_def, MAC budget of the official evolutionary search script
OFFICIAL = [("vit_resnas_tiny_224", TINY_NETWORK_DEF, 1.7944), ("vit_resnas_small_224", SMALL_NETWORK_DEF, 2.9)]


@pytest.mark.parametrize(("name", "network_def", "_budget"), OFFICIAL)
def test_blocks_match_official_network_def(name, network_def, _budget):
    with torch.device("meta"):
        model = vitlab.create_model(name)
    entries = ast.literal_eval(network_def)
    built = [b for stage in model.stages for b in stage.blocks]
    blocks = [e for e in entries if e[0] == 1]
    assert len(built) == len(blocks)
    for block, (_, (dim, heads, head_dim), (_, hidden), _) in zip(built, blocks, strict=True):
        assert block.norm1.normalized_shape == (dim,)
        assert (block.attn.num_heads, block.attn.head_dim) == (heads, head_dim)
        assert block.attn.qkv.weight.shape == (3 * heads * head_dim, dim)
        assert block.attn.proj.weight.shape == (dim, heads * head_dim)
        assert block.mlp.fc1.weight.shape == (hidden, dim)
    reductions = [e for e in entries if e[0] == 3]
    assert [(s.downsample.in_dim, s.downsample.out_dim) for s in model.stages[1:]] == [r[1:] for r in reductions]
    assert model.head.weight.shape == (1000, entries[-1][1])
    assert model.stem.proj.weight.shape[:2] == (entries[0][1], 24)


@pytest.mark.parametrize(("name", "_def", "budget"), OFFICIAL)
def test_macs_within_official_search_budget(name, _def, budget):
    with torch.device("meta"):
        model = vitlab.create_model(name)
    macs = gmacs(count_flops(model, (3, 224, 224)))
    assert macs <= budget  # searched to just under the budget
    assert macs == pytest.approx(budget, rel=0.03)
    assert macs * 1e9 == pytest.approx(count_macs(model.spec, 224), abs=1)


def test_token_grids_per_stage():
    with torch.device("meta"):
        model = vitlab.create_model("vit_resnas_tiny_224")
    _, inter = model.forward_intermediates(torch.zeros(1, 3, 224, 224, device="meta"))
    assert [t.shape[-1] for t in inter] == [16, 8, 4]  # patch 14 at 224, then two reductions by 2
    nano = vitlab.create_model("vit_resnas_nano_28").eval()
    _, inter = nano.forward_intermediates(torch.zeros(1, 1, 28, 28))
    assert [t.shape[-1] for t in inter] == [7, 4, 2]  # odd grid: ceil, both paths


def test_residual_path_is_average_pool_zero_padded():
    torch.manual_seed(0)
    sr = ResidualSpatialReduction(4, 6, (4, 4))
    x = torch.randn(2, 1 + 16, 4)
    assert sr.shortcut(x, (4, 4)).shape == (2, 1 + 4, 6)
    for p in (sr.conv.weight, sr.conv.bias, sr.token_proj.weight, sr.token_proj.bias, sr.pos_embed):
        p.data.zero_()  # main path off: the output is the residual path alone
    out, grid = sr(x, (4, 4))
    assert grid == (2, 2)
    patches = x[:, 1:].reshape(2, 4, 4, 4)  # (B, H, W, C)
    for i in range(2):
        for j in range(2):
            want = patches[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2))
            torch.testing.assert_close(out[:, 1 + 2 * i + j, :4], want)
    torch.testing.assert_close(out[:, 0, :4], x[:, 0])  # class token: identity on its channels
    assert (out[..., 4:] == 0).all()  # zero-padded channels


def test_residual_and_plain_reduction_differ_only_by_the_shortcut():
    torch.manual_seed(0)
    res = ResidualSpatialReduction(4, 8, (3, 3))
    plain = ResidualSpatialReduction(4, 8, (3, 3), residual=False)
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 1 + 9, 4)
    (a, grid), (b, _) = res(x, (3, 3)), plain(x, (3, 3))
    assert grid == (2, 2)
    pooled = F.avg_pool2d(x[:, 1:].transpose(1, 2).reshape(2, 4, 3, 3), 2, 2, ceil_mode=True)  # no padding counted
    torch.testing.assert_close(a[:, 1:, :4] - b[:, 1:, :4], pooled.flatten(2).transpose(1, 2))


def test_plain_reduction_has_equal_macs_and_params():
    a = vitlab.create_model("vit_resnas_nano_28")
    b = vitlab.create_model("vit_resnas_nano_28", reduction="conv")
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    assert count_flops(a, (1, 28, 28)) == count_flops(b, (1, 28, 28))


@pytest.mark.parametrize(
    ("network_def", "match"),
    [
        ("((4, 32), (1, (32, 2, 8), (32, 64), 1), (2, 32, 10)", "network_def"),  # unbalanced string
        (((4, 32), (1, (32, 2, 8), (32, 64), 1)), "head"),  # no head entry
        (((4, 32), (1, (16, 2, 8), (16, 64), 1), (2, 32, 10)), "width"),  # block width != stage width
        (((4, 32), (3, 16, 64), (2, 64, 10)), "reduction input"),
        (((4, 32), (7, 1), (2, 32, 10)), "unknown type"),
        (((4, 64), (3, 64, 32), (2, 32, 10)), "shrink"),  # widths must not shrink (zero-padded residual)
    ],
)
def test_bad_network_def_errors(network_def, match):
    with pytest.raises((ValueError, SyntaxError), match=match if match != "network_def" else None):
        parse_network_def(network_def)


def test_bad_constructor_arguments_error():
    spec = ResNASSpec((StageSpec(16, (BlockSpec(2, 8, 32),)),), patch_size=4, stem_chans=8)
    with pytest.raises(ValueError, match="reduction"):
        ViTResNAS(spec, img_size=28, reduction="pool")
    with pytest.raises(ValueError, match="exactly one"):
        ViTResNAS()
    with pytest.raises(ValueError, match="patch_size"):
        ResNASSpec(spec.stages, patch_size=3)
    with pytest.raises(ValueError, match="global_pool"):
        ViTResNAS(spec, img_size=28, global_pool="max")


def test_network_def_entries_switched_off_are_left_out():
    nd = ((4, 32), (1, (32, 2, 8), (32, 64), 1), (1, (32, 2, 8), (32, 48), 0), (2, 32, 10))
    spec = parse_network_def(nd, patch_size=4)
    assert spec.stages[0].blocks == (BlockSpec(2, 8, 64),)
