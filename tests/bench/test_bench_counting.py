"""Parameter and FLOP counting: exact against the numel sum and a hand-derived ViT formula."""

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vitlab
from vitlab.bench import count_flops, count_flops_meta, count_params, count_params_meta, gmacs


def vit_macs(
    img: int, patch: int, dim: int, depth: int, classes: int, in_chans: int = 3, mlp_ratio: float = 4.0
) -> int:
    """Multiply-accumulates of a class-token ViT: patch conv, per block qkv/attention/proj/MLP, head."""
    patches = (img // patch) ** 2
    tokens = patches + 1
    hidden = int(dim * mlp_ratio)
    embed = patches * in_chans * patch * patch * dim
    block = tokens * dim * 3 * dim  # qkv
    block += 2 * tokens * tokens * dim  # q @ k^T and attn @ v, summed over heads
    block += tokens * dim * dim  # proj
    block += 2 * tokens * dim * hidden  # fc1 + fc2
    return embed + depth * block + dim * classes


def test_count_params_equals_numel_sum():
    model = timm.create_model("vit_tiny_patch16_224")
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_params_meta("vit_tiny_patch16_224") == count_params(model)


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "explicit"])
def test_count_flops_matches_vit_formula(fused_attn):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    assert count_flops(model, (3, 32, 32)) == 2 * vit_macs(32, 8, 64, 2, 10)
    assert count_flops(model, (3, 32, 32), batch_size=3) == 3 * 2 * vit_macs(32, 8, 64, 2, 10)


def test_count_flops_vit_tiny_224_cpu_sdpa_and_meta():
    expected = 2 * vit_macs(224, 16, 192, 12, 1000)
    model = timm.create_model("vit_tiny_patch16_224")
    assert model.blocks[0].attn.fused_attn  # the CPU SDPA kernel, not the explicit matmuls
    assert count_flops(model, (3, 224, 224)) == expected
    assert count_flops_meta("vit_tiny_patch16_224") == expected
    with torch.device("meta"):
        meta_model = timm.create_model("vit_tiny_patch16_224")
    assert count_flops(meta_model, (3, 224, 224)) == expected


def test_meta_counts_match_real_for_vitlab_variants():
    for name in ("vit_nano_patch4_28", "tiny_vit_1m_28"):
        spec = vitlab.get_variant(name)
        model = vitlab.create_model(name)
        size = (spec.in_chans, spec.img_size, spec.img_size)
        assert count_params_meta(name) == count_params(model)
        assert count_flops_meta(name) == count_flops(model, size)
        assert count_flops_meta(name, img_size=56) == count_flops(vitlab.create_model(name, img_size=56), (1, 56, 56))


def test_count_flops_restores_training_mode():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10).train()
    count_flops(model, (3, 32, 32))
    assert model.training


def test_gmacs_is_half_a_flop_count():
    assert gmacs(4.6e9 * 2) == pytest.approx(4.6)


@pytest.mark.parametrize("bad", [(3, 32), (3, 0, 32), "3x32x32", (3, 32.0, 32)])
def test_count_flops_rejects_bad_input_size(bad):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="input_size"):
        count_flops(model, bad)


def test_count_flops_meta_rejects_bad_img_size():
    with pytest.raises(ValueError, match="img_size"):
        count_flops_meta("vit_nano_patch4_28", img_size=-4)
