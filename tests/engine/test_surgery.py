"""engine/surgery.py: token reduction and compression are recorded in checkpoint metadata and replayed by
``load_trained``, so a model reloads as it was saved; legacy ``meta["reduce"]`` checkpoints still load."""

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab import compress, reduce
from vitlab.engine import inference, load_trained, save_weights, surgery
from vitlab.errors import CheckpointError

VIT = "vit_micro_patch4_28"
X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _meta(name: str, model: nn.Module, **extra) -> dict:
    c, h, _ = model.pretrained_cfg["input_size"]
    return {"model": name, "num_classes": model.num_classes, "in_chans": c, "img_size": h, **extra}


def _vit() -> nn.Module:
    return vitlab.create_model(VIT).eval()


@torch.no_grad()
def test_reduced_and_pruned_model_reloads_as_saved(tmp_path):
    model = _vit()
    compress.apply(model, "magnitude", amount=0.5)
    surgery.apply(model, "reduce", "tome", r=2)
    ref = model(X)
    path = save_weights(model, tmp_path / "m.safetensors", _meta(VIT, model, surgery=surgery.surgery_of(model)))
    loaded, meta, _ = load_trained(path)
    assert reduce.is_reduced(loaded)
    assert reduce.schedule_of(loaded) == reduce.schedule_of(model)
    torch.testing.assert_close(loaded(X), ref, atol=1e-6, rtol=1e-6)
    assert surgery.surgery_of(loaded) == meta["surgery"] == surgery.surgery_of(model)
    assert [r["method"] for r in meta["surgery"]] == ["magnitude", "tome"]  # the order applied
    assert compress.sparsity(loaded) == pytest.approx(0.5, abs=1e-3)  # the zeros came with the weights
    with pytest.raises(AssertionError):  # the reduction is in effect
        torch.testing.assert_close(reduce.remove(loaded)(X), ref, atol=1e-4, rtol=1e-4)


def _tiny_fmvit(monkeypatch) -> nn.Module:
    """fmvit_small's tiny test config; ``load_trained`` builds the same through the patched factory."""
    tiny = {k: v for k, v in vitlab.get_variant("fmvit_small").test_kwargs.items() if k != "img_size"}
    monkeypatch.setattr(inference, "create_model", lambda name, **kw: vitlab.create_model(name, **{**tiny, **kw}))
    model = vitlab.create_model("fmvit_small", num_classes=5, img_size=32, **tiny)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@torch.no_grad()
def test_reparameterised_model_reloads(tmp_path, monkeypatch):
    model = compress.apply(_tiny_fmvit(monkeypatch), "reparam")
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    path = save_weights(
        model, tmp_path / "m.safetensors", _meta("fmvit_small", model, surgery=surgery.surgery_of(model))
    )
    loaded, _, _ = load_trained(path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(loaded(x), ref, atol=1e-6, rtol=1e-6)
    assert surgery.surgery_of(loaded) == surgery.surgery_of(model)


def test_reparameterised_weights_without_the_record_do_not_fit(tmp_path, monkeypatch):
    model = compress.apply(_tiny_fmvit(monkeypatch), "reparam")
    path = save_weights(model, tmp_path / "m.safetensors", _meta("fmvit_small", model))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_trained(path)


@torch.no_grad()
def test_legacy_reduce_metadata_still_loads(tmp_path):
    model = reduce.apply(_vit(), "tome", r=2)
    ref = model(X)
    meta = _meta(VIT, model, reduce={"method": "tome", "kwargs": {"r": 2}})
    loaded, _, _ = load_trained(save_weights(model, tmp_path / "m.safetensors", meta))
    assert reduce.is_reduced(loaded)
    torch.testing.assert_close(loaded(X), ref, atol=1e-6, rtol=1e-6)
    assert surgery.surgery_of(loaded) == [{"kind": "reduce", "method": "tome", "kwargs": {"r": 2}}]


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"kind": "reduce", "method": "tomato", "kwargs": {}}, r"unknown reduce method 'tomato'.*knows .*tome"),
        ({"kind": "compress", "method": "quantize", "kwargs": {}}, r"unknown compress method 'quantize'"),
        ({"kind": "prune", "method": "magnitude", "kwargs": {}}, r"record #0 is malformed"),
        ({"kind": "reduce", "method": "tome", "kwargs": {"bogus": 1}}, r"cannot replay .* record #0 .*bogus"),
    ],
)
def test_bad_records_are_checkpoint_errors(tmp_path, record, match):
    model = vitlab.create_model(VIT)
    path = save_weights(model, tmp_path / "m.safetensors", _meta(VIT, model, surgery=[record]))
    with pytest.raises(CheckpointError, match=match):
        load_trained(path)


def test_records_from_meta():
    assert surgery.records_from_meta({}) == []
    assert surgery.records_from_meta({"reduce": None}) == []
    new = [{"kind": "compress", "method": "reparam", "kwargs": {}}]
    assert surgery.records_from_meta({"surgery": new, "reduce": {"method": "tome", "kwargs": {}}}) == new
    with pytest.raises(CheckpointError, match="must be a list"):
        surgery.records_from_meta({"surgery": {"kind": "reduce"}})


def test_reduce_through_surgery_is_recorded_replaced_and_removed():
    model = vitlab.create_model(VIT, **vitlab.get_variant(VIT).test_kwargs)
    surgery.apply(model, "reduce", "tome", r=[1, 1])
    surgery.apply(model, "reduce", "evit", keep=0.7)  # replaces the reduction, so its record too
    assert surgery.surgery_of(model) == [{"kind": "reduce", "method": "evit", "kwargs": {"keep": 0.7}}]
    surgery.remove(model, "reduce")
    assert not reduce.is_reduced(model)
    assert surgery.surgery_of(model) == []


def test_non_json_keywords_are_refused_before_the_model_changes():
    model = vitlab.create_model(VIT, **vitlab.get_variant(VIT).test_kwargs)
    with pytest.raises(TypeError, match="must be numbers, strings"):
        surgery.apply(model, "reduce", "tome", r=torch.tensor(1))
    assert not reduce.is_reduced(model)
    with pytest.raises(ValueError, match="replay stage"):
        surgery.replay(model, [], "before")
