"""VGGT-style multi-view geometry (paper 37): the pose encoding, the ablation switch, metrics and bad input.
The registry-wide contract (tests/tasks/test_task_registry.py) covers the generic methods."""

import math

import pytest
import torch

from vitlab.layers.camera import axis_angle_to_matrix, intrinsics_from_fov, pose_from_rt, random_rotation
from vitlab.tasks import create_task_model
from vitlab.tasks.multiview import VGGT
from vitlab.tasks.multiview.vggt import matrix_to_quaternion, pose_encoding, quaternion_to_matrix

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(**kw) -> VGGT:
    torch.manual_seed(0)
    kw = {"img_size": 16, "num_frames": 3, "dim": 32, "depth": 1, **kw}
    return create_task_model("vggt", "vit_micro_patch4_28", backbone_kwargs=TINY, **kw).eval()


def test_quaternions_round_trip_and_match_a_known_rotation():
    R = random_rotation(200, torch.Generator().manual_seed(0), dtype=torch.float64)
    q = matrix_to_quaternion(R)
    assert (q[:, 0] >= 0).all()
    assert torch.allclose(quaternion_to_matrix(q), R, atol=1e-10)
    half = 0.35  # a rotation by 0.7 rad about x is (cos 0.35, sin 0.35, 0, 0)
    q = matrix_to_quaternion(axis_angle_to_matrix(torch.tensor([0.7, 0.0, 0.0], dtype=torch.float64)))
    assert torch.allclose(q, torch.tensor([math.cos(half), math.sin(half), 0, 0], dtype=torch.float64), atol=1e-10)


def test_pose_encoding_by_hand():
    # camera 1 anywhere; camera 2 shifted by 2 along camera 1's x axis and turned 0.5 rad about its y axis
    c1 = pose_from_rt(axis_angle_to_matrix(torch.tensor([0.3, -0.2, 1.0])), torch.tensor([1.0, 2.0, 3.0]))
    rel = pose_from_rt(axis_angle_to_matrix(torch.tensor([0.0, 0.5, 0.0])), torch.tensor([2.0, 0.0, 0.0]))
    c2w = torch.stack([c1, c1 @ rel])[None]
    K = intrinsics_from_fov(torch.tensor([[math.radians(90), math.radians(60)]]), 32, 32)
    enc = pose_encoding(c2w, K, 32, 32)
    assert enc.shape == (1, 2, 9)
    assert torch.allclose(enc[0, 0, :7], torch.tensor([0.0, 0, 0, 1, 0, 0, 0]), atol=1e-5)
    assert torch.allclose(enc[0, 1, :3], torch.tensor([2.0, 0, 0]), atol=1e-5)
    assert torch.allclose(enc[0, 1, 3:7], torch.tensor([math.cos(0.25), 0, math.sin(0.25), 0]), atol=1e-5)
    assert torch.allclose(enc[0, :, 7:], torch.tensor([[math.pi / 2] * 2, [math.pi / 3] * 2]), atol=1e-5)


