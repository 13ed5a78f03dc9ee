"""Point-cloud tiles of ``vitlab predict`` for the pointmap tasks: framing, z-buffer, scale alignment, bad input."""

import pytest
import torch

from vitlab.tasks.multiview.pointcloud import cloud_frame, pointcloud_tiles, splat_points


def test_the_median_point_lands_at_the_tile_centre_and_the_nearest_point_wins():
    points = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0], [1.0, 0.0, 2.0], [-1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    frame = cloud_frame(points, yaw_deg=0.0, pitch_deg=0.0)  # looking along view 1's z: x right, y down
    assert torch.equal(frame[0], torch.tensor([0.0, 0.0, 2.0]))
    colours = torch.tensor([[255, 0, 0], [0, 0, 255], [9, 9, 9], [9, 9, 9], [9, 9, 9]], dtype=torch.uint8)
    tile = splat_points(points, colours, frame, size=33, radius=0)
    assert tile[16, 16].tolist() == [255, 0, 0]  # the point at z = 1 hides the one behind it at z = 3
    assert tile[16].any(-1).sum() == 3
    assert tile[:, 16].any(-1).sum() == 2
    assert tile[:, :16].any()
    assert not tile[:16, 16:].any()


def test_a_prediction_at_another_scale_draws_the_same_cloud():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(2, 8, 8, 3, generator=g) + torch.tensor([0.0, 0.0, 4.0])
    views = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g)
    valid = torch.rand(2, 8, 8, generator=g) > 0.2
    pred_tile, true_tile = pointcloud_tiles(views, 0.25 * true, true, valid, size=32)
    assert (pred_tile == true_tile).all()
    assert true_tile.any()
    moved, _ = pointcloud_tiles(views, true + torch.tensor([0.5, 0.0, 0.0]), true, valid, size=32)
    assert not (moved == true_tile).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="points must be a non-empty"):
        cloud_frame(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="points and colours"):
        splat_points(torch.zeros(4, 3), torch.zeros(3, 3, dtype=torch.uint8), cloud_frame(torch.rand(4, 3)), 8)
    with pytest.raises(ValueError, match="same views"):
        pointcloud_tiles(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, 4, 4, 3), torch.zeros(1, 4, 4, 3),
                         torch.ones(2, 4, 4, dtype=torch.bool), 8)  # fmt: skip
