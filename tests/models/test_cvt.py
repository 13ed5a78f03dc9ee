"""CvT (models/cvt.py): the paper's claim that it needs no position embedding (any input size), the
feature and pooling contract, and official-repo key names loading through ``checkpoint_filter_fn``.
Parity with HF transformers' CvT is in test_hf_parity.py."""

import re

import pytest
import timm
import torch

import vitlab
from vitlab.models.cvt import checkpoint_filter_fn

# three stages, every part of the paper's design: CLS token in the last stage, k/v stride 2
SMALL = {"embed_dims": (16, 32, 48), "depths": (1, 2, 3), "num_heads": (1, 2, 3)}
NUM_CLASSES = 7


def _ours(**kw) -> torch.nn.Module:
    return vitlab.create_model("cvt_13_224", num_classes=NUM_CLASSES, **{**SMALL, **kw}).eval()


@pytest.mark.parametrize("size", [24, 32, 50, 77, 112])
def test_runs_at_any_size_without_position_embeddings(size):
    model = _ours()
    assert not [n for n, _ in model.named_parameters() if "pos" in n]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size + 8))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_img_size_builds_the_same_parameters():
    small, large = _ours(img_size=32), _ours(img_size=384)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in large.state_dict().items()}


def test_features_only_gives_the_three_stage_maps():
    model = timm.create_model("cvt_13_224", features_only=True, **SMALL)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(16, 16, 16), (32, 8, 8), (48, 4, 4)]
    assert model.feature_info.reduction() == [4, 8, 16]


def test_without_cls_token_pools_by_average():
    model = _ours(use_cls_token=False)
    assert model.global_pool == "avg"
    assert model.no_weight_decay() == set()
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")


def test_official_key_names_load():
    # the official repo names modules as we do, but its stages are attributes ``stage0``.. (and DDP adds
    # ``module.``): the filter must undo exactly that
    src = _ours()
    official = {"module." + re.sub(r"^stages\.(\d+)\.", r"stage\1.", k): v for k, v in src.state_dict().items()}
    assert any(k.startswith("module.stage2.blocks.0.attn.conv_proj_k.bn.") for k in official)
    dst = _ours()
    dst.load_state_dict(checkpoint_filter_fn(official, dst))
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
