"""Stick-figure humans: kinematics, limits, projection, visibility, heatmaps, multi-view agreement, the set."""

import json
import math

import numpy as np
import pytest
import torch

from vitlab.cli import run
from vitlab.data.synthetic import MULTIVIEW_GENERATORS, make, make_dataset
from vitlab.data.synthetic.humans import (
    JOINTS,
    LIMITS,
    NUM_JOINTS,
    PARENTS,
    POSES,
    _ray_capsules,
    annotate,
    bone_lengths,
    forward_kinematics,
    joint_radii,
    local_rotations,
    named_pose,
    render_humans,
    sample_people,
    sample_pose,
    sample_room_cameras,
    skeleton_from_rotations,
)
from vitlab.data.synthetic.humans_sets import HumansDataset, generate_stick_humans
from vitlab.layers.camera import Cameras, unproject


@pytest.fixture(scope="module")
def scenes() -> HumansDataset:
    return generate_stick_humans(n=6, seed=3, views=4, size=64, max_people=3, cache=False)


def _random_people(seed: int, P: int = 5):
    rng = np.random.default_rng(seed)
    angles = torch.stack([sample_pose(rng)[0] for _ in range(P)])
    shape = torch.tensor(rng.uniform(0.8, 1.2, (P, 4)), dtype=torch.float32)
    root = torch.tensor(rng.uniform(-2, 2, (P, 3)), dtype=torch.float32)
    return angles, shape, root, torch.tensor(rng.uniform(0, 6.3, P), dtype=torch.float32)


