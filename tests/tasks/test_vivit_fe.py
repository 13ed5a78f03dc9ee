"""ViViT factorised encoder (paper 33): the recipe's parts do what they claim; the engine trains it on clips.

The registry-wide contract (tests/tasks/test_task_registry.py) covers the generic methods; here: the frozen
spatial encoder, the temporal initialisation, order awareness, the adapter, bad input and one engine run.
"""

import pytest
import torch

from vitlab.tasks import create_task_model
from vitlab.tasks.video import VivitFE

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(**kw) -> VivitFE:
    torch.manual_seed(0)
    kw = {"img_size": 16, "num_frames": 4, "temporal_depth": 1, **kw}
    return create_task_model("vivit_fe", kw.pop("backbone", "vit_micro_patch4_28"), backbone_kwargs=TINY, **kw)


def _clips(batch: int = 3, frames: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, frames, 1, size, size, generator=torch.Generator().manual_seed(1))


def _step(model: VivitFE, clips: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    target = torch.arange(clips.shape[0]) % model.num_classes
    model.loss(model(clips), {"motion": target})["loss"].backward()
    optimizer.step()


@pytest.mark.parametrize("backbone", ["vit_micro_patch4_28", "channelvit_nano_patch4_28"])
@pytest.mark.parametrize(
    "kw", [{}, {"temporal_depth": 0}, {"temporal_dim": 48}, {"frame_pool": "avg", "adapter": True}]
)  # fmt: skip
def test_shapes(backbone, kw):
    model = _model(backbone=backbone, **kw)
    clips = _clips()
    assert model(clips).shape == (3, 11)
    assert model.forward_frame_embeddings(clips).shape == (3, 4, 32)
    assert model.forward_clip_embedding(clips).shape == (3, kw.get("temporal_dim", 32))
    assert model.postprocess(model(clips))["motion"].shape == (3,)


def test_identity_label_defaults_to_ten_classes():
    model = _model(label="identity")
    assert model.num_classes == 10
    assert model.target_keys == ("identity",)
    assert set(model.example_batch()) == {"image", "identity"}
    with pytest.raises(ValueError, match="label must be one of"):
        _model(label="camera")


def test_frozen_spatial_encoder_gets_no_gradient_and_does_not_change():
    model = _model(freeze_spatial=True).train()
    assert not model.spatial.backbone.training  # eval mode even inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, _clips())
    for name, p in model.named_parameters():
        frozen = name.startswith("spatial.")
        assert (p.grad is None) == frozen, name
        assert torch.equal(p, before[name]) == frozen, name
    # the frozen encoder keeps no autograd graph: its output does not require grad
    assert not model.spatial(_clips()).requires_grad


def test_full_finetuning_trains_the_spatial_encoder():
    model = _model().train()
    before = model.spatial.backbone.patch_embed.proj.weight.clone()
    _step(model, _clips())
    assert not torch.equal(model.spatial.backbone.patch_embed.proj.weight, before)


@pytest.mark.parametrize("backbone", ["vit_micro_patch4_28", "channelvit_nano_patch4_28"])
def test_temporal_init_spatial_copies_the_last_blocks_exactly(backbone):
    model = _model(backbone=backbone, temporal_init="spatial", temporal_depth=2, freeze_spatial=True)
    spatial, temporal = model.spatial.backbone.blocks, model.temporal.blocks
    assert len(temporal) == 2
    for s, t in zip(spatial[-2:], temporal, strict=True):
        assert type(s) is type(t)
        assert s.state_dict().keys() == t.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values(), strict=True))
        assert all(p.requires_grad for p in t.parameters())  # copies of frozen blocks are trained
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(s.parameters(), t.parameters(), strict=True))
        x = torch.randn(2, 5, 32)
        assert torch.equal(s.eval()(x), t.eval()(x))
    one = _model(backbone=backbone, temporal_init="spatial", temporal_depth=1)
    assert torch.equal(one.temporal.blocks[0].attn.qkv.weight, one.spatial.backbone.blocks[-1].attn.qkv.weight)