@pytest.mark.parametrize("global_attention", [True, False])
def test_global_attention_off_keeps_frames_apart(global_attention):
    model = _model(global_attention=global_attention)
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    other = batch["image"].clone()
    other[:, 0] = torch.randn(other[:, 0].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(batch["image"]), model(other)
    assert a["pose"].shape == (2, 3, 9)
    assert a["depth"].shape == (2, 3, 16, 16)
    # frames 2 and 3 see frame 1 only through global attention (their special tokens are shared, not per sample)
    for key in ("pointmap", "depth", "pose"):
        assert torch.allclose(a[key][:, 1:], b[key][:, 1:], atol=1e-6) == (not global_attention), key


def test_metrics_zero_for_perfect_prediction_and_loss_scale_invariant():
    model = _model()
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    *_, pose = model._gt({"pointmap": batch["pointmap"]}, batch)
    scale = model._gt({"pointmap": batch["pointmap"]}, batch)[0].norm() / batch["pointmap"].norm()
    perfect = {"pointmap": batch["pointmap"] * scale, "depth": batch["depth"] * scale, "pose": pose}
    values = model.evaluate(perfect, batch)
    for key in ("pointmap_err", "depth_absrel", "rot_err_deg", "fov_err_deg"):
        assert torch.allclose(values[key], torch.zeros(2), atol=1e-3), key
    out = model(batch["image"])
    scaled = {**batch, "pointmap": 5 * batch["pointmap"], "depth": 5 * batch["depth"]}
    scaled["cam_to_world"] = batch["cam_to_world"].clone()
    scaled["cam_to_world"][..., :3, 3] *= 5
    assert model.loss(out, batch)["loss"].item() == pytest.approx(model.loss(out, scaled)["loss"].item(), rel=1e-4)


def test_bad_input_is_named():
    model = _model()
    batch = model.example_batch(2)
    out = model(batch["image"])
    with pytest.raises(ValueError, match="3 frames"):
        model(batch["image"][:, :2])
    with pytest.raises(ValueError, match="at least 2 frames"):
        _model(num_frames=1)
    with pytest.raises(ValueError, match="'depth'"):
        model.loss(out, {k: v for k, v in batch.items() if k != "depth"})
    K = batch["K"].clone()
    K[1, 2, 1, 1] = 0
    with pytest.raises(ValueError, match="singular"):
        model.loss(out, {**batch, "K": K})


def test_dpt_heads_read_every_frame_global_pair():
    model = _model(head="dpt", depth=2)
    assert model.depth_head.taps == model.point_head.taps == 2
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    out = model(batch["image"])
    assert out["depth"].shape == (2, 3, 16, 16)
    assert out["pointmap"].shape == (2, 3, 16, 16, 3)
    assert (out["depth"] > 0).all()
    assert (out["confidence"] > 1).all()
    # the first pair's global block feeds the heads directly: shifting its output alone (the last block's output
    # held fixed) moves the depth under dpt, not under the linear head (last layer only)
    moved = {}
    for name, m in (("dpt", model), ("linear", _model(depth=2, head="linear"))):
        kept = {}
        with torch.no_grad():
            hook = m.blocks[-1].register_forward_hook(lambda mod, inp, out, kept=kept: kept.setdefault("last", out))
            base = m(batch["image"])["depth"]
            hook.remove()
            hooks = [m.blocks[1].register_forward_hook(lambda mod, inp, out: out + 1.0),
                     m.blocks[-1].register_forward_hook(lambda mod, inp, out, kept=kept: kept["last"])]  # fmt: skip
            shifted = m(batch["image"])["depth"]
            for h in hooks:
                h.remove()
        moved[name] = not torch.allclose(base, shifted, atol=1e-6)
    assert moved == {"dpt": True, "linear": False}


def test_camera_iterations_start_at_the_first_estimate_and_all_enter_the_loss():
    one, three = _model(), _model(camera_iters=3)
    batch = one.example_batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = one(batch["image"]), three(batch["image"])
    assert b["pose_iters"].shape == (2, 3, 3, 9)
    # zero-initialised deltas: every iteration returns the first estimate, which is the 1-iteration model's
    for k in range(3):
        assert torch.allclose(b["pose_iters"][:, k], a["pose"], atol=1e-6)
    # once the delta is no longer zero, the iteration count changes the output
    with torch.no_grad():
        three.camera_head.delta[1].fc2.bias.fill_(0.1)
        c = three(batch["image"])
    assert torch.allclose(c["pose_iters"][:, 1] - c["pose_iters"][:, 0], torch.full((2, 3, 9), 0.1), atol=1e-5)
    assert not torch.allclose(c["pose"], a["pose"], atol=1e-3)
    # the loss sees every iteration, weighted 0.8 ** (3 - k): start from perfect estimates, spoil one at a time
    *_, pose = three._gt(c, batch)
    perfect = pose[:, None].expand(-1, 3, -1, -1)
    assert three.loss({**c, "pose_iters": perfect}, batch)["camera"].item() == pytest.approx(0.0, abs=1e-7)
    for k, w in enumerate((0.64, 0.8, 1.0)):
        iters = perfect.clone()
        iters[:, k] += 0.5  # Huber (delta 1) of 0.5 is 0.125 per entry
        cam = three.loss({**c, "pose_iters": iters}, batch)["camera"].item()
        assert cam == pytest.approx(0.125 * w / 2.44, rel=1e-4), k
    with pytest.raises(ValueError, match="camera_iters"):
        _model(camera_iters=0)


def test_tracking_head_outputs_metrics_and_bad_queries():
    model = _model(track_queries=16)
    batch = model.example_batch(2, torch.Generator().manual_seed(0))
    out = model(batch["image"])
    assert out["tracks"].shape == (2, 3, 16, 2)
    assert out["track_vis"].shape == (2, 3, 16)
    losses = model.loss(out, batch)
    assert losses["track"] > 0
    assert losses["track_vis"] > 0
    losses["loss"].backward()
    assert model.track_head.log_temperature.grad is not None
    assert all(p.grad is not None for p in model.track_features.parameters())
    metrics = model.build_metrics()
    model.update_metrics(metrics, out, batch)
    summary = model.summarize_metrics(metrics)
    assert {"track_err_px", "track_vis_acc"} <= set(summary)
    assert 0 <= summary["track_vis_acc"] <= 100
    assert model.postprocess(out)["track_visible"].dtype == torch.bool
    with pytest.raises(ValueError, match="square number"):
        _model(track_queries=10)
