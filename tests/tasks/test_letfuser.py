"""LeTFuser (paper 38): GradNorm against a hand computation, the semantic depth cloud's cells, camera layouts,
ablation switches and input checks. The registry-wide contract is in test_task_registry.py."""

import math

import numpy as np
import pytest
import torch

from vitlab.layers.camera import CameraError
from vitlab.tasks import create_task_model
from vitlab.tasks.driving import GradNorm, SemanticDepthCloud

TINY = {"backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "img_size": 16, "channels": 16,
        "hidden": 16, "sdc_grid": 8}  # fmt: skip


def _model(**kw):
    torch.manual_seed(0)
    return create_task_model("letfuser", "vit_micro_patch4_28", **{**TINY, **kw})


def _losses(W: torch.Tensor) -> torch.Tensor:
    # |grad L1| = |6 W| = 6 sqrt(5), |grad L2| = |(2, 0)| = 2 at W = (1, 2)
    return torch.stack([3 * (W * W).sum(), 2 * W[0]])


def test_gradnorm_matches_a_hand_computation():
    W = torch.tensor([1.0, 2.0], requires_grad=True)
    g1, g2 = 6 * math.sqrt(5), 2.0
    gn = GradNorm(2, alpha=1.5)
    # first call: L(0) := L, so every r_i = 1 and the target is mean(G) for both tasks
    total, logs = gn(_losses(W), W)
    target = (g1 + g2) / 2
    assert logs["gradnorm_loss"].item() == pytest.approx(abs(g1 - target) + abs(g2 - target), rel=1e-5)
    assert total.item() == pytest.approx(15 + 2 + abs(g1 - target) + abs(g2 - target), rel=1e-5)
    total.backward()
    assert gn.weights.grad.tolist() == pytest.approx([g1, -g2], rel=1e-5)  # sign(G_i - target) * |grad L_i|
    assert W.grad.tolist() == pytest.approx([6 + 2, 12])  # the network sees sum w_i L_i with w held constant
    # later: weights renormalised to sum 2, r_i from L(0), and the alpha = 1.5 asymmetry
    with torch.no_grad():
        gn.weights.copy_(torch.tensor([3.0, 1.0]))
        gn.initial.copy_(torch.tensor([30.0, 1.0]))
    gn.weights.grad = None
    total, logs = gn(_losses(W), W)
    w = (1.5, 0.5)
    ratio = (15 / 30, 2 / 1)
    r = [x / (sum(ratio) / 2) for x in ratio]
    G = (w[0] * g1, w[1] * g2)
    targets = [(G[0] + G[1]) / 2 * ri**1.5 for ri in r]
    expected = abs(G[0] - targets[0]) + abs(G[1] - targets[1])
    assert gn.weights.tolist() == pytest.approx(list(w))
    assert logs["gradnorm_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(w[0] * 15 + w[1] * 2 + expected, rel=1e-5)
    total.backward()
    assert gn.weights.grad.tolist() == pytest.approx([g1, -g2], rel=1e-5)
    # outside training nothing is learned or stored
    gn.eval()
    total, _ = gn(_losses(W), W)
    assert total.item() == pytest.approx(1.5 * 15 + 0.5 * 2)


def test_semantic_depth_cloud_puts_points_in_their_cells():
    S, G = 16, 8
    cloud = SemanticDepthCloud(num_classes=3, grid=G, extent=24.0)
    K = torch.tensor([[S, 0, S / 2], [0, S, S / 2], [0, 0, 1.0]])
    pose = torch.eye(4)  # camera 1 m up, looking along ego +x: camera x = -ego y, y = -ego z, z = ego x
    pose[:3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    pose[2, 3] = 1.0
    depth = torch.zeros(1, 1, S, S)
    probs = torch.zeros(1, 1, 3, S, S)
    probs[..., 2, :, :] = 1.0
    depth[0, 0, S // 2, S // 2] = 10.0  # ego (10, -10 * 0.5 / S, 1 - 10 * 0.5 / S): row 7 - 3, column 4
    depth[0, 0, 0, S // 2] = 10.0  # 5.7 m up: above max_height, dropped
    depth[0, 0, S - 1, 0] = 30.0  # beyond the grid, dropped
    grid = cloud.splat(probs, depth, K[None, None], pose[None, None])
    assert grid.shape == (1, 4, G, G)
    occupied = (grid[0, -1] > 0).nonzero().tolist()
    assert occupied == [[4, 4]]
    assert grid[0, :, 4, 4].tolist() == pytest.approx([0, 0, 1, math.log(2)])


def test_per_camera_keeps_cameras_apart_and_the_wide_image_does_not():
    views = torch.randn(1, 3, 3, 16, 16)
    changed = views.clone()
    changed[:, 0] += 1.0  # only the left camera
    for per_camera, same in ((True, True), (False, False)):
        model = _model(sdc=False, per_camera=per_camera).eval()
        with torch.no_grad():
            a, b = model(views)["seg"], model(changed)["seg"]
        assert torch.allclose(a[:, 2], b[:, 2], atol=1e-6) == same
        assert not torch.allclose(a[:, 0], b[:, 0])


def test_ablation_switches_and_fixed_weights():
    model = _model(tasks="waypoints", sdc=False)
    assert model.decoder is None
    assert model.weighting is None
    batch = model.example_batch()
    out = model(batch)
    assert set(out) == {"waypoints", "light"}
    loss = model.loss(out, batch)["loss"]
    assert loss.item() == pytest.approx(torch.nn.functional.l1_loss(out["waypoints"], batch["waypoints"]).item())
    model = _model(gradnorm=False, loss_weights=(1.0, 2.0, 3.0, 4.0))
    batch = model.example_batch()
    out = model(batch)
    parts = model.loss(out, batch)
    expected = sum(
        w * parts[f"{k}_loss"] for w, k in zip((1, 2, 3, 4), ("seg", "depth", "light", "waypoints"), strict=True)
    )
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    front = _model(cameras="front")
    assert front.num_frames == 1
    assert front(front.example_batch())["seg"].shape == (2, 1, 6, 16, 16)
    with pytest.raises(ValueError, match="image must hold 1 frames"):
        front(torch.randn(2, 3, 3, 16, 16))
    with pytest.raises(ValueError, match="cameras='four'"):
        _model(cameras="four")


def test_gradnorm_trains_inside_the_model():
    model = _model().train()
    batch = model.example_batch()
    loss = model.loss(model(batch), batch)
    assert bool(model.weighting.initial.all())
    loss["loss"].backward()
    assert model.weighting.weights.grad is not None
    assert model.weighting.weights.grad.abs().sum() > 0


def test_bad_cameras_and_measurements_are_named():
    model = _model().eval()
    batch = model.example_batch()
    x = batch["image"]
    with pytest.raises(ValueError, match=r"K must be float \(2, 3, 3, 3\)"):
        model(x, K=batch["K"][:, :2])
    with pytest.raises(ValueError, match=r"cam_to_ego must be float \(2, 3, 4, 4\)"):
        model(x, cam_to_ego=batch["cam_to_ego"][..., :3, :])
    bent = batch["cam_to_ego"].clone()
    bent[:, :, :3, :3] *= 2  # not a rotation
    with pytest.raises(CameraError, match="cam_to_ego"):
        model(x, cam_to_ego=bent)
    with pytest.raises(ValueError, match=r"measurements must be float \(2, 6\)"):
        model(x, measurements=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"batch\['waypoints'\]"):
        model.loss(model(batch), {**batch, "waypoints": batch["waypoints"][:, :2]})


def test_draw_prediction_shows_both_plans():
    model = _model().eval()
    batch = model.example_batch()
    with torch.no_grad():
        pred = model.postprocess(model(batch))
    pred["waypoints"] = batch["waypoints"] + torch.tensor([0.0, 1.0])  # 1 m to the left of the expert's
    raw = {"views": torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8), "waypoints": batch["waypoints"]}
    picture = torch.from_numpy(np.array(model.draw_prediction(raw, pred, None)))
    assert picture.shape == (2 * 16 * 4, (2 * 3 * 16 + 16) * 4, 3)  # views | classes | top-down panel, per sample
    panel = picture[:, -16 * 4 :]
    for colour in ((40, 90, 220), (245, 130, 20)):  # expert blue, model orange
        assert (panel == torch.tensor(colour, dtype=torch.uint8)).all(-1).any()
