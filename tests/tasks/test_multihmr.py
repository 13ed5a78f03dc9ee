"""Multi-HMR task model (paper 35): shapes, the loss against a hand computation, log-nearness, rays, NMS, matching."""

import math

import pytest
import torch

from vitlab.layers.camera import intrinsics_from_fov
from vitlab.tasks import create_task_model
from vitlab.tasks.pose3d.multihmr import (
    centre_focal_loss,
    centre_target,
    depth_to_nearness,
    match_detections,
    nearness_to_depth,
    peak_nms,
    reprojection_loss,
)


def _model(**kw):
    kw = {"img_size": 16, "head_dim": 32, "hph_depth": 1, "hph_heads": 2, **kw}
    return create_task_model("multihmr", "vit_micro_patch4_28", backbone_kwargs={"depth": 1}, **kw)


@pytest.mark.parametrize(("head", "pose", "conv_stem"), [("hph", "joints", False), ("mlp", "joints", False),
                                                       ("hph", "rotations", True)])  # fmt: skip
def test_shapes_teacher_forced_and_detected(head, pose, conv_stem):
    model = _model(head=head, pose=pose, conv_stem=conv_stem).train()
    batch = model.example_batch(3, torch.Generator().manual_seed(1))
    out = model(batch["image"], **model.forward_kwargs(batch))
    assert out["score_logits"].shape == (3, 4, 4)
    assert out["offset"].shape == (3, 4, 4, 2)
    assert out["gt_joints_rel"].shape == (3, 3, 15, 3)
    assert out["det_joints_rel"].shape == (3, 3, 15, 3)
    assert out["gt_nearness"].shape == out["det_depth"].shape == (3, 3)
    assert torch.equal(out["gt_joints_rel"][:, :, 0], torch.zeros(3, 3, 3))  # root-relative
    assert ("gt_orient" in out) == (pose == "rotations")
    preds = model.postprocess(out)
    assert preds["joints_cam"].shape == batch["joints_cam"].shape
    assert preds["joints_2d"].shape == batch["joints_2d"].shape
    # the predicted 2-D joints are the projection of the predicted camera-frame joints (those in front of the camera)
    uv = preds["joints_cam"] @ batch["K"][:, None].transpose(-1, -2)
    front = preds["joints_cam"][..., 2] > 0.1
    assert front.any()
    torch.testing.assert_close(preds["joints_2d"][front], (uv[..., :2] / uv[..., 2:])[front], rtol=1e-4, atol=1e-3)


def test_log_nearness_round_trip_and_focal_normalisation():
    z = torch.tensor([0.5, 2.0, 7.5])
    f = torch.tensor([20.0, 40.0, 13.0])
    n = depth_to_nearness(z, f, 16.0)
    assert torch.allclose(nearness_to_depth(n, f, 16.0), z)
    # same apparent size (f / z) -> same nearness, whatever the focal length
    assert torch.allclose(depth_to_nearness(2 * z, 2 * f, 16.0), n)
    assert nearness_to_depth(torch.tensor(-100.0), torch.tensor(16.0), 16.0) == 50.0  # clipped at 50 m


def test_centre_target_and_focal_loss_by_hand():
    centres = torch.tensor([[[5.0, 9.0], [0.0, 0.0]]])  # pixel (5, 9) -> cell (x 1, y 2) at stride 4
    mask = torch.tensor([[1.0, 0.0]])
    target = centre_target(centres, mask, 4, 4.0, 1.0)
    assert target[0, 2, 1] == 1.0
    assert (target == 1).sum() == 1
    assert target[0, 2, 2] == pytest.approx(math.exp(-0.5))
    assert target[0, 0, 3] == pytest.approx(math.exp(-(4 + 4) / 2))
    logits = torch.zeros(1, 4, 4)
    logits[0, 2, 1] = 1.0
    p = torch.sigmoid(logits)
    pos = -((1 - p[0, 2, 1]) ** 2) * torch.log(p[0, 2, 1])
    neg = sum(
        -((1 - target[0, i, j]) ** 4) * p[0, i, j] ** 2 * torch.log(1 - p[0, i, j])
        for i in range(4)
        for j in range(4)
        if (i, j) != (2, 1)
    )
    assert centre_focal_loss(logits, target) == pytest.approx(float(pos + neg), rel=1e-5)


