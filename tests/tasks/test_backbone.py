"""``BackbonePyramid``: which maps it taps from each topology, and the errors for backbones it cannot use."""

import pytest
import torch

import vitlab
from vitlab.models import get_variant
from vitlab.tasks import BackbonePyramid

TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def test_isotropic_last_map_or_one_block_per_level():
    last = BackbonePyramid("vit_micro_patch4_28", in_chans=1, img_size=32, out_channels=8, backbone_kwargs=TINY_VIT)
    assert last.is_isotropic
    assert last.indices == [3]
    assert last.out_strides == (4, 8)
    spread = BackbonePyramid(
        "vit_micro_patch4_28",
        in_chans=1,
        img_size=32,
        out_channels=8,
        backbone_kwargs=TINY_VIT,
        isotropic_maps="per_level",
    )
    assert spread.indices == [1, 3]  # deeper blocks feed coarser levels
    maps = spread(torch.randn(2, 1, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8, 8), (2, 8, 4, 4)]
    with pytest.raises(ValueError, match="isotropic_maps"):
        BackbonePyramid("vit_micro_patch4_28", in_chans=1, img_size=32, backbone_kwargs=TINY_VIT, isotropic_maps=2)


def test_hierarchical_cnn_skips_the_stride_2_stem():
    pyramid = BackbonePyramid("resnet18", in_chans=3, img_size=32, out_channels=8)
    assert not pyramid.is_isotropic
    assert pyramid.indices == [1, 2, 3, 4]
    assert pyramid.out_strides == (4, 8, 16, 32)
    maps = pyramid(torch.randn(1, 3, 33, 33))  # odd size: padded convolutions round up
    assert [tuple(m.shape[-2:]) for m in maps] == [(9, 9), (5, 5), (3, 3), (2, 2)]


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(vitlab.UnknownModelError, match="resnet18"):
        BackbonePyramid("resnet81", in_chans=3, img_size=32)


def test_pruned_backbones_train_every_parameter():
    # one tiny model per family and model class: what prune_intermediate_layers keeps, the taps must reach
    kinds: dict[tuple[str, str], str] = {}
    for name in vitlab.list_models():
        spec = get_variant(name)
        with torch.device("meta"):
            kind = type(vitlab.create_model(name, **spec.test_kwargs)).__name__
        kinds.setdefault((spec.paper.title, kind), name)
    untrained = {}
    for name in kinds.values():
        spec = get_variant(name)
        kwargs = {k: v for k, v in spec.test_kwargs.items() if k not in ("img_size", "in_chans")}
        size = spec.test_kwargs.get("img_size", spec.img_size)
        pyramid = BackbonePyramid(name, in_chans=spec.in_chans, img_size=size, out_channels=8, backbone_kwargs=kwargs)
        sum(m.mean() for m in pyramid(torch.randn(2, spec.in_chans, size, size))).backward()
        missing = [n for n, p in pyramid.backbone.named_parameters() if p.grad is None]
        if missing:
            untrained[name] = missing[:3]
    assert len(kinds) >= 20
    assert not untrained, f"parameters the taps do not reach: {untrained}"


def test_plain_trunk_conv_stem_keeps_the_token_grid_and_names_bad_patches():
    from vitlab.tasks._backbone import PlainViTTrunk

    plain = PlainViTTrunk("vit_micro_patch4_28", in_chans=3, img_size=32, backbone_kwargs=TINY_VIT)
    conv = PlainViTTrunk("vit_micro_patch4_28", in_chans=3, img_size=32, backbone_kwargs=TINY_VIT, conv_stem=True)
    image = torch.randn(2, 3, 32, 32)
    (a, grid_a), (b, grid_b) = plain.embed(image), conv.embed(image)
    assert a.shape == b.shape
    assert grid_a == grid_b == (8, 8)
    strides = [m.stride for m in conv.backbone.patch_embed.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2), (2, 2)]  # two halvings make patch 4
    b.sum().backward()  # the stem trains
    assert conv.backbone.patch_embed.proj[0].conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power of two"):
        PlainViTTrunk("vit_micro_patch4_28", in_chans=3, img_size=36, conv_stem=True,
                      backbone_kwargs={**TINY_VIT, "patch_size": 6})  # fmt: skip
