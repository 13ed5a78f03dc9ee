"""DVGFormer: causality over frames, the cached-feature path equals the full forward, the loss against a reference,
the state-only baseline ignores frames, the frozen encoder stays fixed, and bad inputs are named."""

import pytest
import torch

from vitlab.tasks import create_task_model

T, K = 4, 2


def _model(**kw):
    torch.manual_seed(0)
    return create_task_model(
        "dvgformer", "vit_micro_patch4_28", img_size=16, num_frames=T, substeps=K, embed_dim=32, depth=2, num_heads=2,
        backbone_kwargs={"depth": 2}, **kw,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return _model()


def _batch(model, seed=0):
    return model.example_batch(batch_size=2, generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_token_count(model):
    b = _batch(model)
    out = model(b)
    assert out["actions"].shape == (2, T, K, 5)
    assert out["stop"].shape == (2, T)
    assert model.tokens_per_frame == 2 * 3 * 3 + 1 + K
    assert _model(in_chans=1).tokens_per_frame == 3 * 3 + 1 + K
    assert _model(use_images=False).tokens_per_frame == 1 + K


@torch.no_grad()
def test_causal_over_frames(model):
    # frame t's outputs do not depend on later frames or poses; they do depend on earlier ones
    b = _batch(model)
    image, state = b["image"].clone(), b["state"].clone()
    image[:, 2:] = torch.randn_like(image[:, 2:])
    state[:, 2:] += 1
    a, c = model(b), model(image, state)
    assert torch.allclose(a["actions"][:, :2], c["actions"][:, :2], atol=1e-6)
    assert torch.allclose(a["stop"][:, :2], c["stop"][:, :2], atol=1e-6)
    assert not torch.allclose(a["actions"][:, 2:], c["actions"][:, 2:], atol=1e-4)
    image[:, 0] = torch.randn_like(image[:, 0])
    assert not torch.allclose(model(image, b["state"])["actions"][:, 3], a["actions"][:, 3], atol=1e-4)


@torch.no_grad()
def test_cached_features_and_prefix_equal_full_forward(model):
    b = _batch(model)
    full = model(b)
    feats = model.encode_frames(b["image"])
    assert feats.shape == (2, T, 2, 9, model.encoder.embed_dim)
    seq = model.forward_sequence(feats, b["state"])
    assert torch.allclose(seq["actions"], full["actions"], atol=1e-6)
    prefix = model.forward_sequence(feats[:, :2], b["state"][:, :2])  # the closed loop's growing prefix
    assert torch.allclose(prefix["actions"], full["actions"][:, :2], atol=1e-5)
    with pytest.raises(ValueError, match="num_frames"):
        model.forward_sequence(torch.cat([feats, feats], 1), torch.cat([b["state"]] * 2, 1))


def test_loss_matches_reference(model):
    b = _batch(model)
    out = model(b)
    p = out["stop"].sigmoid()
    y = b["stop"]
    pt = p * y + (1 - p) * (1 - y)
    focal = (-(0.9 * y + 0.1 * (1 - y)) * (1 - pt) ** 2 * pt.log()).mean()  # Lin et al. with alpha 0.9, gamma 2
    ref = (out["actions"] - b["actions"]).abs().mean() + 0.1 * focal
    assert torch.allclose(model.loss(out, b)["loss"], ref, atol=1e-6)
    with pytest.raises(ValueError, match=r"batch\['stop'\]"):
        model.loss(out, {**b, "stop": b["stop"][:, :2]})
    with pytest.raises(ValueError, match="'actions'"):
        model.loss(out, {"stop": b["stop"]})


@torch.no_grad()
def test_state_only_ignores_frames_and_needs_state():
    m = _model(use_images=False)
    assert m.encoder is None
    b = _batch(m)
    a = m(b)["actions"]
    assert torch.equal(a, m(torch.randn_like(b["image"]), b["state"])["actions"])
    assert not torch.allclose(a, m(b["image"], b["state"] + 1)["actions"])
    with pytest.raises(ValueError, match="needs the camera pose"):
        m.forward_sequence(None, None)


def test_encoder_stays_frozen():
    m = _model().train()
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert not m.encoder.backbone.training
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    b = _batch(m)
    m.loss(m(b), b)["loss"].backward()
    opt.step()
    assert all(torch.equal(v, m.encoder.state_dict()[k]) for k, v in before.items())


def test_bad_state_and_streams(model):
    b = _batch(model)
    with pytest.raises(ValueError, match=r"state must be the camera pose"):
        model(b["image"], b["state"][:, :, :3])
    with pytest.raises(ValueError, match=r"state must be the camera pose"):
        model(b["image"], b["state"][:1])
    with pytest.raises(ValueError, match="in_chans is the number of frame streams"):
        _model(in_chans=3)
    assert model.forward_kwargs(b).keys() == {"state"}


def test_forward_sequence_names_mismatched_features_and_state(model):
    b = _batch(model)
    features = model.encode_frames(b["image"])
    with pytest.raises(ValueError, match="state must be the pose per frame"):
        model.forward_sequence(features, b["state"][..., :4])
    with pytest.raises(ValueError, match="state must be the pose per frame"):
        model.forward_sequence(features, b["state"][:, :-1])
    with pytest.raises(ValueError, match="features must be encode_frames'"):
        model.forward_sequence(torch.cat([features, features], 2), b["state"])
