"""Render3D: the ray caster against the camera module's projection on analytic scenes, multi-view consistency,
determinism, the cached multi-view set, its samples and collate, ``vitlab data make render3d`` and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab.data as vd
from vitlab.cli import run
from vitlab.data import synthetic
from vitlab.data.synthetic import render3d as r3d
from vitlab.data.synthetic.render3d_sets import Render3DDataset, generate_render3d
from vitlab.layers import camera as cam
from vitlab.layers.camera import Cameras

S = 48
LENSES = {
    "pinhole": (None, None),
    "barrel": (torch.tensor([-0.3, 0.05, 0.0, 0.0, 0.0]), None),
    "pincushion_tangential": (torch.tensor([0.2, 0.0, 0.01, -0.01, 0.0]), None),
    "ucm": (None, torch.tensor(0.7)),
}


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches under its own tmp folder, never in ~/.cache."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic"


@pytest.fixture(scope="module")
def items(square_items: vd.TensorImageDataset) -> vd.TensorImageDataset:
    return square_items


def _front_camera(lens: str, size: int = S, fov: float = 70.0) -> Cameras:
    """A camera at the origin looking along world +z (identity pose), so camera and world frames agree."""
    dist, xi = LENSES[lens]
    K = cam.intrinsics_from_fov(math.radians(fov), size, size)
    lens = (None if t is None else t[None] for t in (dist, xi))
    return Cameras(K[None], torch.eye(4)[None], (size, size), *lens)


def _flat_textures(n: int) -> torch.Tensor:
    return torch.linspace(0.2, 0.9, n)[:, None, None, None].expand(n, 3, 28, 28).contiguous()


@pytest.mark.parametrize("lens", list(LENSES))
def test_fronto_parallel_plane_has_constant_depth(lens):
    scene = r3d.Scene([r3d.Plane((0.0, 0.0, 5.0), (50.0, 0.0, 0.0), (0.0, 50.0, 0.0), 0)], _flat_textures(1))
    out = r3d.render(scene, _front_camera(lens))
    assert bool(out["valid"].all())
    torch.testing.assert_close(out["depth"], torch.full((1, S, S), 5.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pointmap_cam"][..., 2], out["depth"])
    torch.testing.assert_close(out["normals"], torch.tensor([0.0, 0.0, -1.0]).expand(1, S, S, 3))  # faces the camera
    assert bool((out["object_id"] == 1).all())
    # the pointmap lies on the rays: ray distance times the unit ray
    dist = out["pointmap"].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out["pointmap"], dist * out["rays"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("lens", list(LENSES))
@pytest.mark.parametrize("turn", [0.0, 0.5])
def test_box_face_corners_project_onto_the_depth_edge(lens, turn):
    """Points just inside / outside the front face of a box (axis-aligned, or turned about the optical axis), projected
    by the camera module (the forward lens model), land on box / background pixels of the renderer (which inverts
    the lens model)."""
    scene = r3d.Scene(
        [
            r3d.Plane((0.0, 0.0, 10.0), (50.0, 0.0, 0.0), (0.0, 50.0, 0.0), 0),
            r3d.Box((0.1, -0.05, 2.6), (0.9, 0.7, 0.6), 1, (0.0, 0.0, turn)),  # front face at z = 2, near the axis
        ],
        _flat_textures(2),
    )
    cameras = _front_camera(lens, size=64)
    out = r3d.render(scene, cameras)
    depth, ids = out["depth"][0], out["object_id"][0]
    # 32 points around the front face's boundary, moved 5 cm (1.15 px) inwards and outwards: the lenses move the
    # corners by 1.8-2.7 px (more for the UCM), so a renderer that got the lens wrong fails
    s = torch.linspace(-1, 1, 9)[:-1]
    one = torch.ones_like(s)
    square = torch.cat([torch.stack(p, -1) for p in ((s, -one), (one, s), (-s, one), (-one, -s))])
    centre, half = torch.tensor([0.1, -0.05]), torch.tensor([0.9, 0.7])
    for offset, want_depth, want_id in ((-0.05, 2.0, 2), (0.05, 10.0, 1)):
        c, s_ = math.cos(turn), math.sin(turn)
        xy = centre + square * (half + offset) @ torch.tensor([[c, s_], [-s_, c]])  # rows rotated by +turn
        pts = torch.cat([xy, torch.full((len(xy), 1), 2.0)], -1)
        uv, _, ok = cameras.project(pts[None])
        assert bool(ok.all())
        col, row = uv[0].floor().long().unbind(-1)
        inside = (col >= 0) & (col < 64) & (row >= 0) & (row < 64)
        assert int(inside.sum()) == 32
        got_ids = ids[row[inside], col[inside]]
        assert bool((got_ids == want_id).all()), (offset, got_ids)
        if want_id == 2:
            torch.testing.assert_close(depth[row[inside], col[inside]], torch.full((int(inside.sum()),), want_depth))


def test_pinhole_box_silhouette_is_the_projected_rectangle():
    scene = r3d.Scene(
        [
            r3d.Plane((0.0, 0.0, 10.0), (50.0, 0.0, 0.0), (0.0, 50.0, 0.0), 0),
            r3d.Box((0.1, -0.05, 4.6), (0.9, 0.7, 0.6), 1),
        ],
        _flat_textures(2),
    )
    cameras = _front_camera("pinhole")
    out = r3d.render(scene, cameras)
    lo, _, _ = cameras.project(torch.tensor([[[-0.8, -0.75, 4.0]]]))
    hi, _, _ = cameras.project(torch.tensor([[[1.0, 0.65, 4.0]]]))
    grid = cam.pixel_grid(S, S)
    inside = ((grid > lo[0, 0]) & (grid < hi[0, 0])).all(-1)
    edge = ((grid - lo[0, 0]).abs() < 1e-3).any(-1) | ((grid - hi[0, 0]).abs() < 1e-3).any(-1)
    expected = torch.where(inside, 4.0, 10.0)
    assert int(inside.sum()) > 100
    torch.testing.assert_close(out["depth"][0][~edge], expected[~edge], atol=1e-4, rtol=0)


def _reproject(out: dict, camera: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """View 0's world points seen by ``camera``: view 1's inverse depth interpolated at their projections, where the
    4 surrounding pixels show the point's own face (same object id and normal), and the points' own inverse depth."""
    S_ = out["depth"].shape[-1]
    valid = out["valid"][0]
    uv, z, ok = (t[0] for t in camera.project(out["pointmap"][0][valid][None]))
    x0, y0 = (uv - 0.5).floor().long().unbind(-1)  # the 4 pixel centres around uv
    keep = ok & (x0 >= 0) & (y0 >= 0) & (x0 < S_ - 1) & (y0 < S_ - 1)
    uv, z, x0, y0 = uv[keep], z[keep], x0[keep], y0[keep]
    src_id, src_n = out["object_id"][0][valid][keep], out["normals"][0][valid][keep]
    corners = [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]
    same = torch.stack([out["object_id"][1][r, c] == src_id for r, c in corners]).all(0)
    same &= torch.stack([(out["normals"][1][r, c] - src_n).abs().amax(-1) < 1e-4 for r, c in corners]).all(0)
    fx, fy = (uv - 0.5 - torch.stack([x0, y0], -1)).unbind(-1)
    inv = [1 / out["depth"][1][r, c] for r, c in corners]
    interp = (inv[0] * (1 - fx) + inv[1] * fx) * (1 - fy) + (inv[2] * (1 - fx) + inv[3] * fx) * fy
    return interp[same], 1 / z[same]


def test_multi_view_inverse_depth_agrees_where_visible(items):
    """View 0's world pointmap projected into view 1 matches view 1's pixels: on a visible planar face, view 1's inverse
    depth (affine in the pixel coordinates for a pinhole) interpolated at the projection is the point's own."""
    rng = np.random.default_rng(3)
    scene, _ = r3d.sample_boxes_scene(rng, items.images, max_boxes=4)
    cameras = r3d.sample_orbit_cameras(rng, 2, S, spread=30.0)
    out = r3d.render(scene, cameras)
    interp, inv_z = _reproject(out, Cameras(cameras.K[1:], cameras.cam_to_world[1:], (S, S)))
    assert len(interp) > 300  # a real overlap, not a vacuous check
    torch.testing.assert_close(interp, inv_z, atol=1e-5, rtol=1e-3)
    # a camera 10 cm off the true one breaks the agreement
    moved = cameras.cam_to_world[1:] @ cam.pose_from_rt(torch.eye(3), torch.tensor([0.1, 0.0, 0.0]))
    interp, inv_z = _reproject(out, Cameras(cameras.K[1:], moved, (S, S)))
    assert float((interp - inv_z).abs().max()) > 1e-3


