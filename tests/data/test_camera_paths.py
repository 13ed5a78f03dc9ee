"""Expert camera paths: determinism, cache, the expert's guarantees, re-rendering, geometry helpers, errors, make()."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab.data as vd
from vitlab.data import synthetic
from vitlab.data.synthetic import camera_paths as cp

SIZE, FRAMES, K = 24, 10, 3


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic"


@pytest.fixture(scope="module")
def items() -> vd.TensorImageDataset:
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (6, 1, 28, 28)).astype(np.uint8)
    images[:, :, :4] = 0  # a blank border, like Fashion-MNIST items
    return vd.TensorImageDataset(
        images=torch.from_numpy(images), targets=torch.arange(6) % 10, classes=list(vd.FASHION_MNIST_CLASSES),
        mean=(0.3,), std=(0.3,), name="fake",
    )  # fmt: skip


def _make(items, n=4, **kw):
    return cp.generate_camera_paths(
        "train", n=n, seed=3, frames=FRAMES, size=SIZE, substeps=K, source=items, cache=False, **kw
    )


@pytest.fixture(scope="module")
def paths(items) -> cp.CameraPathDataset:
    return _make(items)


def test_shapes_and_determinism(paths, items):
    N = len(paths)
    assert paths.clips.shape == (N, FRAMES, 2, SIZE, SIZE)
    assert paths.clips.dtype == torch.uint8
    assert paths.actions.shape == (N, FRAMES, K, 5)
    assert paths.route.shape == (N, FRAMES * K + 1, 2)
    again = _make(items, n=2)  # trajectory i depends on (seed, split, i) only, not on n
    assert torch.equal(again.clips, paths.clips[:2])
    assert torch.equal(again.actions, paths.actions[:2])
    other = cp.generate_camera_paths("train", n=2, seed=4, frames=FRAMES, size=SIZE, substeps=K, source=items,
                                     cache=False)  # fmt: skip
    assert not torch.equal(other.camera, paths.camera[:2])


def test_expert_reaches_goal_without_collision(paths):
    assert not cp.collisions(paths.route, paths.zones).any()
    for i in range(len(paths)):
        stop = paths.stop[i]
        first = int(stop.argmax())
        assert stop[first] == 1
        assert stop[-2] == 1
        assert (stop[first:] == 1).all()
        assert (stop[:first] == 0).all()
        assert cp.goal_reached(paths.camera[i, first], paths.target[i], SIZE)
        assert not cp.goal_reached(paths.camera[i, :first], paths.target[i], SIZE).any()
        assert (paths.actions[i, first:] == 0).all()
    assert (paths.actions.abs() <= 1 + 1e-5).all()  # the speed limits are one action unit


def test_actions_integrate_to_the_next_pose_and_route(paths):
    steps = cp.integrate_actions(paths.camera[:, :-1].double(), paths.actions[:, :-1].double(), SIZE)
    assert torch.allclose(steps[:, :, -1].float(), paths.camera[:, 1:], atol=1e-4)
    assert torch.allclose(steps[..., :2].flatten(1, 2).float(), paths.route[:, 1 : 1 + (FRAMES - 1) * K], atol=1e-4)
    state = paths.camera.clone()
    state[..., :2] /= SIZE
    assert torch.allclose(paths.state, state)


def test_views_rerender_exactly(paths):
    # the closed loop re-renders views from the stored world: it must give the stored frames back
    i = 1
    background = cp.trajectory_background(3, "train", i, SIZE, paths.params["canvas"])
    frames, track = cp.render_views(paths.camera[i], paths.target[i], paths.zones[i], paths.items[i], background, SIZE)
    assert torch.equal(frames, paths.clips[i])
    assert torch.allclose(track, paths.track[i])


def test_proximity_map_against_geometry(paths):
    # at zoom 1, roll 0 the centre of pixel (r, c) looks at world offset (c + 0.5 - S/2, r + 0.5 - S/2) from the
    # look-at point; the map is 255 * (1 - clearance / range), clipped
    i, zones = 0, paths.zones[0]
    x, y, _r = zones[0].tolist()
    pose = torch.tensor([[x + 2.0, y - 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    frames, _ = cp.render_views(pose, paths.target[i], zones, paths.items[i], np.zeros((168, 168)), SIZE)
    prox = frames[0, 1].float()
    assert prox[SIZE // 2, SIZE // 2] == 255  # the look-at point is inside the zone
    u = (torch.arange(SIZE) + 0.5 - SIZE / 2).double()
    wx, wy = u[None, :] + x + 2.0, u[:, None] + y - 1.0
    live = zones[zones[:, 2] > 0].double()
    clear = ((wx[..., None] - live[:, 0]) ** 2 + (wy[..., None] - live[:, 1]) ** 2).sqrt() - live[:, 2]
    ref = (1 - clear.amin(-1) / (cp.PROXIMITY_RANGE * SIZE)).clamp(0, 1) * 255
    assert (prox - ref).abs().max() < 6  # 2x2 supersampling against the pixel centre


def test_collisions_and_goal_by_hand():
    zones = torch.tensor([[0.0, 0.0, 2.0], [10.0, 0.0, 0.0]])  # the second row pads (radius 0)
    points = torch.tensor([[1.0, 1.0], [2.5, 0.0], [10.0, 0.0]])
    assert cp.collisions(points, zones).tolist() == [True, False, False]
    target = torch.tensor([5.0, 5.0, 12.0, 0.0, 0.0])
    poses = torch.tensor([[5.0, 5.5, 0.0, 0.0, 0.0], [5.0, 5.5, -0.2, 0.0, 0.0], [9.0, 5.0, 0.0, 0.0, 0.0]])
    assert cp.goal_reached(poses, target, 20).tolist() == [True, False, False]


def test_cache_save_load_subset(items, tmp_cache):
    a = cp.generate_camera_paths("test", n=2, seed=0, frames=FRAMES, size=SIZE, substeps=K, source=items)
    b = cp.generate_camera_paths("test", n=2, seed=0, frames=FRAMES, size=SIZE, substeps=K, source=items)
    assert b.path is not None
    assert b.path.parent == tmp_cache
    for key in ("clips", "camera", *cp.CameraPathDataset._EXTRA):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    sub = b.subset([1])
    assert torch.equal(sub.actions[0], b.actions[1])
    assert torch.equal(sub.zones[0], b.zones[1])
    item = b[1]
    assert set(item) >= {"image", "state", "actions", "stop"}
    assert item["image"].shape == (FRAMES, 2, SIZE, SIZE)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"frames": 4}, "frames"), ({"size": 8}, "size"), ({"substeps": 0}, "substeps"), ({"max_items": 0}, "max_items"),
     ({"canvas": 50}, "canvas"), ({"split": "val"}, "split")],
)  # fmt: skip
def test_bad_arguments(items, kw, match):
    with pytest.raises(ValueError, match=match):
        cp.generate_camera_paths(**{"n": 1, "source": items, "cache": False, **kw})


def test_make_and_preview(items, tmp_path, monkeypatch):
    assert synthetic.VIDEO_GENERATORS["camera_paths"] is cp.generate_camera_paths
    monkeypatch.setattr(cp, "load_fashion_mnist", lambda *a, **k: items)
    out = synthetic.make("camera_paths", tmp_path / "out", n=2, frames=FRAMES, size=SIZE)
    info = json.loads((out / "info.json").read_text())
    assert info["num_clips"] == 2
    assert info["in_chans"] == 2
    assert (out / "preview.png").is_file()
    loaded = cp.CameraPathDataset.load(out / "clips.npz")
    assert loaded.actions.shape == (2, FRAMES, 4, 5)
    png = cp.save_path_preview(loaded, tmp_path / "paths.png", count=2)
    assert png.stat().st_size > 0
