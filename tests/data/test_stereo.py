"""The Middlebury pair loader: its calibration agrees with the ground-truth disparity through the camera module."""

import pytest
import torch

from vitlab.data.stereo import load_middlebury_pair
from vitlab.layers.camera import (
    check_intrinsics,
    check_pose,
    invert_pose,
    pixel_grid,
    project,
    transform_points,
    unproject,
)

pytest.importorskip("skimage")


def _right_columns(pair: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # left pixels -> 3-D points at the GT depth -> the right camera: where do they land?
    H, W = pair["depth"].shape
    uv = pixel_grid(H, W)
    points, _ = unproject(uv, pair["K"][0], None, None, pair["depth"].clamp_min(1e-3))
    to_right = invert_pose(pair["cam_to_world"][1]) @ pair["cam_to_world"][0]
    right_uv, _ = project(transform_points(to_right, points), pair["K"][1])
    return uv, right_uv


@pytest.mark.parametrize("size", [None, 48])
def test_calibration_reproduces_the_disparity(size):
    pair = load_middlebury_pair(size)
    S = pair["depth"].shape
    assert pair["images"].shape == (2, 3, *S)
    assert pair["images"].dtype == torch.uint8
    assert ((500, 741) if size is None else (48, 48)) == S
    check_intrinsics(pair["K"])
    check_pose(pair["cam_to_world"])
    valid = pair["valid"]
    assert 0.5 < valid.float().mean() < 1.0  # most pixels have ground truth, not all
    assert (pair["depth"][valid] > 0).all()
    assert (pair["depth"][~valid] == 0).all()
    uv, right_uv = _right_columns(pair)
    # a left pixel at column x with disparity d appears at x - d on the same row of the right view
    expected = uv[..., 0] - pair["disparity"]
    assert torch.allclose(right_uv[..., 0][valid], expected[valid], atol=1e-3 * (1 if size else 10))
    assert torch.allclose(right_uv[..., 1][valid], uv[..., 1][valid], atol=1e-3)


def test_right_view_matches_the_left_at_the_disparity():
    # photo-consistency: the left colour at (r, c) is the right colour at (r, c - d), far better than at c + d
    pair = load_middlebury_pair()
    left, right = pair["images"].float()
    rows, cols = torch.nonzero(pair["valid"], as_tuple=True)
    rows, cols = rows[::50], cols[::50]
    d = pair["disparity"][rows, cols]
    errors = []
    for sign in (-1, 1):
        c = (cols + sign * d).round().long()
        ok = (c >= 0) & (c < left.shape[-1])
        errors.append((left[:, rows[ok], cols[ok]] - right[:, rows[ok], c[ok]]).abs().mean())
    assert errors[0] < 0.5 * errors[1]


def test_bad_size():
    with pytest.raises(ValueError, match="size"):
        load_middlebury_pair(0)