def test_loss_terms_on_a_tiny_case():
    model = _model().train()
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(batch["image"], **model.forward_kwargs(batch))
        losses = model.loss(out, batch)
    m = batch["person_mask"].float()
    rel = batch["joints_cam"] - batch["joints_cam"][:, :, :1]
    l_joints = ((out["gt_joints_rel"] - rel).abs().mean((-1, -2)) * m).sum() / m.sum()
    assert losses["joints"] == pytest.approx(float(l_joints), rel=1e-5)
    f = batch["K"][:, 0, 0]
    n_gt = torch.log(f[:, None] / (16.0 * batch["joints_cam"][:, :, 0, 2].clamp_min(1e-6)))
    l_depth = ((out["gt_nearness"] - n_gt).abs() * m).sum() / m.sum()
    assert losses["nearness"] == pytest.approx(float(l_depth), rel=1e-5)
    parts = losses["focal"] + losses["offset"] + 5 * losses["joints"] + losses["nearness"] + 5 * losses["reproj"]
    assert losses["loss"] == pytest.approx(float(parts), rel=1e-5)
    # the reprojection term places each person from the predicted offset at its true cell and the predicted depth
    cell = (batch["centre_2d"] / 4).floor()
    idx = (cell[..., 1] * 4 + cell[..., 0]).long()
    off = out["offset"].flatten(1, 2).gather(1, idx[..., None].expand(-1, -1, 2))
    vis = batch["joints_vis"] & batch["person_mask"][..., None]
    want = reprojection_loss(out["gt_joints_rel"], out["gt_depth"], (cell + off) * 4, batch["K"], batch["joints_2d"],
                             vis, 16.0)  # fmt: skip
    assert losses["reproj"] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="batch\\['joints_cam'\\]"):
        model.loss(out, {**batch, "joints_cam": batch["joints_cam"][..., :2]})
    with pytest.raises(ValueError, match="batch\\['joints_2d'\\]"):
        model.loss(out, {k: v for k, v in batch.items() if k != "joints_2d"})
    no_2d = _model(w_reproj=0.0).train()
    with torch.no_grad():
        losses = no_2d.loss(no_2d(batch["image"], **no_2d.forward_kwargs(batch)), {**batch, "joints_2d": None})
    assert "reproj" not in losses


def test_rotation_output_goes_through_the_kinematic_tree_and_its_losses():
    from vitlab.data.synthetic.humans import skeleton_from_rotations

    model = _model(pose="rotations").train()
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(batch["image"], **model.forward_kwargs(batch))
        losses = model.loss(out, batch)
    eye = torch.eye(3).expand(2, 3, 1, 3, 3)
    local = torch.cat([eye, out["gt_local_rot"]], 2)
    want = skeleton_from_rotations(local, out["gt_shape"]) @ out["gt_orient"].transpose(-1, -2)
    torch.testing.assert_close(out["gt_joints_rel"], want)
    m = batch["person_mask"].float()
    err = torch.cat([(out["gt_orient"] - batch["orient"]).abs().mean((-1, -2))[..., None],
                     (out["gt_local_rot"] - batch["local_rot"][:, :, 1:]).abs().mean((-1, -2))], -1)  # fmt: skip
    assert losses["rotations"] == pytest.approx(float((err.mean(-1) * m).sum() / m.sum()), rel=1e-5)
    l_shape = ((out["gt_shape"] - batch["shape"]).abs().mean(-1) * m).sum() / m.sum()
    assert losses["shape"] == pytest.approx(float(l_shape), rel=1e-5)
    parts = losses["focal"] + losses["offset"] + 5 * losses["joints"] + losses["nearness"] + 5 * losses["reproj"]
    assert losses["loss"] == pytest.approx(float(parts + losses["rotations"] + losses["shape"]), rel=1e-5)
    # the truth costs nothing in the body terms
    truth = {**batch, "orient": out["gt_orient"], "local_rot": local, "shape": out["gt_shape"]}
    zero = model.loss(out, truth)
    assert float(zero["rotations"]) < 1e-6
    assert float(zero["shape"]) < 1e-6
    with pytest.raises(ValueError, match="batch\\['orient'\\]"):
        model.loss(out, {k: v for k, v in batch.items() if k != "orient"})
    # a zero head starts from an upright person of shape 1 facing the camera: head above the pelvis (image up is
    # -y), the person's left shoulder on the image's right (+x), the chest nearer than the back would be
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    with torch.no_grad():
        rest = model(batch["image"], **model.forward_kwargs(batch))["gt_joints_rel"][0, 0]
    head, l_sh, r_sh = rest[2], rest[3], rest[6]
    assert head[1] < -0.5
    assert abs(float(head[0])) < 1e-6
    assert l_sh[0] > 0 > r_sh[0]
    with pytest.raises(ValueError, match="pose must be one of"):
        _model(pose="smplx")


