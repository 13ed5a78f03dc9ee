"""MvP task model (paper 36): data adapter on generated scenes, set loss and matching, the AP protocol, refinement
starting as the identity, view-order invariance with mean fusion, camera errors, the skeleton picture, precomputed
feature maps in place of the backbone (the oracle benchmark's hook)."""

import numpy as np
import pytest
import torch

from vitlab.data.synthetic.humans_sets import generate_stick_humans
from vitlab.layers.camera import CameraError
from vitlab.tasks import create_task_model
from vitlab.tasks.pose3d import batch_from_humans_views
from vitlab.tasks.pose3d.mvp_parts import (
    average_precision,
    joint_heatmaps,
    match_people,
    set_loss,
    skeleton_picture,
)

torch.set_num_threads(1)
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(**kw):
    args = {"img_size": 32, "num_views": 3, "dim": 16, "heads": 2, "depth": 2, "ffn": 32, "num_points": 2,
            "num_people": 4, "backbone_kwargs": TINY, **kw}  # fmt: skip
    torch.manual_seed(0)
    return create_task_model("mvp", "vit_micro_patch4_28", **args)


@pytest.fixture(scope="module")
def scenes():
    data = generate_stick_humans("test", n=3, seed=5, views=3, size=32, max_people=3, cache=False)
    return data, data.collate([data[i] for i in range(len(data))])


def test_data_adapter_on_generated_scenes(scenes):
    data, raw = scenes
    batch = batch_from_humans_views(raw, data.mean, data.std, views=2)
    assert batch["image"].shape == (3, 2, 3, 32, 32)
    assert batch["image"].dtype == torch.float32
    expected = (raw["views"][:, :2].float() / 255 - data.mean[0]) / data.std[0]
    torch.testing.assert_close(batch["image"][:, :, 0], expected[:, :, 0])
    assert torch.equal(batch["K"], raw["K"][:, :2])
    assert torch.equal(batch["joints_3d"], raw["joints_3d"])
    assert batch_from_humans_views(raw)["image"].dtype == torch.uint8  # the engine normalises it
    with pytest.raises(ValueError, match="views=4"):
        batch_from_humans_views(raw, views=4)
    model = _model().eval()
    full = batch_from_humans_views(raw, data.mean, data.std)
    with torch.no_grad():
        out = model(full)
    assert out["joints"].shape == (3, 4, 15, 3)
    assert out["aux_joints"].shape == (2, 3, 4, 15, 3)
    assert torch.isfinite(model.loss(out, full)["loss"])


def test_refinement_starts_as_identity_and_points_stay_in_space():
    model = _model().eval()
    batch = model.example_batch(2)
    with torch.no_grad():
        out = model(batch)
    # zero-initialised offset heads: every layer returns the initial reference points
    torch.testing.assert_close(out["aux_joints"][0], out["aux_joints"][1])
    lo = model.space_center - model.space_size / 2
    assert (out["joints"] >= lo).all()
    assert (out["joints"] <= lo + model.space_size).all()


def test_set_loss_is_zero_for_perfect_predictions_and_matching_finds_the_permutation():
    torch.manual_seed(0)
    gt = torch.rand(2, 3, 15, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    order = torch.tensor([3, 0, 1, 2])  # queries predict persons 2, (junk), 0, 1
    joints = torch.cat([torch.rand(2, 1, 15, 3), gt], 1)[:, order]
    present = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask], 1)[:, order]
    logits = torch.where(present, 30.0, -30.0)
    pairs = match_people(logits, joints, gt, mask, 2.0, 5.0)
    assert pairs[0][0].tolist() == [2, 3]
    assert pairs[0][1].tolist() == [0, 1]
    assert pairs[1][0].tolist() == [0, 2, 3]
    assert pairs[1][1].tolist() == [2, 0, 1]
    focal, l1 = set_loss(logits, joints, gt, mask)
    assert l1.item() == 0.0
    assert focal.item() < 1e-9
    worse = set_loss(logits, joints + 0.01, gt, mask)
    assert worse[1].item() == pytest.approx(0.01, abs=1e-5)


def test_average_precision_by_hand():
    scores, errors, keys = np.array([0.9, 0.8, 0.7]), np.array([10.0, 30.0, 200.0]), np.array([0, 0, 1])
    ap, recall, mpjpe = average_precision(scores, errors, keys, 2, 50.0)  # TP, FP (person taken), FP (too far)
    assert (ap, recall, mpjpe) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(10.0))
    ap, recall, mpjpe = average_precision(scores, errors, keys, 2, 250.0)  # TP, FP, TP: 0.5 * 1 + 0.5 * 2/3
    assert (ap, recall, mpjpe) == (pytest.approx(0.5 + 1 / 3), pytest.approx(1.0), pytest.approx(105.0))


