"""``--init-from`` with foreign weights: PyTorch state dicts (plain or nested), plain safetensors, clear errors."""

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitlab.engine.inference import init_from_checkpoint
from vitlab.errors import CheckpointError


def _vit(seed=0, num_classes=4, img_size=32, depth=2, embed_dim=32):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=img_size,
        patch_size=8,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        num_classes=num_classes,
    ).eval()


def _same_outputs(a, b, img_size=32):
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "wrap"),
    [
        ("plain.pth", lambda sd: sd),
        ("nested.pth", lambda sd: {"model": sd}),
        ("lightning.ckpt", lambda sd: {"state_dict": sd, "epoch": 3}),
        ("ema.pt", lambda sd: {"model_ema": sd, "args": {"lr": 1e-3}}),
        ("ddp.bin", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
    ],
)
def test_torch_state_dict_loads_into_the_same_architecture(tmp_path, name, wrap):
    source = _vit(seed=0)
    path = tmp_path / name
    torch.save(wrap(source.state_dict()), path)
    model = _vit(seed=1)
    assert init_from_checkpoint(model, path) == []
    _same_outputs(model, source)


def test_plain_safetensors_without_vitlab_metadata_loads(tmp_path):
    source = _vit(seed=0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = _vit(seed=1)
    init_from_checkpoint(model, path)
    _same_outputs(model, source)


def test_new_class_count_keeps_the_built_head(tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save(_vit(seed=0, num_classes=10).state_dict(), path)
    model = _vit(seed=1, num_classes=4)
    head = model.head.weight.clone()
    assert init_from_checkpoint(model, path) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, head)


def test_foreign_weights_go_through_the_models_checkpoint_filter(tmp_path):
    # timm's ViT filter resamples the position embedding: 4x4 patches at 32 px -> 6x6 at 48 px
    path = tmp_path / "32px.pth"
    torch.save(_vit(seed=0).state_dict(), path)
    model = _vit(seed=1, img_size=48)
    assert init_from_checkpoint(model, path) == []
    assert model.pos_embed.shape == (1, 37, 32)


@pytest.mark.parametrize("name", ["weights.pth", "weights.bin", "weights.safetensors", "weights"])
def test_garbage_is_a_one_line_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint\n" * 4)
    with pytest.raises(CheckpointError, match=re.escape(name)) as err:
        init_from_checkpoint(_vit(), path)
    assert "\n" not in str(err.value)


def test_pickle_without_tensors_is_an_error(tmp_path):
    path = tmp_path / "config.pth"
    torch.save({"lr": 0.1, "epochs": 3}, path)
    with pytest.raises(CheckpointError, match=r"config\.pth.*no state dict"):
        init_from_checkpoint(_vit(), path)


@pytest.mark.parametrize("other", [{"depth": 3}, {"embed_dim": 64}], ids=["deeper", "wider"])
def test_wrong_architecture_is_an_error(tmp_path, other):
    path = tmp_path / "other.pth"
    torch.save(_vit(**other).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"other\.pth.*does not fit") as err:
        init_from_checkpoint(_vit(), path)
    assert "\n" not in str(err.value)
