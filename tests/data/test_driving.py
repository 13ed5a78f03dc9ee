"""The driving world (paper 38's demo): expert rollouts, renders and their classes, the simulator, cached sets."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab.data as vd
from vitlab.data.synthetic import driving as dr
from vitlab.data.synthetic import make
from vitlab.data.synthetic.driving_sets import generate_driving, world_of

S = 32


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic"


@pytest.fixture(scope="module")
def items(square_items: vd.TensorImageDataset) -> vd.TensorImageDataset:
    return square_items


def _world(items, want) -> dr.DrivingWorld:
    """The first world (seeds 0, 1, ...) for which ``want(world)`` holds."""
    for seed in range(200):
        world = dr.sample_world(np.random.default_rng(seed), items.images)
        if want(world):
            return world
    raise AssertionError("no such world in 200 draws")


def test_expert_never_collides_or_runs_red(items):
    stops = []
    for i in range(40):
        world, rng = world_of("train", i, 0, items.images)
        out = dr.rollout(world, None, dr.start_state(world, rng), steps=40)
        assert not out["collision"], i
        assert not out["red_violation"], i
        if world.red:
            stops.append(world.stop_x - (out["states"][-1, 0] + dr.HALF_LENGTH))
            assert out["states"][-1, 3] < 0.05  # waiting at the line
        else:
            assert out["progress"] > 20  # green: it drives on
    assert stops
    assert min(stops) > 0.3


def test_checks_catch_a_blind_driver(items):
    # centreline waypoints at cruise speed, ignoring obstacles and the light: the checks must notice
    def blind(obs, state, world):
        pts = [[state[0] + 2.0 * k, world.centre_y(state[0] + 2.0 * k)] for k in range(1, 5)]
        return dr.to_ego(state, np.array(pts))

    hits = reds = 0
    for i in range(30):
        world, _rng = world_of("train", i, 0, items.images)
        state = np.array([0.0, 0.0, 0.0, world.speed])
        out = dr.rollout(world, lambda o, s, w=world: blind(o, s, w), state, steps=36, render=False)
        hits += out["collision"] and len(world.obstacles) > 0
        reds += out["red_violation"]
        assert not out["collision"] or len(world.obstacles) > 0
    assert hits >= 3
    assert reds >= 5


def test_expert_plan_on_a_straight_empty_road(items):
    world = _world(items, lambda w: w.curvature == 0 and not w.red and len(w.obstacles) == 0)
    v = world.speed
    wps = dr.expert_waypoints(world, np.array([2.0, 0.0, 0.0, v]))
    expected = np.stack([v * dr.WAYPOINT_DT * np.arange(1, 5), np.zeros(4)], -1)
    np.testing.assert_allclose(wps, expected, atol=1e-9)
    # off the lane by 0.5 m: the plan returns to the centre with the 0.7 s time constant
    wps = dr.expert_waypoints(world, np.array([2.0, 0.5, 0.0, v]))
    np.testing.assert_allclose(wps[:, 1], -0.5 + 0.5 * np.exp(-np.arange(1, 5) * 0.5 / 0.7), atol=1e-9)


def test_renders_put_classes_where_they_belong(items):
    C = {name: i for i, name in enumerate(dr.CLASSES)}
    red = _world(items, lambda w: w.red and w.curvature == 0)
    out = dr.render_ego_views(red, np.array([0.0, 0.0, 0.0, 3.0]), S)
    front = out["semantic"][1]
    assert (front[0] == C["background"]).all()  # sky at the top
    assert set(front[-1, S // 2 - 2 : S // 2 + 2].tolist()) <= {C["road"], C["lane"]}  # road ahead, below
    assert (front == C["light_red"]).any()
    assert not (out["semantic"] == C["light_green"]).any()
    assert (front[: S // 2] == C["light_red"]).sum() == (front == C["light_red"]).sum()  # the bar is above the horizon
    green = _world(items, lambda w: not w.red)
    sem = dr.render_ego_views(green, np.array([0.0, 0.0, 0.0, 3.0]), S)["semantic"]
    assert (sem == C["light_green"]).any()
    assert not (sem == C["light_red"]).any()
    # 6 m before an obstacle, looking along the road: the front camera sees it
    world = _world(items, lambda w: len(w.obstacles) > 0)
    ox = world.obstacles[0, 0]
    state = np.array([ox - 6, world.centre_y(ox - 6), world.heading(ox - 6), 3.0])
    assert (dr.render_ego_views(world, state, S)["semantic"][1] == C["obstacle"]).sum() >= 4
    # depth where the bottom-centre ray meets the ground (z = 0) from 1.5 m up
    K, pose = dr.rig_cameras(S)
    ray = torch.linalg.solve(K[1], torch.tensor([S / 2, S - 0.5, 1.0]))
    t = 1.5 / -(pose[1, :3, :3] @ ray)[2]
    assert out["depth"][1, -1, S // 2 - 1 : S // 2 + 1].mean() == pytest.approx(float(t), rel=0.03)


def test_rig_is_left_front_right():
    _, pose = dr.rig_cameras(S)
    forward = pose[:, :3, 2]  # optical axes in the ego frame
    assert forward[0, 1] > 0.8
    assert forward[2, 1] < -0.8
    assert forward[1, 0] > 0.99
    assert forward[1, 2] < 0
    assert torch.allclose(pose[:, 2, 3], torch.full((3,), 1.5))
    with pytest.raises(ValueError, match="cameras='rear'"):
        dr.rig_cameras(S, "rear")


def test_bicycle_and_controller():
    s = dr.bicycle_step(np.array([0.0, 0.0, 0.0, 2.0]), 0.0, 0.0, dt=0.5)
    np.testing.assert_allclose(s, [1.0, 0.0, 0.0, 2.0])
    s = dr.bicycle_step(np.array([0.0, 0.0, 0.0, 2.0]), 0.0, math.atan(0.5), dt=0.1)  # heading rate v tan / L
    assert s[2] == pytest.approx(2.0 * 0.5 / dr.WHEELBASE * 0.1)
    turn, speed = dr.PIDController(1.0), dr.PIDController(1.0)
    accel, steer = dr.control(np.array([[1.0, 0.5], [2.0, 1.0], [3, 1.5], [4, 2]]), 1.0, turn, speed)
    assert accel == pytest.approx(math.hypot(1.0, 0.5) / 0.5 - 1.0)
    assert steer == pytest.approx(math.atan2(1.0, 2.0))
    assert dr.control(np.zeros((4, 2)), 1.0, turn, speed) == (-4.0, 0.0)  # a plan to stand still brakes


def test_sets_are_deterministic_cached_and_made(items, tmp_path):
    a = generate_driving(n=3, seed=4, size=16, source=items, cache=False)
    b = generate_driving(n=5, seed=4, size=16, source=items, cache=False)
    assert all(torch.equal(getattr(a, k), getattr(b, k)[:3]) for k in ("views", "waypoints", "light", "semantic"))
    c = generate_driving(n=3, seed=5, size=16, source=items, cache=False)
    assert not torch.equal(a.views, c.views)
    assert a.views.shape == (3, 3, 3, 16, 16)
    assert a[0]["semantic"].dtype == torch.int64
    front = generate_driving(n=3, seed=4, size=16, views=1, source=items, cache=False)
    assert torch.equal(front.views[:, 0], a.views[:, 1])
    assert torch.equal(front.K[:, 0], a.K[:, 1])
    with pytest.raises(ValueError, match="views=2"):
        generate_driving(n=2, views=2, source=items)
    out = make("driving", tmp_path / "set", n=4, seed=1, size=16, max_items=1, preview=2, data_dir=None)
    info = json.loads((out / "info.json").read_text())
    assert info["params"]["max_obstacles"] == 1
    assert (out / "preview.png").is_file()
    assert (out / "driving.npz").is_file()
    again = vd.synthetic.driving_sets.DrivingDataset.load(out / "driving.npz")
    assert len(again) == 4
