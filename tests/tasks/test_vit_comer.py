"""ViT-CoMer: the official configuration's size, the zero-initialised injection, the ablation switches, bad input."""

import pytest
import torch

from vitlab.tasks import create_task_model
from vitlab.tasks.segmentation.vit_comer import _groups

TINY = {"img_size": 32, "interactions": 2, "extra_cti": 1, "conv_width": 8, "mrfp_ratio": 2.0}
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _tiny(**kw):
    return create_task_model("vit_comer", "vit_micro_patch4_28", **{"backbone_kwargs": TINY_VIT, **TINY, **kw})


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vit_comer_t_matches_the_official_parameter_count():
    # ViT-CoMer-T + UperNet (512 wide) for ADE20K's 150 classes: 38.7 M in the official README. The count
    # includes mmseg's auxiliary FCN head (3x3 conv 192 -> 256 + BN, 1x1 classifier), which vitlab does not build,
    # and the position table at the 224 px pre-training size (the code resamples it to 512 px on the fly)
    shape = {"num_classes": 150, "in_chans": 3, "img_size": 224}
    model = create_task_model("vit_comer", "deit_tiny_patch16_224", width=512, **shape)
    fcn_aux = 192 * 256 * 9 + 2 * 256 + 256 * 150 + 150
    assert (_params(model) + fcn_aux) / 1e6 == pytest.approx(38.7, rel=0.002)


def test_block_groups_follow_the_official_schedule():
    assert _groups(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert _groups(2, 2) == [(0, 1), (1, 2)]
    assert _groups(5, 1) == [(0, 5)]


def test_injection_starts_at_zero_so_the_vit_runs_as_pretrained():
    # gamma = 0: the CNN pyramid does not change the ViT tokens until training moves gamma
    torch.manual_seed(0)
    model = _tiny().eval()
    image = torch.randn(2, 1, 32, 32)
    seen = []
    model.trunk.backbone.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(image)
        x, grid = model.trunk.embed(image)
        plain = model.trunk.run_blocks(x, grid, 0, model.trunk.depth)
    assert torch.allclose(seen[0], plain, atol=1e-6)
    with torch.no_grad():
        for interaction in model.interactions:
            interaction.gamma.fill_(0.5)
        seen.clear()
        model(image)
    assert not torch.allclose(seen[0], plain, atol=1e-3)


def test_ablation_switches_remove_their_parts():
    full = _params(_tiny())
    counts = [
        _params(_tiny(cnn_branch=False, mrfp=False, cti_to_vit=False, cti_to_cnn=False)),
        _params(_tiny(mrfp=False, cti_to_vit=False, cti_to_cnn=False)),
        _params(_tiny(cti_to_vit=False, cti_to_cnn=False)),
        _params(_tiny(cti_to_cnn=False)),
    ]
    assert counts == sorted(counts)
    assert counts[-1] < full
    model = _tiny(cnn_branch=False, mrfp=False, cti_to_vit=False, cti_to_cnn=False)
    maps = model.pyramid(torch.randn(1, 1, 32, 32))
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_pyramid_strides_follow_the_patch_size():
    for patch, sizes in ((4, [32, 16, 8, 4]), (8, [16, 8, 4, 2])):
        model = _tiny(backbone_kwargs={**TINY_VIT, "patch_size": patch})
        maps = model.pyramid(torch.randn(1, 1, 32, 32))
        assert [m.shape[-1] for m in maps] == sizes
        assert all(m.shape[1] == 32 for m in maps)


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="with cnn_branch"):
        _tiny(cnn_branch=False)
    with pytest.raises(ValueError, match="interactions"):
        _tiny(interactions=3)
    with pytest.raises(ValueError, match="patch size of 4, 8 or 16"):
        _tiny(backbone_kwargs={**TINY_VIT, "patch_size": 2})
    with pytest.raises(ValueError, match="hierarchical"):
        create_task_model("vit_comer", "tiny_vit_1m_28", img_size=32)
    model = _tiny().eval()
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(1, 1, 36, 36))
