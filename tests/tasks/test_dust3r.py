"""DUSt3R-style pointmaps (paper 37): the loss and metrics against hand computations, Procrustes, the ablation
switch and bad cameras. The registry-wide contract (tests/tasks/test_task_registry.py) covers the generic methods."""

import math

import pytest
import torch

from vitlab.layers.camera import CameraError, axis_angle_to_matrix, pose_from_rt
from vitlab.tasks import create_task_model
from vitlab.tasks.multiview import Dust3R, pairs_from_render3d
from vitlab.tasks.multiview.geometry import depth_errors, pointmap_loss, rotation_angle_deg, umeyama

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(**kw) -> Dust3R:
    torch.manual_seed(0)
    kw = {"img_size": 16, "dec_dim": 32, "dec_depth": 2, **kw}
    return create_task_model("dust3r", kw.pop("backbone", "vit_micro_patch4_28"), backbone_kwargs=TINY, **kw).eval()


def _batch(model: Dust3R, seed: int = 0) -> dict:
    return model.example_batch(3, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kw",
    [{}, {"head": "linear"}, {"pts_mode": "linear"}, {"cross_view": False}, {"backbone": "univitar_nano_patch4_28"}],
)
def test_shapes(kw):
    model = _model(**kw)
    out = model(_batch(model)["image"])
    assert out["pointmap"].shape == (3, 2, 16, 16, 3)
    assert out["confidence"].shape == (3, 2, 16, 16)
    assert (out["confidence"] > 1).all()
    assert model.postprocess(out)["depth"].shape == (3, 16, 16)


def test_loss_equals_hand_computation():
    # one sample, two views of 1 x 2 pixels, one pixel invalid
    gt = torch.tensor([[[[[0.0, 0.0, 2.0], [9.0, 9.0, 9.0]]], [[[0.0, 3.0, 4.0], [0.0, 0.0, 6.0]]]]])
    pred = torch.tensor([[[[[0.0, 0.0, 1.0], [5.0, 5.0, 5.0]]], [[[1.0, 0.0, 1.0], [0.0, 0.0, 2.0]]]]])
    valid = torch.tensor([[[[True, False]], [[True, True]]]])
    conf = torch.tensor([[[[2.0, 7.0]], [[1.5, 3.0]]]])
    # mean distance of the valid points: gt (2 + 5 + 6) / 3, pred (1 + sqrt 2 + 2) / 3
    sg, sp = 13 / 3, (3 + math.sqrt(2)) / 3

    def dist(p, g):
        return math.sqrt(sum((a / sp - b / sg) ** 2 for a, b in zip(p, g, strict=True)))

    e1 = dist([0, 0, 1], [0, 0, 2])
    e2a, e2b = dist([1, 0, 1], [0, 3, 4]), dist([0, 0, 2], [0, 0, 6])
    plain = e1 + (e2a + e2b) / 2  # mean over each view's valid pixels, summed over views
    weighted = (e1 * 2 - 0.2 * math.log(2)) + ((e2a * 1.5 - 0.2 * math.log(1.5)) + (e2b * 3 - 0.2 * math.log(3))) / 2
    assert pointmap_loss(pred, gt, valid).item() == pytest.approx(plain, rel=1e-5)
    assert pointmap_loss(pred, gt, valid, conf, 0.2).item() == pytest.approx(weighted, rel=1e-5)