def test_forward_kinematics_keeps_bone_lengths_and_turns_with_yaw():
    angles, shape, root, yaw = _random_people(0)
    joints = forward_kinematics(angles, shape, root, yaw)
    parents = torch.tensor(PARENTS[1:])
    length = (joints[:, 1:] - joints[:, parents]).norm(dim=-1)
    torch.testing.assert_close(length, bone_lengths(shape)[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joints[:, 0], root)
    # yaw turns the whole body about world z through the root
    base = forward_kinematics(angles, shape, root, torch.zeros_like(yaw)) - root[:, None]
    c, s = yaw.cos()[:, None], yaw.sin()[:, None]
    turned = torch.stack([c * base[..., 0] - s * base[..., 1], s * base[..., 0] + c * base[..., 1], base[..., 2]], -1)
    torch.testing.assert_close(joints - root[:, None], turned, atol=1e-5, rtol=1e-5)


def test_skeleton_from_rotations_is_the_kinematic_tree_in_the_body_frame():
    angles, shape, root, yaw = _random_people(1)
    body = skeleton_from_rotations(local_rotations(angles), shape)
    torch.testing.assert_close(body, forward_kinematics(angles, shape, torch.zeros_like(root), torch.zeros_like(yaw)))
    # any batch shape, and gradients reach rotations and shape
    local = local_rotations(angles).unsqueeze(0).expand(2, -1, -1, -1, -1).clone().requires_grad_()
    s = shape.unsqueeze(0).expand(2, -1, -1).clone().requires_grad_()
    out = skeleton_from_rotations(local, s)
    assert out.shape == (2, len(angles), 15, 3)
    out.square().sum().backward()
    assert local.grad.abs().sum() > 0
    assert s.grad.abs().sum() > 0
    assert float(local.grad[..., 0, :, :].abs().max()) == 0  # the root's row is not used


def test_rest_and_named_pose_geometry():
    one = torch.ones(1, 4)
    rest = forward_kinematics(torch.zeros(1, NUM_JOINTS, 3), one, torch.zeros(1, 3), torch.zeros(1))[0]
    j = {name: rest[i] for i, name in enumerate(JOINTS)}
    assert j["head"][2] > j["neck"][2] > j["pelvis"][2] > j["l_knee"][2] > j["l_ankle"][2]
    assert j["l_shoulder"][1] > 0 > j["r_shoulder"][1]  # body frame: y is the person's left
    up = forward_kinematics(named_pose("arms_up")[None], one, torch.zeros(1, 3), torch.zeros(1))[0]
    assert up[JOINTS.index("l_wrist"), 2] > up[JOINTS.index("head"), 2]
    walk = forward_kinematics(named_pose("walking")[None], one, torch.zeros(1, 3), torch.zeros(1))[0]
    assert walk[JOINTS.index("l_ankle"), 0] > walk[JOINTS.index("r_ankle"), 0]  # left foot forward (+x)


def test_joint_limits_hold():
    for name in POSES:
        a = named_pose(name)
        assert bool(((a >= LIMITS[..., 0] - 1e-6) & (a <= LIMITS[..., 1] + 1e-6)).all()), name
    rng = np.random.default_rng(1)
    drawn = torch.stack([sample_pose(rng, noise_deg=60)[0] for _ in range(200)])
    assert bool(((drawn >= LIMITS[..., 0]) & (drawn <= LIMITS[..., 1])).all())
    assert bool((drawn == LIMITS[..., 1]).any())  # wide noise reaches the limits: the clamp is exercised
    people = sample_people(np.random.default_rng(2), 3)
    foot = joint_radii(people["shape"])[:, JOINTS.index("l_ankle")]
    torch.testing.assert_close(people["joints"][..., 2].amin(1), foot)  # feet rest on the ground


def test_ray_capsule_distances_are_exact():
    o = torch.zeros(1, 3)
    d = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    A = torch.tensor([[5.0, -1, 0], [0, 3, 0]])
    B = torch.tensor([[5.0, 1, 0], [0, 5, 0]])
    t = _ray_capsules(o, d, A, B, torch.tensor([0.5, 0.5]))[0]
    assert float(t[0, 0]) == pytest.approx(4.5)  # the side of the first capsule
    assert float(t[1, 1]) == pytest.approx(2.5)  # the end sphere of the second
    assert math.isinf(float(t[2].min()))
    assert math.isinf(float(t[0, 1]))
    assert math.isinf(float(t[1, 0]))


def test_emitted_2d_joints_are_the_projected_3d_joints(scenes):
    s = scenes[0]
    R, t = s["cam_to_world"][:, :3, :3], s["cam_to_world"][:, :3, 3]
    X = torch.einsum("vji,vpkj->vpki", R, s["joints_3d"][None] - t[:, None, None])  # R^T (X - t) per view
    K = s["K"]
    u = K[:, None, None, 0, 0] * X[..., 0] / X[..., 2] + K[:, None, None, 0, 2]
    v = K[:, None, None, 1, 1] * X[..., 1] / X[..., 2] + K[:, None, None, 1, 2]
    m = s["person_mask"][None, :, None]
    torch.testing.assert_close(s["joints_2d"][..., 0][m.expand_as(u)], u[m.expand_as(u)], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(s["joints_2d"][..., 1][m.expand_as(v)], v[m.expand_as(v)], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(s["joint_depth"][m.expand_as(u)], X[..., 2][m.expand_as(u)])


def test_visibility_agrees_with_the_person_masks(scenes):
    seen = hidden = 0
    for i in range(len(scenes)):
        s = scenes[i]
        _V, _P = s["visible"].shape[:2]
        radii = joint_radii(s["shape"])
        for v, p, j in s["in_image"].nonzero().tolist():
            c, r = (int(x) for x in s["joints_2d"][v, p, j].floor())
            window = s["person_id"][v, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
            z, front = float(s["joint_depth"][v, p, j]), float(s["depth"][v, r, c])
            if s["visible"][v, p, j]:
                seen += 1
                assert (window == p + 1).any()
                assert front >= z - float(radii[p, j]) - 0.03 - 1e-5
            else:
                hidden += 1  # something else, or another of its own limbs, is in front of it
                assert int(s["person_id"][v, r, c]) != p + 1 or front < z - float(radii[p, j]) - 0.03
        assert not s["visible"][:, ~s["person_mask"]].any()
    assert seen > 50
    assert hidden > 5


def test_heatmap_peaks_at_the_projected_centre():
    data = generate_stick_humans(n=4, seed=0, views=2, size=64, max_people=1, cache=False)
    for i in range(len(data)):
        s = data[i]
        for v in range(2):
            if not s["in_image"][v, 0, 0]:
                assert float(s["heatmap"][v].max()) == 0
                continue
            hm = s["heatmap"][v]
            row, col = divmod(int(hm.argmax()), hm.shape[1])
            cx, cy = (s["centre_2d"][v, 0] / data.stride).tolist()
            assert abs(col + 0.5 - cx) <= 0.5 + 1e-4
            assert abs(row + 0.5 - cy) <= 0.5 + 1e-4
            assert float(hm.max()) >= math.exp(-0.25 / data.sigma**2) - 1e-5


def test_every_view_sees_the_same_3d_joints(scenes):
    s = scenes[1]
    P = int(s["person_mask"].sum())
    cams = Cameras(s["K"], s["cam_to_world"], scenes.img_size)
    for v in range(scenes.num_views):
        cam, _ = unproject(s["joints_2d"][v, :P], s["K"][v], depth=s["joint_depth"][v, :P])
        world = cam @ cams.cam_to_world[v, :3, :3].T + cams.cam_to_world[v, :3, 3]
        torch.testing.assert_close(world, s["joints_3d"][:P], atol=2e-3, rtol=1e-3)


def test_deterministic_and_independent_of_n():
    a = generate_stick_humans(n=3, seed=5, views=2, size=32, cache=False)
    b = generate_stick_humans(n=2, seed=5, views=2, size=32, cache=False)
    c = generate_stick_humans(n=2, seed=6, views=2, size=32, cache=False)
    for k in ("views", "depth", "joints_3d", "K", "cam_to_world", "num_people"):
        torch.testing.assert_close(getattr(a, k)[:2], getattr(b, k))
    assert not torch.equal(a.views[:2], c.views)


def test_cache_make_and_collate(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "env_cache"))
    data = make_dataset("stick_humans", n=3, seed=1, views=2, size=32, cache_dir=tmp_path / "c")
    again = generate_stick_humans(n=3, seed=1, views=2, size=32, cache_dir=tmp_path / "c")
    assert again.path == data.path
    assert torch.equal(again.views, data.views)
    assert MULTIVIEW_GENERATORS["stick_humans"] is generate_stick_humans
    batch = data.collate([data[0], data[2]])
    assert batch["views"].shape == (2, 2, 3, 32, 32)
    assert batch["joints_2d"].shape == (2, 2, 3, NUM_JOINTS, 2)
    assert batch["heatmap"].shape == (2, 2, 8, 8)
    assert batch["joints_3d"].shape == (2, 3, NUM_JOINTS, 3)
    out = tmp_path / "out"
    assert run(f"data make stick_humans --out {out} --n 3 --seed 1 --views 2 --size 32 --max-items 2".split()) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["params"]["max_people"] == 2
    assert info["num_views"] == 2
    assert (out / "preview.png").stat().st_size > 1000
    loaded = HumansDataset.load(out / "stick_humans.npz")
    again = make_dataset("stick_humans", n=3, seed=1, views=2, size=32, max_people=2)  # from $VITLAB_CACHE
    assert again.path is not None
    assert torch.equal(loaded.joints_3d, again.joints_3d)
    with pytest.raises(ValueError, match="canvas"):
        make("stick_humans", out, canvas=64)


def test_bad_input_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least one person"):
        sample_people(rng, 0)
    bad_args = (
        ({"views": 0}, "views"),
        ({"views": 9}, "views"),
        ({"max_people": 0}, "max_people"),
        ({"size": 8}, "size"),
        ({"stride": 5}, "stride"),
        ({"fov": (90, 40)}, "fov"),
    )
    for bad, match in bad_args:
        with pytest.raises(ValueError, match=match):
            generate_stick_humans(n=1, cache=False, **bad)
    with pytest.raises(ValueError, match="angles"):
        forward_kinematics(torch.zeros(0, NUM_JOINTS, 3), torch.ones(0, 4), torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="pose"):
        named_pose("cartwheel")
    people = sample_people(rng, 1)
    cams = sample_room_cameras(rng, 2, 32)
    two_d = Cameras(cams.K[None], cams.cam_to_world[None], (32, 32))
    with pytest.raises(ValueError, match="one batch dim"):
        render_humans(people, two_d, torch.rand(1, 3, 3))
    out = render_humans(people, cams, torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        annotate(people["joints"], people["shape"], cams, out["depth"], out["person_id"], stride=5)
    with pytest.raises(IndexError):
        generate_stick_humans(n=1, views=1, size=32, cache=False)[1]


def test_front_and_back_of_a_person_look_different():
    """The hair and the darker shirt back make a 180 deg turn visible: the head seen from behind is darker than seen
    from the front, and the facing direction follows the yaw."""
    from vitlab.data.synthetic.humans import _forward
    from vitlab.layers.camera import intrinsics_from_fov, look_at

    shape = torch.ones(1, 4)
    yaw = torch.tensor([0.7])
    joints = forward_kinematics(named_pose("standing")[None], shape, torch.tensor([[0.0, 0.0, 1.0]]), yaw)
    assert torch.allclose(_forward(joints)[0], torch.tensor([math.cos(0.7), math.sin(0.7), 0.0]), atol=1e-5)
    head = joints[0, JOINTS.index("head")]
    eyes = torch.stack([head + 1.2 * torch.tensor([math.cos(0.7 + a), math.sin(0.7 + a), 0.0]) for a in (0, math.pi)])
    cams = Cameras(intrinsics_from_fov(torch.full((2,), 0.6), 48, 48), look_at(eyes, head.expand(2, 3)), (48, 48))
    people = {"joints": joints, "shape": shape}
    out = render_humans(people, cams, torch.tensor([[[0.8, 0.6, 0.5], [0.7, 0.2, 0.2], [0.2, 0.2, 0.6]]]))
    centre = out["rgb"][:, :, 20:28, 20:28].float().mean((1, 2, 3))  # the head fills the image centre
    assert (out["person_id"][:, 20:28, 20:28] == 1).all()
    assert centre[1] < 0.5 * centre[0]  # hair behind, skin in front