def test_temporal_init_spatial_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="temporal_dim is 48"):
        _model(temporal_init="spatial", temporal_dim=48)
    with pytest.raises(ValueError, match="has 2, temporal_depth is 3"):
        _model(temporal_init="spatial", temporal_depth=3)
    with pytest.raises(ValueError, match="temporal_depth is 0"):
        _model(temporal_init="spatial", temporal_depth=0)
    with pytest.raises(ValueError, match="temporal_init must be"):
        _model(temporal_init="imagenet")


def test_temporal_encoder_sees_order_and_frame_averaging_does_not():
    clips = _clips()
    reverse = clips.flip(1)
    model = _model(temporal_depth=1).eval()
    with torch.no_grad():
        assert not torch.allclose(model(clips), model(reverse), atol=1e-4)
    average = _model(temporal_depth=0).eval()
    assert not hasattr(average.temporal, "pos_embed")
    with torch.no_grad():
        torch.testing.assert_close(average(clips), average(reverse), atol=1e-6, rtol=0)


def test_adapter_changes_the_output_and_trains():
    clips = _clips()
    plain, adapted = _model(freeze_spatial=True).eval(), _model(freeze_spatial=True, adapter=True).eval()
    assert sum(p.numel() for p in adapted.adapter.parameters()) < sum(p.numel() for p in plain.parameters()) / 4
    adapted.load_state_dict(plain.state_dict(), strict=False)  # same encoder, temporal part and head
    with torch.no_grad():
        assert not torch.allclose(plain(clips), adapted(clips), atol=1e-4)
    before = {k: v.clone() for k, v in adapted.adapter.state_dict().items()}
    adapted.train()
    _step(adapted, clips)
    for name, p in adapted.adapter.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
        assert not torch.equal(p, before[name]), name


def test_bad_input_is_named():
    model = _model().eval()
    with pytest.raises(ValueError, match=r"image must be \(B, T, 1, H, W\).*single frame"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="image must hold 4 frames"):
        model(_clips(frames=1))
    with pytest.raises(ValueError, match="image frames must be 16x16"):
        model(_clips(size=32))
    with pytest.raises(ValueError, match=r"batch\['motion'\] must be int64"):
        model.loss(model(_clips()), {"motion": torch.zeros(3)})
    with pytest.raises(ValueError, match="batch has no 'motion'"):
        model.loss(model(_clips()), {"identity": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="hierarchical"):
        create_task_model("vivit_fe", "tiny_vit_1m_28", img_size=32)
    with pytest.raises(ValueError, match="frame_pool must be"):
        _model(frame_pool="max")


def test_vitlab_train_runs_vivit_on_camera_motion_videos(tmp_path, monkeypatch):
    from vitlab.engine import RunConfig, load_trained, train

    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(out=str(tmp_path), name="vivit", log_every=1, device="cpu")
    cfg.task.task, cfg.task.backbone_args = "vivit_fe", '{"embed_dim": 32, "depth": 2, "num_heads": 2}'
    cfg.task.task_args = '{"temporal_depth": 1, "freeze_spatial": true, "adapter": true, "temporal_init": "spatial"}'
    cfg.data.dataset, cfg.model.img_size = "camera_motion_videos", 32
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 16, 8, 8
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1, 0.5
    run = train(cfg)
    summary = (run / "summary.json").read_text()
    assert '"test_top1"' in summary
    assert '"primary_metric": "top1"' in summary
    model, meta, _ = load_trained(run)
    assert isinstance(model, VivitFE)
    assert model.spatial.frozen
    assert model.adapter is not None
    assert meta["task_args"]["temporal_init"] == "spatial"
    clips = torch.randn(2, 8, 1, 32, 32)  # the generator's 8 frames at the run's 32 px
    with torch.no_grad():
        assert model(clips).shape == (2, 11)