def _tiny_reprojection_case():
    """One person, root 2 m straight ahead (centre at the principal point), three joints; f = 10, img 16."""
    K = torch.tensor([[[10.0, 0.0, 8.0], [0.0, 10.0, 8.0], [0.0, 0.0, 1.0]]])
    rel = torch.tensor([[[[0.0, 0.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.4, 2.0]]]])  # -> (8, 8), (9, 8), (8, 9) px
    depth, centre = torch.tensor([[2.0]]), torch.tensor([[[8.0, 8.0]]])
    target = torch.tensor([[[[8.0, 9.0], [float("nan"), 3.0], [7.0, 9.0]]]])  # joint 1 invisible, its target NaN
    vis = torch.tensor([[[True, False, True]]])
    return rel, depth, centre, K, target, vis


def test_reprojection_loss_by_hand_and_invisible_joints_do_not_count():
    from vitlab.tasks.pose3d.multihmr_parts import project_people

    rel, depth, centre, K, target, vis = _tiny_reprojection_case()
    uv = project_people(rel, depth, centre, K)
    torch.testing.assert_close(uv[0, 0], torch.tensor([[8.0, 8.0], [9.0, 8.0], [8.0, 9.0]]))
    # visible errors |du| + |dv|: joint 0: 0 + 1, joint 2: 1 + 0; mean over (u, v) and the 2 joints, / 16 px
    loss = reprojection_loss(rel, depth, centre, K, target, vis, 16.0)
    assert float(loss) == pytest.approx((0.5 + 0.5) / 2 / 16)
    moved = target.clone()
    moved[0, 0, 1] = torch.tensor([100.0, -50.0])  # an invisible joint's target moves: nothing changes
    assert float(reprojection_loss(rel, depth, centre, K, moved, vis, 16.0)) == float(loss)
    assert float(reprojection_loss(rel, depth, centre, K, target, torch.zeros_like(vis), 16.0)) == 0.0


def test_reprojection_loss_gradient_reaches_depth_and_visible_joints():
    rel, depth, centre, K, target, vis = _tiny_reprojection_case()
    rel, depth = rel.clone().requires_grad_(), depth.clone().requires_grad_()
    target[0, 0, 2] = torch.tensor([9.0, 10.0])  # joint 2 off in u and v: its error depends on depth too
    reprojection_loss(rel, depth, centre, K, target, vis, 16.0).backward()
    assert depth.grad.abs() > 0
    assert rel.grad[0, 0, 0].abs().sum() > 0
    assert rel.grad[0, 0, 2].abs().sum() > 0
    assert torch.equal(rel.grad[0, 0, 1], torch.zeros(3))  # the invisible joint gets no gradient
    # and through the model: the teacher-forced nearness and joints get gradient from the reprojection term alone
    model = _model().train()
    batch = model.example_batch(2, torch.Generator().manual_seed(4))
    out = model(batch["image"], **model.forward_kwargs(batch))
    out["gt_nearness"].retain_grad()
    out["gt_joints_rel"].retain_grad()
    model.loss(out, batch)["reproj"].backward()
    m = batch["person_mask"]
    assert (out["gt_nearness"].grad[m] != 0).all()
    assert out["gt_joints_rel"].grad[m].abs().sum() > 0
    assert torch.equal(out["gt_nearness"].grad[~m], torch.zeros_like(out["gt_nearness"].grad[~m]))