def test_metrics_of_perfect_predictions():
    model = _model()
    batch = model.example_batch(2)
    mask = batch["person_mask"]
    out = {"joints": batch["joints_3d"].clone(), "logits": torch.where(mask, 5.0, -5.0)}
    metrics = model.build_metrics()
    for _ in range(2):  # the same scenes twice count as 4 scenes: keys must not collide
        model.update_metrics(metrics, out, batch)
    s = model.summarize_metrics(metrics)
    assert s["ap25"] == pytest.approx(100.0)
    assert s["recall"] == pytest.approx(100.0)
    assert s["mpjpe"] == 0.0
    assert s["people"] == 2 * float(mask.sum())
    shifted = {**out, "joints": out["joints"] + torch.tensor([0.0, 0.0, 0.04])}  # 40 mm off
    metrics = model.build_metrics()
    model.update_metrics(metrics, shifted, batch)
    s = model.summarize_metrics(metrics)
    assert s["ap25"] == 0.0
    assert s["ap50"] == pytest.approx(100.0)
    assert s["mpjpe"] == pytest.approx(40.0, abs=1e-3)


def test_mean_fusion_is_invariant_to_view_order():
    model = _model(fusion="mean").eval()
    batch = model.example_batch(2)
    perm = torch.tensor([1, 2, 0])
    permuted = {**batch, **{k: batch[k][:, perm] for k in ("image", "K", "cam_to_world")}}
    with torch.no_grad():
        a, b = model(batch), model(permuted)
    torch.testing.assert_close(a["joints"], b["joints"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)


def test_dense_attention_trains():
    model = _model(attention="dense").train()
    batch = model.example_batch(2)
    model.loss(model(batch), batch)["loss"].backward()
    assert model.key_pos.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_bad_cameras_and_inputs_are_named():
    model = _model().eval()
    batch = model.example_batch(1)
    image, K, c2w = batch["image"], batch["K"], batch["cam_to_world"]
    with pytest.raises(ValueError, match="needs the views' cameras"):
        model(image)
    singular = K.clone()
    singular[0, 2, 1, 1] = 0.0
    with pytest.raises(CameraError, match="singular"):
        model(image, K=singular, cam_to_world=c2w)
    reflected = c2w.clone()
    reflected[0, 1, :3, 0] *= -1
    with pytest.raises(CameraError, match="not a rotation"):
        model(image, K=K, cam_to_world=reflected)
    with pytest.raises(CameraError, match="one per view of 3 views"):
        model(image, K=K[:, :2], cam_to_world=c2w[:, :2])
    with pytest.raises(ValueError, match="hold 3 frames"):
        model(image[:, :2], K=K[:, :2], cam_to_world=c2w[:, :2])
    with pytest.raises(ValueError, match="person_mask"):
        model.loss(model(batch), {**batch, "person_mask": batch["person_mask"].float()})
    with pytest.raises(ValueError, match="attention"):
        _model(attention="global")


def test_skeleton_picture_draws_people(scenes):
    data, raw = scenes
    people = raw["joints_3d"]
    valid = raw["person_mask"]
    picture = skeleton_picture(raw["views"], raw["K"], raw["cam_to_world"], people, valid, scale=2)
    assert picture.size == (3 * 32 * 2, 3 * 32 * 2)
    plain = raw["views"].permute(0, 3, 1, 4, 2).reshape(3 * 32, 3 * 32, 3).numpy().repeat(2, 0).repeat(2, 1)
    assert (np.asarray(picture) != plain).any(-1).mean() > 0.01  # bones were drawn
    # vitlab predict's hook: the model draws its own postprocessed people over the scenes
    model = _model().eval()
    with torch.no_grad():
        pred = model.postprocess(model(batch_from_humans_views(raw, data.mean, data.std)))
    assert model.draw_prediction(raw, pred, None).size == (3 * 32 * 4, 3 * 32 * 4)


def test_joint_heatmaps_peak_at_the_projection_and_the_option_trains():
    model = _model(w_heatmap=1.0)
    batch = model.example_batch(1)
    K, c2w = batch["K"], batch["cam_to_world"]
    # a joint on the ray through the centre of map cell (row 2, col 5) of view 0 (img 32, map 8x8: 4 px cells)
    ray = torch.linalg.solve(K[0, 0], torch.tensor([5.5 * 4, 2.5 * 4, 1.0]))
    point = c2w[0, 0, :3, :3] @ (ray * 3.0) + c2w[0, 0, :3, 3]
    joints = point.expand(1, 1, 15, 3)
    maps = joint_heatmaps(joints, torch.ones(1, 1, dtype=torch.bool), K, c2w, 32, (8, 8))
    assert maps.shape == (1, 3, 15, 8, 8)
    assert maps[0, 0, 0, 2, 5] == pytest.approx(1.0, abs=1e-4)
    assert maps[0, 0, 0].argmax() == 2 * 8 + 5
    assert joint_heatmaps(joints, torch.zeros(1, 1, dtype=torch.bool), K, c2w, 32, (8, 8)).sum() == 0
    out = model(batch)
    losses = model.loss(out, batch)
    assert out["heatmaps"].shape == (1, 3, 15, 8, 8)
    assert losses["heatmap"] > 0
    losses["loss"].backward()
    assert model.heatmap_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["projective", "dense"])