def test_render_is_deterministic_and_sets_are_per_sample_streams(items):
    a = generate_render3d(n=3, seed=5, size=32, views=2, source=items, cache=False)
    b = generate_render3d(n=5, seed=5, size=32, views=2, source=items, cache=False)
    for k in ("views", "depth", "normals", "object_id", "K", "cam_to_world"):
        assert torch.equal(getattr(a, k), getattr(b, k)[:3]), k
    c = generate_render3d(n=3, seed=6, size=32, views=2, source=items, cache=False)
    assert not torch.equal(a.views, c.views)


def test_cached_set_round_trips(items, tmp_cache):
    a = generate_render3d(n=2, seed=1, size=32, views=3, source=items)
    assert a.path is not None
    assert a.path.parent == tmp_cache
    b = generate_render3d(n=2, seed=1, size=32, views=3, source=items)
    assert b.path == a.path
    for k in ("views", "depth", "normals", "object_id", "K", "cam_to_world", "distortion", "xi"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert b.params == a.params
    assert b.mean == a.mean


def test_samples_derive_geometry_that_matches_the_renderer(items):
    kw = {"views": 2, "size": 32, "roll": 20.0, "distortion": 0.2, "fov": (50.0, 80.0)}
    data = generate_render3d(n=2, seed=2, source=items, cache=False, **kw)
    sample = data[1]
    shapes = {"views": (2, 3, 32, 32), "depth": (2, 32, 32), "pointmap": (2, 32, 32, 3), "rays": (2, 32, 32, 3)}
    shapes |= {"K": (2, 3, 3), "cam_to_world": (2, 4, 4), "distortion": (2, 5), "xi": (2,), "object_id": (2, 32, 32)}
    for k, shape in shapes.items():
        assert tuple(sample[k].shape) == shape, k
    # re-render sample 1 from its own stream: the stored-and-derived fields equal the renderer's
    rng = np.random.default_rng([2, 0, 1, 0x523344])
    scene, _ = r3d.sample_boxes_scene(rng, items.images, 4, True)
    cameras = r3d.sample_orbit_cameras(rng, 2, 32, (50.0, 80.0), 60.0, 20.0, 0.2, 0.0)
    out = r3d.render(scene, cameras)
    assert torch.equal(sample["views"], out["rgb"])
    assert torch.equal(sample["valid"], out["valid"])
    for k in ("pointmap", "pointmap_cam", "rays"):
        torch.testing.assert_close(sample[k], out[k], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sample["normals"], out["normals"], atol=1e-3, rtol=0)
    assert bool((sample["distortion"][:, 0] != 0).all())  # the lenses really are distorted
    batch = data.collate([data[0], data[1]])
    assert batch["views"].shape == (2, 2, 3, 32, 32)
    assert batch["cam_to_world"].shape == (2, 2, 4, 4)
    data.cameras(0).check_views(batch["views"][0])


def test_supersampling_changes_colours_only(items):
    rng = np.random.default_rng(0)
    scene, _ = r3d.sample_boxes_scene(rng, items.images)
    cameras = r3d.sample_orbit_cameras(rng, 2, 32)
    plain, smooth = r3d.render(scene, cameras), r3d.render(scene, cameras, supersample=2)
    for k in ("depth", "pointmap", "normals", "object_id"):
        assert torch.equal(plain[k], smooth[k]), k
    assert not torch.equal(plain["rgb"], smooth["rgb"])


def test_make_render3d_writes_set_preview_and_info(fmnist_dir, tmp_path):
    out = tmp_path / "r3d"
    argv = f"data make render3d --out {out} --n 3 --views 3 --size 32 --split test --data-dir {fmnist_dir}"
    assert run(argv.split()) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["num_samples"] == 3
    assert info["num_views"] == 3
    assert info["img_size"] == [32, 32]
    assert (out / "preview.png").stat().st_size > 1000
    loaded = Render3DDataset.load(out / "render3d.npz")
    assert loaded.views.shape == (3, 3, 3, 32, 32)
    again = synthetic.make_dataset("render3d", "test", n=3, views=3, size=32, data_dir=fmnist_dir)  # from the cache
    assert torch.equal(again.views, loaded.views)


def test_bad_input_errors(items, tmp_path):
    with pytest.raises(ValueError, match="views=0 is out of range"):
        generate_render3d(n=1, views=0, source=items, cache=False)
    with pytest.raises(ValueError, match="fov="):
        generate_render3d(n=1, fov=(80.0, 40.0), source=items, cache=False)
    with pytest.raises(ValueError, match="textures"):
        r3d.Scene([r3d.Box((0, 0, 0), (1, 1, 1), texture=3)], _flat_textures(2))
    with pytest.raises(ValueError, match="views applies to the multi-view generators"):
        synthetic.make("fmnist_scenes", tmp_path / "x", n=1, views=2)
    with pytest.raises(ValueError, match="canvas and frames do not apply"):
        synthetic.make("render3d", tmp_path / "y", n=1, canvas=64)
    with pytest.raises(vd.DataError, match="views must be uint8"):
        Render3DDataset(*(torch.zeros(1) for _ in range(8)))
    with pytest.raises(cam.CameraError, match="not a rotation"):
        Cameras(torch.eye(3), torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0])), (8, 8))