def test_reprojection_loss_is_zero_for_the_truth():
    model = _model()
    batch = model.example_batch(3, torch.Generator().manual_seed(5))
    joints, mask = batch["joints_cam"], batch["person_mask"]
    depth = torch.where(mask, joints[:, :, 0, 2], torch.ones_like(joints[:, :, 0, 2]))
    loss = reprojection_loss(joints - joints[:, :, :1], depth, batch["centre_2d"], batch["K"], batch["joints_2d"],
                             batch["joints_vis"], 16.0)  # fmt: skip
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert batch["joints_vis"].sum() > 0


@pytest.mark.parametrize("ray_embed", [True, False])
def test_ray_embedding_makes_the_head_see_the_camera(ray_embed):
    torch.manual_seed(0)
    model = _model(ray_embed=ray_embed).eval()
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    K1 = intrinsics_from_fov(torch.full((2,), math.radians(50.0)), 16, 16)
    K2 = intrinsics_from_fov(torch.full((2,), math.radians(85.0)), 16, 16)
    kw = {"centre_2d": batch["centre_2d"], "person_mask": batch["person_mask"]}
    with torch.no_grad():
        a, b = model(batch["image"], K=K1, **kw), model(batch["image"], K=K2, **kw)
    for key in ("score_logits", "gt_joints_rel", "gt_nearness"):
        assert torch.allclose(a[key], b[key]) != ray_embed, key


def test_bad_cameras_are_named():
    model = _model().eval()
    image = model.example_batch(2)["image"]
    with pytest.raises(ValueError, match="K must be"):
        model(image, K=torch.eye(3))
    with pytest.raises(ValueError, match="K"):
        model(image, K=torch.zeros(2, 3, 3))


def test_nms_picks_peaks():
    scores = torch.zeros(1, 5, 5)
    scores[0, 1, 1], scores[0, 1, 2] = 0.9, 0.8  # a neighbour of a higher peak is suppressed
    scores[0, 3, 4] = 0.6
    scores[0, 4, 0] = 0.2  # a peak below the threshold
    idx, top, valid = peak_nms(scores, 3, 0.3)
    assert idx[0].tolist() == [6, 19, 20]
    assert top[0].tolist() == pytest.approx([0.9, 0.6, 0.2])
    assert valid[0].tolist() == [True, True, False]


def test_matching_is_greedy_within_radius():
    pred = torch.tensor([[10.0, 10.0], [30.0, 30.0], [11.0, 10.0]])
    gt = torch.tensor([[10.5, 10.0], [50.0, 50.0]])
    pairs = match_detections(pred, torch.tensor([True, True, True]), gt, torch.tensor([True, True]), 4.0)
    assert pairs == [(0, 0)] or pairs == [(2, 0)]
    assert match_detections(pred, torch.tensor([False, True, False]), gt, torch.tensor([True, True]), 4.0) == []


def test_perfect_detections_score_full_f1_and_zero_error():
    model = _model().eval()
    batch = model.example_batch(2, torch.Generator().manual_seed(3))
    mask, joints = batch["person_mask"], batch["joints_cam"]
    out = {
        "score_logits": torch.zeros(2, 4, 4),
        "det_valid": mask,
        "det_centre": batch["centre_2d"],
        "det_joints_rel": joints - joints[:, :, :1],
        "det_depth": joints[:, :, 0, 2],
        "det_root": joints[:, :, 0],
    }
    metrics = model.build_metrics()
    model.update_metrics(metrics, out, batch)
    s = model.summarize_metrics(metrics)
    assert s["f1"] == pytest.approx(100.0)
    assert s["mpjpe"] == pytest.approx(0.0, abs=1e-3)
    assert s["mrpe"] == pytest.approx(0.0, abs=1e-3)
    assert s["matched"] == mask.sum()


