"""Camera geometry: round trips, analytic cases, the lens models, Plücker coordinates and the errors on bad cameras."""

import math

import pytest
import torch

from vitlab.layers import camera as cam
from vitlab.layers.camera import CameraError, Cameras

H, W = 24, 32
DIST = torch.tensor([-0.25, 0.08, 0.002, -0.003, -0.01])  # (k1, k2, p1, p2, k3): moderate barrel distortion
LENSES = {
    "pinhole": (None, None),
    "brown_conrady": (DIST, None),
    "ucm": (None, torch.tensor(0.6)),
    "ucm_distorted": (DIST * 0.5, torch.tensor(0.9)),
}


def _intrinsics() -> torch.Tensor:
    return cam.intrinsics_matrix(30.0, 28.0, 16.3, 11.7, skew=0.4)


def _poses(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return cam.pose_from_rt(cam.random_rotation(n, g), torch.randn(n, 3, generator=g) * 3)


def test_pose_round_trips():
    pose = _poses(5)
    eye = torch.eye(4).expand(5, 4, 4)
    torch.testing.assert_close(cam.invert_pose(pose) @ pose, eye, atol=1e-5, rtol=0)
    p = torch.randn(5, 7, 3)
    back = cam.transform_points(cam.invert_pose(pose)[:, None], cam.transform_points(pose[:, None], p))
    torch.testing.assert_close(back, p, atol=1e-5, rtol=0)
    # the translation is the camera centre: the camera-frame origin lands there
    torch.testing.assert_close(cam.transform_points(pose, torch.zeros(5, 3)), pose[:, :3, 3])


@pytest.mark.parametrize("lens", list(LENSES))
@pytest.mark.parametrize("depth_kind", ["z", "distance"])
def test_project_unproject_round_trip(lens, depth_kind):
    dist, xi = LENSES[lens]
    uv = cam.pixel_grid(H, W)
    depth = torch.rand(H, W, generator=torch.Generator().manual_seed(1)) * 5 + 0.5
    points, valid = cam.unproject(uv, _intrinsics(), dist, xi, depth, depth_kind)
    assert bool(valid.all())
    measured = points[..., 2] if depth_kind == "z" else points.norm(dim=-1)
    torch.testing.assert_close(measured, depth, atol=1e-4, rtol=1e-5)
    uv_back, in_front = cam.project(points, _intrinsics(), dist, xi)
    assert bool(in_front.all())
    torch.testing.assert_close(uv_back, uv, atol=2e-3, rtol=0)


@pytest.mark.parametrize("lens", list(LENSES))
def test_optical_axis_hits_the_principal_point(lens):
    dist, xi = LENSES[lens]
    uv, valid = cam.project(torch.tensor([[0.0, 0.0, 0.7], [0.0, 0.0, 42.0]]), _intrinsics(), dist, xi)
    assert bool(valid.all())
    torch.testing.assert_close(uv, torch.tensor([[16.3, 11.7]] * 2))
    # and the principal point's ray is the optical axis
    ray, _ = cam.unproject(torch.tensor([16.3, 11.7]), _intrinsics(), dist, xi)
    torch.testing.assert_close(ray, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)


def test_pinhole_matches_k_times_point():
    p = torch.tensor([[0.3, -0.2, 2.0], [-1.0, 0.5, 4.0]])
    uvw = p @ _intrinsics().T
    uv, _ = cam.project(p, _intrinsics())
    torch.testing.assert_close(uv, uvw[:, :2] / uvw[:, 2:])
    # pixel centres at +0.5: pixel (0, 0) of a centred camera looks up-left of the axis by half a pixel less
    K = cam.intrinsics_from_fov(math.radians(90), H, W)
    ray, _ = cam.unproject(torch.tensor([0.5, 0.5]), K)
    torch.testing.assert_close(ray / ray[2], torch.tensor([(0.5 - W / 2) / (W / 2), (0.5 - H / 2) / (W / 2), 1.0]))


def test_distort_undistort_round_trip_and_analytic_radial():
    g = torch.Generator().manual_seed(2)
    m = (torch.rand(500, 2, generator=g) - 0.5) * 1.2
    torch.testing.assert_close(cam.undistort(cam.distort(m, DIST), DIST)[0], m, atol=1e-5, rtol=0)
    md = (torch.rand(500, 2, generator=g) - 0.5) * 1.0
    back, ok = cam.undistort(md, DIST)
    assert bool(ok.all())
    torch.testing.assert_close(cam.distort(back, DIST), md, atol=1e-5, rtol=0)
    # k1 alone on the x axis: x (1 + k1 x^2); zero coefficients leave points alone
    x = torch.tensor([[0.5, 0.0]])
    torch.testing.assert_close(cam.distort(x, torch.tensor([0.2, 0, 0, 0, 0])), torch.tensor([[0.5 * 1.05, 0.0]]))
    torch.testing.assert_close(cam.distort(m, torch.zeros(5)), m)


def test_undistort_flags_points_beyond_the_invertible_radius():
    strong = torch.tensor([-0.6, 0.0, 0.0, 0.0, 0.0])  # x (1 - 0.6 x^2) peaks at r = 0.745, md = 0.497
    _, ok = cam.undistort(torch.tensor([[0.3, 0.0], [0.7, 0.0]]), strong)
    assert ok.tolist() == [True, False]


def test_ucm_with_xi_zero_is_the_pinhole_and_analytic_side_point():
    p = torch.randn(50, 3) + torch.tensor([0.0, 0.0, 4.0])
    uv0, _ = cam.project(p, _intrinsics(), xi=torch.tensor(0.0))
    torch.testing.assert_close(uv0, cam.project(p, _intrinsics())[0])
    rays0, _ = cam.camera_rays(_intrinsics(), H, W, xi=torch.tensor(0.0))
    torch.testing.assert_close(rays0, cam.camera_rays(_intrinsics(), H, W)[0])
    # xi = 1 (parabolic): a point 90 degrees off axis lands at m = 1, i.e. u = fx + cx; behind the lens is invalid
    K = cam.intrinsics_matrix(10.0, 10.0, 5.0, 5.0)
    uv, valid = cam.project(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -1.0]]), K, xi=torch.tensor(1.0))
    torch.testing.assert_close(uv[0], torch.tensor([15.0, 5.0]))
    assert valid.tolist() == [True, False]