@pytest.mark.parametrize("confidence", [True, False])
def test_loss_is_invariant_to_the_scale_of_the_ground_truth(confidence):
    model = _model(confidence=confidence)
    batch = _batch(model)
    out = model(batch["image"])
    a = model.loss(out, batch)["loss"]
    b = model.loss(out, {**batch, "pointmap": 13.0 * batch["pointmap"]})["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # and the confidence term matters: without it the loss is the plain regression
    assert (a.item() == pytest.approx(model.loss(out, batch)["regr"].item())) == (not confidence)


def test_metrics_are_zero_for_a_perfect_prediction_and_scale_invariant():
    model = _model()
    batch = _batch(model)
    perfect = {"pointmap": batch["pointmap"], "confidence": torch.ones(3, 2, 16, 16)}
    values = model.evaluate(perfect, batch)
    for key in ("pointmap_err", "depth_absrel", "rot_err_deg"):
        assert torch.allclose(values[key], torch.zeros(3), atol=1e-3), key
    assert torch.equal(values["depth_delta1"], torch.full((3,), 100.0))
    noisy = batch["pointmap"] + 0.2 * torch.randn(batch["pointmap"].shape, generator=torch.Generator().manual_seed(1))
    a = model.evaluate({"pointmap": noisy}, batch)
    b = model.evaluate({"pointmap": 3.7 * noisy}, batch)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-4), key
        assert (a[key] != values[key]).all(), key  # the noise is seen
    metrics = model.build_metrics()
    model.update_metrics(metrics, perfect, batch)
    summary = model.summarize_metrics(metrics)
    assert summary["pointmap_err"] == pytest.approx(0.0, abs=1e-4)
    assert summary["depth_delta1"] == pytest.approx(100.0)


def test_depth_errors_by_hand():
    pred = torch.tensor([[1.0, 2.0, 4.0, 100.0]])
    gt = torch.tensor([[2.0, 4.0, 8.0, 1.0]])
    valid = torch.tensor([[True, True, True, False]])
    absrel, delta = depth_errors(pred, gt, valid)  # median ratio 2: exact on the valid pixels
    assert absrel.item() == pytest.approx(0.0)
    assert delta.item() == 1.0
    absrel, delta = depth_errors(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 2.0]]), valid[:, :3])
    assert absrel.item() == pytest.approx(0.5 / 3)
    assert delta.item() == pytest.approx(2 / 3)


def test_procrustes_recovers_a_known_similarity():
    g = torch.Generator().manual_seed(0)
    R = axis_angle_to_matrix(torch.tensor([[0.3, -1.2, 0.5], [2.5, 0.1, 0.0]]))
    src = torch.randn(2, 50, 3, generator=g)
    dst = 2.5 * (src @ R.transpose(1, 2)) + torch.tensor([1.0, -2.0, 0.5])
    weights = torch.ones(2, 50)
    dst[:, :5] += 100  # outliers with zero weight do not count
    weights[:, :5] = 0
    s, R_hat, t = umeyama(src, dst, weights)
    assert torch.allclose(s, torch.full((2,), 2.5, dtype=s.dtype), atol=1e-6)
    assert torch.allclose(R_hat.float(), R, atol=1e-5)
    assert rotation_angle_deg(R_hat, R).max() < 1e-3
    assert torch.allclose(t.float(), torch.tensor([1.0, -2.0, 0.5]).expand(2, 3), atol=1e-5)
    about_z = axis_angle_to_matrix(torch.tensor([0.0, 0.0, 0.5]))
    assert rotation_angle_deg(torch.eye(3), about_z).item() == pytest.approx(math.degrees(0.5))


