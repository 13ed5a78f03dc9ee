"""VGGT's tracking targets and soft-argmax (paper 37): ground-truth correspondences on analytic scenes against hand
computation, and the soft-argmax of a one-hot correlation."""

import math

import pytest
import torch

from vitlab.layers.camera import axis_angle_to_matrix, intrinsics_from_fov, pose_from_rt
from vitlab.tasks.multiview.geometry import track_ground_truth
from vitlab.tasks.multiview.heads import TrackHead, query_grid, soft_argmax

S = 16


def _scene(c2w_2: torch.Tensor, depth_2: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Two 16 px frames of a fronto-parallel plane at z = 2 in camera 1 (90 deg FoV: f = 8, centre 8)."""
    K = intrinsics_from_fov(torch.full((1, 2), math.pi / 2), S, S)
    depth = torch.full((1, 2, S, S), 2.0)
    if depth_2 is not None:
        depth[0, 1] = depth_2
    c2w = torch.stack([torch.eye(4), c2w_2])[None]
    return depth, depth > 0, K, c2w


def test_identity_camera_maps_every_pixel_to_itself():
    queries = query_grid(16, S)
    uv, visible, ok = track_ground_truth(queries, *_scene(torch.eye(4)))
    assert torch.allclose(uv[0, 0], queries, atol=1e-5)
    assert torch.allclose(uv[0, 1], queries, atol=1e-5)
    assert visible.all()
    assert ok.all()


def test_pure_translation_shifts_by_f_t_over_z():
    # camera 2 moved by 0.5 along camera 1's x axis: a point at depth 2 shifts by -f t / z = -8 * 0.5 / 2 = -2 px
    queries = torch.tensor([[8.5, 4.5], [1.5, 10.5], [15.5, 15.5]])
    uv, visible, _ = track_ground_truth(queries, *_scene(pose_from_rt(torch.eye(3), torch.tensor([0.5, 0.0, 0.0]))))
    assert torch.allclose(uv[0, 1], queries - torch.tensor([2.0, 0.0]), atol=1e-5)
    assert visible[0, 1].tolist() == [True, False, True]  # u = -0.5 leaves the image
    # moved forward by 1 (z 2 -> 1): offsets from the centre double; visible only where the new depth map agrees
    fwd = pose_from_rt(torch.eye(3), torch.tensor([0.0, 0.0, 1.0]))
    uv, visible, _ = track_ground_truth(queries, *_scene(fwd, torch.full((S, S), 1.0)))
    assert torch.allclose(uv[0, 1], 8 + 2 * (queries - 8), atol=1e-5)
    assert visible[0, 1].tolist() == [True, False, False]  # two leave the 16 px frame
    # an occluder at depth 0.5 in front of the plane hides every point
    _, hidden, _ = track_ground_truth(queries, *_scene(fwd, torch.full((S, S), 0.5)))
    assert not hidden[0, 1].any()


def test_rotation_about_the_optical_axis_turns_pixels_about_the_centre():
    # camera 2 rolled by 90 deg about z: pixel offsets from the principal point turn by -90 deg
    roll = pose_from_rt(axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2])), torch.zeros(3))
    queries = torch.tensor([[12.5, 8.0], [8.0, 3.5]])
    uv, visible, _ = track_ground_truth(queries, *_scene(roll))
    off = queries - 8
    assert torch.allclose(uv[0, 1] - 8, torch.stack([off[:, 1], -off[:, 0]], -1), atol=1e-5)
    assert visible[0, 1].all()


def test_invalid_query_depth_and_bad_input():
    depth, valid, K, c2w = _scene(torch.eye(4))
    valid[0, 0, 4, 8] = False
    _, visible, ok = track_ground_truth(torch.tensor([[8.5, 4.5], [2.5, 2.5]]), depth, valid, K, c2w)
    assert ok[0].tolist() == [False, True]
    assert visible[0, :, 0].tolist() == [False, False]
    with pytest.raises(ValueError, match="inside the 16 x 16 frame"):
        track_ground_truth(torch.tensor([[16.5, 2.0]]), depth, valid, K, c2w)
    with pytest.raises(ValueError, match="queries must be"):
        track_ground_truth(torch.zeros(3), depth, valid, K, c2w)
    with pytest.raises(ValueError, match="cam_to_world"):
        track_ground_truth(torch.tensor([[2.5, 2.5]]), depth, valid, K, c2w[:, :1])


def test_soft_argmax_of_a_one_hot_correlation_is_that_pixel():
    logits = torch.full((2, 5, 7), -1e4)
    logits[0, 3, 6] = 0.0
    logits[1, 0, 2] = 0.0
    assert torch.allclose(soft_argmax(logits), torch.tensor([[6.5, 3.5], [2.5, 0.5]]))
    flat = soft_argmax(torch.zeros(1, 4, 4))  # uniform: the image centre
    assert torch.allclose(flat, torch.tensor([[2.0, 2.0]]))


def test_track_head_follows_features_that_match_exactly():
    # frame 2's features are frame 1's shifted by (+3, +1) px: one-hot features make the correlation one-hot
    H = W = 8
    f1 = torch.eye(H * W).view(H, W, H * W)
    f2 = torch.roll(f1, shifts=(1, 3), dims=(0, 1))
    head = TrackHead(H * W)
    with torch.no_grad():
        head.log_temperature.fill_(math.log(200.0))
    queries = torch.tensor([[1.5, 2.5], [3.5, 5.5]])
    track, vis = head(torch.stack([f1, f2])[None], queries)
    assert torch.allclose(track[0, 0], queries, atol=1e-3)
    assert torch.allclose(track[0, 1], queries + torch.tensor([3.0, 1.0]), atol=1e-3)
    assert vis.shape == (1, 2, 2)


def test_query_grid():
    assert query_grid(4, 16).tolist() == [[4.5, 4.5], [12.5, 4.5], [4.5, 12.5], [12.5, 12.5]]
    with pytest.raises(ValueError, match="square number"):
        query_grid(5, 16)