def test_rays_are_unit_and_plucker_moment_is_orthogonal_and_origin_free():
    K = torch.stack([_intrinsics(), cam.intrinsics_from_fov(1.2, H, W)])
    cameras = Cameras(K, _poses(2), (H, W), DIST.expand(2, 5), torch.tensor([0.0, 0.5]))
    origins, dirs, valid = cameras.rays()
    assert origins.shape == dirs.shape == (2, H, W, 3)
    assert bool(valid.all())
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(2, H, W))
    pl = cameras.plucker()
    assert pl.shape == (2, H, W, 6)
    torch.testing.assert_close((pl[..., :3] * pl[..., 3:]).sum(-1), torch.zeros(2, H, W), atol=1e-5, rtol=0)
    shifted = cam.plucker(origins + 2.5 * dirs, dirs)  # another point on the same rays
    torch.testing.assert_close(shifted, pl, atol=1e-5, rtol=0)
    # world rays leave the camera centre and pass through the world point of a depth map
    depth = torch.full((2, H, W), 3.0)
    world, _ = cameras.unproject(depth, depth_kind="distance")
    torch.testing.assert_close(world, origins + 3.0 * dirs, atol=1e-5, rtol=0)


def test_cameras_project_unproject_round_trip_and_multi_view():
    K = cam.intrinsics_from_fov(torch.tensor([1.0, 1.4]), H, W)
    cameras = Cameras(K, _poses(2, seed=3), (H, W), DIST.expand(2, 5) * 0.5)
    depth = torch.rand(2, H, W, generator=torch.Generator().manual_seed(4)) * 4 + 1
    world, valid = cameras.unproject(depth)
    assert bool(valid.all())
    uv, z, in_front = cameras.project(world)
    assert bool(in_front.all())
    torch.testing.assert_close(uv, cam.pixel_grid(H, W).expand(2, H, W, 2), atol=2e-3, rtol=0)
    torch.testing.assert_close(z, depth, atol=1e-4, rtol=0)
    eye = torch.eye(4).expand(2, 4, 4)
    torch.testing.assert_close(cameras.world_to_cam @ cameras.cam_to_world, eye, atol=1e-5, rtol=0)