def test_batch_from_humans_agrees_with_the_set_and_draws(tmp_path):
    from vitlab.data.synthetic.humans import skeleton_from_rotations
    from vitlab.data.synthetic.humans_sets import generate_stick_humans
    from vitlab.tasks.pose3d.draw import project_skeletons
    from vitlab.tasks.pose3d.multihmr import batch_from_humans

    data = generate_stick_humans(n=3, size=32, views=2, cache=False)
    raw = data.collate([data[i] for i in range(3)])
    batch = batch_from_humans(raw, view=1)
    assert batch["image"].dtype == torch.uint8  # the engine's loader normalises it
    mask = batch["person_mask"]
    # the camera-frame joints project onto the set's own 2-D joints (what predict draws in green)
    uv = project_skeletons(batch["joints_cam"][mask], batch["K"][:, None].expand(-1, mask.shape[1], -1, -1)[mask])
    torch.testing.assert_close(uv, raw["joints_2d"][:, 1][mask], atol=1e-3, rtol=0)
    vis = batch["joints_vis"]  # visible joints: inside the image, of a person present; their 2-D joints kept
    assert vis.any()
    assert not (vis & ~mask[..., None]).any()
    assert not (vis & ~raw["in_image"][:, 1]).any()
    torch.testing.assert_close(batch["joints_2d"][vis], raw["joints_2d"][:, 1][vis])
    assert torch.isfinite(batch["joints_2d"]).all()
    norm = batch_from_humans(raw, data.mean, data.std, view=1)["image"]
    assert norm.dtype == torch.float32
    assert norm.mean().abs() < 1.5
    # the body targets (orientation in this camera's frame, bone rotations, shape) rebuild the camera-frame joints
    rel = skeleton_from_rotations(batch["local_rot"], batch["shape"]) @ batch["orient"].transpose(-1, -2)
    joints = batch["joints_cam"]
    torch.testing.assert_close(rel[mask], (joints - joints[:, :, :1])[mask], atol=1e-5, rtol=0)
    behind = project_skeletons(torch.tensor([[[0.0, 0.0, -1.0]] * 15]), batch["K"][0])
    assert torch.isnan(behind).all()


def test_pa_mpjpe_ignores_a_similarity_but_not_articulation():
    from vitlab.layers.camera import random_rotation
    from vitlab.tasks.pose3d.multihmr_parts import person_errors

    g = torch.Generator().manual_seed(3)
    gt = 0.3 * torch.randn(15, 3, generator=g)
    gt = gt - gt[:1]
    R = random_rotation(1, generator=g)[0]
    turned = 1.2 * gt @ R.T
    root = torch.tensor([0.1, 0.2, 3.0])
    e = person_errors(turned, gt, root + torch.tensor([0.0, 0.0, 0.5]), root)
    assert e["pa_mpjpe"] < 1e-3
    assert e["mpjpe"] > 50
    assert e["depth"] == pytest.approx(500.0, rel=1e-4)
    assert e["mrpe"] == pytest.approx(500.0, rel=1e-4)
    bent = gt.clone()
    bent[5] += torch.tensor([0.0, 0.3, 0.0])  # one joint moved 30 cm: no similarity undoes it
    assert person_errors(bent, gt, root, root)["pa_mpjpe"] > 5


def test_yaw_errors_recover_a_rotation_about_up():
    from vitlab.data.synthetic.humans import forward_kinematics, named_pose
    from vitlab.tasks.pose3d.multihmr_parts import yaw_errors

    angles = torch.stack([named_pose("walking"), named_pose("t_pose")])
    world = forward_kinematics(angles, torch.ones(2, 4), torch.zeros(2, 3), torch.tensor([0.3, 2.0]))
    rel = world - world[:, :1]
    turned = forward_kinematics(angles, torch.ones(2, 4), torch.zeros(2, 3), torch.tensor([0.3 + 0.5, 2.0 - 2.5]))
    turned = turned - turned[:, :1]
    # a camera frame tilted away from the world: the same rotation applied to joints and to the up axis
    tilt = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.4, 0.2], [0.4, 0.0, -0.7], [-0.2, 0.7, 0.0]]))
    up = torch.tensor([0.0, 0.0, 1.0]) @ tilt.T
    out = yaw_errors(turned @ tilt.T, rel @ tilt.T, up.expand(2, 3))
    torch.testing.assert_close(out["yaw"], torch.tensor([0.5, 2.5]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["mpjpe_yaw"], torch.zeros(2), atol=1e-5, rtol=0)  # undone by the best turn
    assert float((turned - rel).norm(dim=-1).mean()) > 0.1  # while the plain MPJPE sees the turn
    with pytest.raises(ValueError, match="up"):
        yaw_errors(rel, rel, up)