def test_render3d_shared_orbit_differs_by_azimuth_only_and_leaves_the_default_alone():
    def cams(**kw):
        return r3d.sample_orbit_cameras(np.random.default_rng(3), 3, 32, fov=(60.0, 60.0), spread=30.0, **kw)

    plain, same, shared = cams(), cams(shared_orbit=False), cams(shared_orbit=True)
    torch.testing.assert_close(plain.cam_to_world, same.cam_to_world)
    torch.testing.assert_close(plain.cam_to_world[0], shared.cam_to_world[0])  # view 1 is untouched
    c2w = shared.cam_to_world.double()
    eye, fwd = c2w[:, :3, 3], c2w[:, :3, 2]
    assert torch.allclose(eye[:, 2], eye[0, 2].expand(3))  # one height
    pitch = torch.asin(fwd[:, 2])
    assert torch.allclose(pitch, pitch[0].expand(3), atol=1e-5)
    # the relative rotation is a turn about the vertical by the azimuth change of the optical axes
    yaw = torch.atan2(fwd[:, 1], fwd[:, 0])
    rel = c2w[0, :3, :3].T @ c2w[1:, :3, :3]
    angle = torch.rad2deg(torch.acos(((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))
    dyaw = torch.rad2deg(torch.remainder(yaw[1:] - yaw[0] + math.pi, 2 * math.pi) - math.pi).abs()
    torch.testing.assert_close(angle, dyaw, atol=1e-3, rtol=0)


def test_render3d_pan_turns_one_eye_about_the_vertical_and_rejects_a_second_motion(tmp_cache):
    def cams(**kw):
        return r3d.sample_orbit_cameras(np.random.default_rng(5), 3, 32, fov=(60.0, 60.0), spread=30.0, **kw)

    plain, pan = cams(), cams(pan=True)
    torch.testing.assert_close(plain.cam_to_world[0, :3, 3], pan.cam_to_world[0, :3, 3])  # view 1's eye is kept
    torch.testing.assert_close(plain.K, pan.K)  # the lens draws come first: unchanged
    assert not torch.allclose(plain.cam_to_world[0, :3, 2], pan.cam_to_world[0, :3, 2])  # the rig turns as a whole
    c2w = pan.cam_to_world.double()
    eye, fwd = c2w[:, :3, 3], c2w[:, :3, 2]
    torch.testing.assert_close(eye, eye[:1].expand(3, 3))  # one eye: no baseline
    pitch = torch.asin(fwd[:, 2])
    assert torch.allclose(pitch, pitch[0].expand(3), atol=1e-5)
    # the pan angles are the azimuth draws: view 2's turn equals the orbit's azimuth change of the plain draw
    yaw = torch.atan2(fwd[:, 1], fwd[:, 0])
    eye_plain = plain.cam_to_world[:, :3, 3].double()
    orbit = torch.atan2(eye_plain[:, 1], eye_plain[:, 0])
    wrap = lambda a: torch.remainder(a + math.pi, 2 * math.pi) - math.pi  # noqa: E731
    torch.testing.assert_close(wrap(yaw[1:] - yaw[0]), wrap(orbit[1:] - orbit[0]), atol=1e-5, rtol=0)
    assert (wrap(yaw[1:] - yaw[0]).abs() > 1e-3).all()  # the views do turn
    with pytest.raises(ValueError, match="pick at most one"):
        cams(pan=True, shared_orbit=True)
    with pytest.raises(ValueError, match="pick at most one"):
        generate_render3d("train", 2, size=16, pan=True, shared_orbit=True, cache=False)