def test_look_at_points_the_optical_axis_and_keeps_up_up():
    eye, target = torch.tensor([4.0, -3.0, 2.0]), torch.tensor([0.5, 0.2, 0.3])
    pose = cam.look_at(eye, target)
    cam.check_pose(pose)
    K = cam.intrinsics_from_fov(1.0, H, W)
    cameras = Cameras(K, pose, (H, W))
    uv, z, ok = cameras.project(torch.stack([target, target + torch.tensor([0.0, 0.0, 0.5])]))
    torch.testing.assert_close(uv[0], torch.tensor([W / 2, H / 2]), atol=1e-4, rtol=0)
    assert bool(ok.all())
    assert float(z[0]) == pytest.approx(float((target - eye).norm()), rel=1e-5)
    assert float(uv[1, 1]) < H / 2  # world up is image up (smaller v)
    assert abs(float(uv[1, 0]) - W / 2) < 1e-3  # and no roll: straight above stays on the centre column


def test_random_rotations_and_axis_angle_are_rotations():
    R = cam.random_rotation(64, torch.Generator().manual_seed(0))
    cam.check_pose(cam.pose_from_rt(R, torch.zeros(64, 3)))
    Rz = cam.axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2]))
    torch.testing.assert_close(Rz @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_rotation_6d_round_trip_and_any_input_gives_a_rotation():
    R = cam.random_rotation(32, torch.Generator().manual_seed(1))
    torch.testing.assert_close(cam.rotation_6d_to_matrix(cam.matrix_to_rotation_6d(R)), R, atol=1e-5, rtol=0)
    a = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    M = cam.rotation_6d_to_matrix(a)
    cam.check_pose(cam.pose_from_rt(M, torch.zeros(32, 3)))
    # Gram-Schmidt keeps the first column's direction and the second's plane
    torch.testing.assert_close(M[..., 0], a[:, :3] / a[:, :3].norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)
    assert bool(((M[..., 1] * a[:, 3:]).sum(-1) > 0).all())


def test_errors_on_bad_cameras():
    with pytest.raises(CameraError, match="singular"):
        cam.check_intrinsics(cam.intrinsics_matrix(0.0, 10.0, 5.0, 5.0))
    with pytest.raises(CameraError, match=r"\(\.\.\., 3, 3\)"):
        cam.check_intrinsics(torch.eye(4))
    with pytest.raises(CameraError, match="lower part"):
        cam.check_intrinsics(torch.ones(3, 3))
    reflection = cam.pose_from_rt(torch.diag(torch.tensor([1.0, 1.0, -1.0])), torch.zeros(3))
    with pytest.raises(CameraError, match=r"not a rotation.*det"):
        cam.check_pose(reflection)
    with pytest.raises(CameraError, match="not a rotation"):
        cam.check_pose(cam.pose_from_rt(2 * torch.eye(3), torch.zeros(3)))
    with pytest.raises(CameraError, match="NaN"):
        cam.check_pose(torch.full((4, 4), float("nan")))
    K = cam.intrinsics_from_fov(1.0, H, W)
    with pytest.raises(CameraError, match=r"disagree on the batch/view shape: K \(2, 3\), cam_to_world \(2, 4\)"):
        Cameras(K.expand(2, 3, 3, 3), _poses(8).view(2, 4, 4, 4), (H, W))
    with pytest.raises(CameraError, match="distortion not"):
        Cameras(K, _poses(1)[0], (H, W), distortion=torch.zeros(4))
    cameras = Cameras(K.expand(2, 3, 3), _poses(2), (H, W))
    with pytest.raises(CameraError, match=r"views has batch/view shape \(3,\), but the cameras have \(2,\)"):
        cameras.check_views(torch.zeros(3, 3, H, W))
    with pytest.raises(CameraError, match="eye equals the target"):
        cam.look_at(torch.ones(3), torch.ones(3))
    with pytest.raises(CameraError, match="parallel"):
        cam.look_at(torch.zeros(3), torch.tensor([0.0, 0.0, 5.0]))
    with pytest.raises(ValueError, match="depth_kind"):
        cam.unproject(torch.zeros(2), K, depth=torch.ones(()), depth_kind="ray")


def test_cameras_name_a_bad_image_size_and_take_a_float_xi():
    K = cam.intrinsics_from_fov(1.0, 16, 16).expand(2, 3, 3)
    with pytest.raises(CameraError, match="image_size must be a pair of ints"):
        Cameras(K, _poses(2), 16)
    cameras = Cameras(K, _poses(2), (16, 16), xi=0.5)
    assert cameras.xi.shape == (2,)
    assert float(cameras.xi[0]) == 0.5