def test_multi_level_maps_shapes_and_gradients(attention):
    model = _model(levels=3, attention=attention).train()
    assert model.level_sizes == [(8, 8), (16, 16), (4, 4)]  # 32 px, patch 4: the map, 2x finer, 2x coarser
    batch = model.example_batch(2)
    out = model(batch)
    assert out["joints"].shape == (2, 4, 15, 3)
    model.loss(out, batch)["loss"].backward()
    assert model.upsample.weight.grad.abs().sum() > 0  # the finer level is read
    if attention == "dense":
        assert model.key_pos.shape == (64 + 256 + 16, 16)
    else:
        assert model.layers[0].cross.sampling_offsets.out_features == 2 * 3 * 2 * 2  # heads x levels x points x 2
    assert _model(levels=1).upsample is None
    with pytest.raises(ValueError, match="levels must be 1, 2 or 3"):
        _model(levels=4)


def test_coordinate_fusion_tells_the_query_where_it_is():
    model = _model(coords=True).eval()
    attn = model.layers[0].cross
    assert attn.output_proj.in_features == 3 * (16 + 2) + 3
    K, c2w = model.example_batch(1)["K"], model.example_batch(1)["cam_to_world"]
    value = torch.zeros(1, 3, 16, 8, 8)  # no image evidence: the output depends on the point alone
    q = torch.zeros(1, 2, 16)
    pts = torch.tensor([[[0.0, 0.0, 0.9], [0.5, -0.3, 1.2]]])
    with torch.no_grad():
        out = attn(q, pts, value, K, c2w, (32, 32))
    assert not torch.allclose(out[0, 0], out[0, 1])
    with pytest.raises(ValueError, match="coords=True needs fusion='concat'"):
        _model(coords=True, fusion="mean")


def test_heatmap_pretraining_loss_trains_the_backbone_only():
    model = _model(w_heatmap=1.0)
    batch = model.example_batch(2)
    loss = model.heatmap_pretrain_loss(batch)
    loss.backward()
    assert model.heatmap_head.weight.grad.abs().sum() > 0
    assert model.input_proj.weight.grad.abs().sum() > 0
    assert model.layers[0].cross.value_proj.weight.grad is None  # the decoder is not part of this stage
    with torch.no_grad():  # the same value as the heatmap term of the full loss
        full = model.loss(model(batch), batch)["heatmap"]
    torch.testing.assert_close(loss.detach(), full)
    with pytest.raises(ValueError, match="w_heatmap > 0"):
        _model().heatmap_pretrain_loss(batch)


@pytest.mark.parametrize("attention", ["projective", "dense"])
def test_precomputed_features_replace_the_backbone(attention):
    model = _model(levels=3, attention=attention).eval()
    batch = model.example_batch(2)
    B, V = batch["image"].shape[:2]
    with torch.no_grad():  # the backbone's own levels, handed in: the same output, the image no longer read
        own = [m.unflatten(0, (B, V)) for m in model.pyramid(model.forward_image(batch["image"]).flatten(0, 1))]
        a = model(batch)
        b = model(None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=own)
        c = model({k: v for k, v in batch.items() if k != "image"}, features=own)
        other = model(
            None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=[torch.zeros_like(m) for m in own]
        )
    torch.testing.assert_close(a["joints"], b["joints"])
    torch.testing.assert_close(a["logits"], c["logits"])
    assert not torch.allclose(a["logits"], other["logits"])  # the features are what the decoder reads (the joints
    # start as the reference points: the refinement is zero-initialised)
    feats = [m.clone().requires_grad_(True) for m in own]
    model.train()
    model.loss(model(None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=feats), batch)["loss"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert model.backbone.patch_embed.proj.weight.grad is None  # the backbone is not run
    with pytest.raises(ValueError, match="levels=3 maps"):
        model(None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=own[:2])
    with pytest.raises(ValueError, match="features level 1 must be"):
        model(None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=[own[0], own[1][:, :, :8], own[2]])
    if attention == "dense":  # its key embedding fixes the map sizes; projective reads any size
        with pytest.raises(ValueError, match=r"features level 2 must be .*4, 4"):
            model(None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=[*own[:2], own[1]])
    else:
        model(None, K=batch["K"], cam_to_world=batch["cam_to_world"], features=[*own[:2], own[1]])
