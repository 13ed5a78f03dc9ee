"""timm's usage contract beyond test_registry.py, for every registered model (issue 20: A1, A2, A4).

- ``pretrained_cfg["pool_size"]`` is the size of the map ``forward_features`` returns at the default input;
- ``global_pool=''``, at creation or through ``reset_classifier``, returns the unpooled tokens or map of
  ``forward_features``' shape (its very output on vitlab's own classes);
- a model that declares ``dynamic_size`` trains at a size that is not a multiple of its patch (stem stride).
"""

import pytest
import torch

import vitlab
from vitlab.models import get_variant

NAMES = vitlab.list_models()
UNPOOLED = [n for n in NAMES if get_variant(n).unpooled_output]
NUM_CLASSES = 5


def _tiny(name: str, **kw) -> torch.nn.Module:
    return vitlab.create_model(name, **{**get_variant(name).test_kwargs, **kw}).eval()


def _size(name: str) -> int:
    spec = get_variant(name)
    return spec.test_kwargs.get("img_size", spec.img_size)


def _image(name: str, size: int | None = None, batch: int = 2) -> torch.Tensor:
    size = size or _size(name)
    return torch.randn(batch, get_variant(name).in_chans, size, size)


def _spatial_dims(model: torch.nn.Module) -> tuple[int, int]:
    # timm's Swin returns channels-last maps (B, H, W, C) and says so in ``output_fmt``
    return (1, 2) if str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC") else (2, 3)


def _is_timm_class(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _channel_dim(model: torch.nn.Module, out: torch.Tensor) -> int:
    return 1 if out.ndim == 4 and _spatial_dims(model) == (2, 3) else -1


@pytest.mark.parametrize("name", NAMES)
def test_pool_size_is_the_final_map_size(name):
    # the full-size network on the meta device: its real shapes at the default input, without memory or compute
    with torch.device("meta"):
        model = vitlab.create_model(name).eval()
        cfg = model.pretrained_cfg
        with torch.no_grad():
            feats = model.forward_features(torch.zeros(1, *cfg["input_size"]))
    if not isinstance(feats, torch.Tensor) or feats.ndim != 4:
        # tokens (CrossViT: a list of them): no map to size, and timm's ViT leaves pool_size unset too
        assert cfg.get("pool_size") is None
        return
    assert cfg.get("pool_size") is not None, "forward_features returns a map but pretrained_cfg has no pool_size"
    assert tuple(feats.shape[d] for d in _spatial_dims(model)) == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", UNPOOLED)
def test_create_unpooled_returns_forward_features(name):
    model = _tiny(name, num_classes=0, global_pool="")
    x = _image(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        pre = model.forward_head(feats, pre_logits=True)
    assert out.ndim in (3, 4), "global_pool='' must keep the tokens (B, N, C) or the map"
    assert out.shape == pre.shape == feats.shape
    assert out.shape[_channel_dim(model, out)] == model.num_features
    if not _is_timm_class(model):  # timm's TinyViT and ConvNeXt still norm the map in their head
        torch.testing.assert_close(out, feats)  # eval mode: head dropout is the identity


@pytest.mark.parametrize("name", UNPOOLED)
def test_reset_classifier_to_unpooled_and_back(name):
    model = _tiny(name, num_classes=NUM_CLASSES)
    pool = getattr(model, "global_pool", None) or model.head.global_pool  # TinyViT keeps it in its head
    pool = getattr(pool, "pool_type", pool)
    x = _image(name)
    model.reset_classifier(0, "")
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    assert model.num_classes == 0
    assert out.shape == feats.shape
    if not _is_timm_class(model):
        torch.testing.assert_close(out, feats)
    model.reset_classifier(NUM_CLASSES, pool)
    with torch.no_grad():
        assert model(x).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in UNPOOLED if not get_variant(n).timm_native])
def test_classifier_on_unpooled_output(name):
    # timm's two behaviours: per-token logits on tokens (ViT); refused on a map (ConvNeXt) rather than guessed
    model = _tiny(name, num_classes=0, global_pool="")
    if _is_timm_class(model):
        pytest.skip("a timm class: timm decides (TinyViT classifies a map with a 1x1 conv)")
    x = _image(name)
    with torch.no_grad():
        feats = model.forward_features(x)
    if feats.ndim == 4:
        with pytest.raises(ValueError, match="global_pool"):
            model.reset_classifier(NUM_CLASSES)
        with pytest.raises(ValueError, match="global_pool"):
            _tiny(name, num_classes=NUM_CLASSES, global_pool="")
        assert model.num_classes == 0  # a refused reset changes nothing
        return
    model.reset_classifier(NUM_CLASSES)
    with torch.no_grad():
        assert model(x).shape == (*feats.shape[:-1], NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in NAMES if get_variant(n).dynamic_size])
def test_dynamic_size_trains_off_the_patch_grid(name):
    model = _tiny(name, num_classes=NUM_CLASSES).train()
    stride = model.feature_info[0]["reduction"]  # the patch, or the stem's stride
    size = _size(name) + max(stride, 2) - 1  # a multiple of no stride of the model
    out = model(_image(name, size=size))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient at {size} px: {no_grad[:5]}"