@pytest.mark.parametrize("cross_view", [True, False])
def test_cross_view_false_makes_view_2_independent_of_view_1(cross_view):
    model = _model(cross_view=cross_view)
    image = _batch(model)["image"]
    other = image.clone()
    other[:, 0] = torch.randn(other[:, 0].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = model(image), model(other)
    same = torch.allclose(a["pointmap"][:, 1], b["pointmap"][:, 1], atol=1e-6)
    assert same == (not cross_view)
    assert not torch.allclose(a["pointmap"][:, 0], b["pointmap"][:, 0])


def test_bad_cameras_and_inputs_are_named():
    model = _model()
    batch = _batch(model)
    out = model(batch["image"])
    K = batch["K"].clone()
    K[0, 1, 0, 0] = 0
    with pytest.raises(CameraError, match="singular"):
        model.loss(out, {**batch, "K": K})
    pose = batch["cam_to_world"].clone()
    pose[1, 1, :3, :3] *= 2
    with pytest.raises(CameraError, match="not a rotation"):
        model.evaluate(out, {**batch, "cam_to_world": pose})
    reflect = pose_from_rt(torch.diag(torch.tensor([1.0, 1.0, -1.0])), torch.zeros(3)).expand(3, 2, 4, 4)
    with pytest.raises(CameraError, match="not a rotation"):
        model.loss(out, {**batch, "cam_to_world": reflect})
    with pytest.raises(CameraError, match="one per view"):
        model.loss(out, {**batch, "cam_to_world": torch.cat([batch["cam_to_world"], batch["cam_to_world"][:, :1]], 1)})
    with pytest.raises(ValueError, match=r"batch\['pointmap'\]"):
        model.loss(out, {**batch, "pointmap": batch["pointmap"][:, :, :8]})
    nan = batch["pointmap"].clone()
    nan[batch["valid"]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.loss(out, {**batch, "pointmap": nan})
    with pytest.raises(ValueError, match="pair of views"):
        model(batch["image"][:, :1])  # one view only
    broken = batch["image"].clone()
    broken[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(broken)
    with pytest.raises(ValueError, match="num_frames must be 2"):
        _model(num_frames=3)
    with pytest.raises(ValueError, match="hierarchical"):
        create_task_model("dust3r", "tiny_vit_1m_28", img_size=16)


def test_render3d_pairs_follow_the_camera_convention():
    from vitlab.data.synthetic import make_dataset

    data = make_dataset("render3d", split="test", n=2, views=2, size=16)
    batch = pairs_from_render3d(data.collate([data[0], data[1]]), data.mean, data.std)
    model = _model()
    assert batch["image"].shape == (2, 2, 3, 16, 16)
    # view 1's pointmap in its own frame has the depth map as z; view 2's relative pose is recovered exactly
    valid = batch["valid"]
    assert torch.allclose(batch["pointmap"][:, 0, ..., 2][valid[:, 0]], batch["depth"][:, 0][valid[:, 0]], atol=1e-4)
    values = model.evaluate({"pointmap": batch["pointmap"]}, batch)
    assert values["rot_err_deg"].max() < 0.05
    assert values["pointmap_err"].max() < 1e-5


def test_dpt_head_shapes_and_taps_every_decoder_block():
    model = _model(head="dpt")
    assert model.heads[0].taps == 3  # the embedded encoder tokens and both decoder blocks
    batch = _batch(model)
    out = model(batch["image"])
    assert out["pointmap"].shape == (3, 2, 16, 16, 3)
    assert (out["confidence"] > 1).all()
    assert (out["pointmap"] < 0).any()  # a signed output: DPT's final ReLU is off for pointmaps
    # the head reads the intermediate layers: shifting the first decoder block's output while the last block's
    # output is held at its old value moves view 1's prediction under dpt, not under linear (last block only)
    moved = {}
    for name, m in (("dpt", model), ("linear", _model(head="linear"))):
        first, last = m.decoders[0]
        kept = {}
        with torch.no_grad():
            hook = last.register_forward_hook(lambda mod, inp, out, kept=kept: kept.setdefault("last", out))
            base = m(batch["image"])["pointmap"][:, 0]
            hook.remove()
            hooks = [first.register_forward_hook(lambda mod, inp, out: out + 1.0),
                     last.register_forward_hook(lambda mod, inp, out, kept=kept: kept["last"])]  # fmt: skip
            shifted = m(batch["image"])["pointmap"][:, 0]
            for h in hooks:
                h.remove()
        moved[name] = not torch.allclose(base, shifted, atol=1e-6)
    assert moved == {"dpt": True, "linear": False}


def test_bad_head_is_named():
    with pytest.raises(ValueError, match="head must be one of"):
        _model(head="conv")


# --- CroCo cross-view completion pretraining (tasks/multiview/croco.py) ---


def test_croco_mask_hides_exactly_the_ratio_and_keeps_the_rest():
    from vitlab.tasks.multiview.croco import random_mask

    mask, keep = random_mask(5, 16, 0.75, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 16)
    assert keep.shape == (5, 4)
    assert (mask.sum(1) == 12).all()
    for b in range(5):
        assert keep[b].tolist() == (~mask[b]).nonzero()[:, 0].tolist()  # the unmasked ones, in order
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(1, 16, 1.0)


def test_croco_encoder_sees_the_kept_patches_only():
    from vitlab.tasks.multiview.croco import encode_visible, random_mask

    model = _model()
    image = _batch(model)["image"][:, 0]
    enc = model.encoder
    full = enc.patch_tokens(enc(image[:, None]))[:, 0]
    all_kept = torch.arange(16).expand(3, -1)
    torch.testing.assert_close(encode_visible(enc, image, all_kept), full)  # nothing masked: the plain encoder
    mask, keep = random_mask(3, 16, 0.75, torch.Generator().manual_seed(1))
    out = encode_visible(enc, image, keep)
    # changing the pixels of masked patches changes nothing: they never enter the encoder
    noisy = image.clone()
    pix = mask.view(3, 1, 4, 1, 4, 1).expand(3, 3, 4, 4, 4, 4).reshape(3, 3, 16, 16)
    noisy[pix] = torch.randn(int(pix.sum()))
    torch.testing.assert_close(encode_visible(enc, noisy, keep), out)
    assert not torch.allclose(enc.patch_tokens(enc(noisy[:, None]))[:, 0], full)  # (the full encoder does see them)


def test_croco_loss_counts_masked_patches_only_against_normalised_pixels():
    from vitlab.layers.dit import patchify
    from vitlab.tasks.multiview.croco import masked_patch_loss, normalised_patches

    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    torch.testing.assert_close(p[0, 1].view(2, 2, 3).permute(2, 0, 1), img[0, :, 0:2, 2:4])  # patch (row 0, col 1)
    t = normalised_patches(p)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4))
    torch.testing.assert_close(t.std(-1), torch.ones(2, 4), atol=1e-4, rtol=0)
    pred, mask = torch.zeros_like(t), torch.tensor([[True, False, False, False], [False, False, False, True]])
    pred[~mask] = 100.0  # errors on unmasked patches must not count
    expected = (t[mask] ** 2).mean()
    torch.testing.assert_close(masked_patch_loss(pred, t, mask), expected)


def test_croco_pretraining_trains_encoder_and_decoders_and_finetuning_starts_from_them():
    from vitlab.tasks.multiview.croco import CroCoPretrainer, load_croco

    model = _model(head="linear").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre = CroCoPretrainer(model, mask_ratio=0.75)
    opt = torch.optim.SGD(pre.parameters(), lr=0.5)
    image = _batch(model)["image"]
    for view in (1, 0):
        loss = pre.loss(image, view, torch.Generator().manual_seed(view))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key in ("encoder.backbone.blocks.0.attn.qkv.weight", "embed.weight", "decoders.0.1.cross_attn.q.weight",
                "decoders.1.1.cross_attn.q.weight"):  # fmt: skip
        assert not torch.equal(before[key], after[key]), key
    torch.testing.assert_close(after["heads.0.proj.weight"], before["heads.0.proj.weight"])  # untouched
    fresh = _model(head="linear")
    keys = load_croco(fresh, after)
    assert "heads.0.proj.weight" not in keys
    for key in keys:
        torch.testing.assert_close(fresh.state_dict()[key], after[key])
    no_cross = _model(head="linear", cross_view=False)
    loaded = load_croco(no_cross, after)
    assert "decoders.0.0.attn.q.weight" in loaded
    assert not any("cross_attn" in k for k in loaded)
    with pytest.raises(ValueError, match="does not fit"):
        load_croco(_model(head="linear", dec_depth=1), after)
    with pytest.raises(ValueError, match="cross_view=True"):
        CroCoPretrainer(no_cross)
