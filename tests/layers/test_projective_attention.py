"""Projective attention (MvP): projection agrees with the camera module, sampling at a projected point reads the
feature there, mean fusion is order-free over views, and bad cameras are refused."""

import math

import pytest
import torch

from vitlab.layers.camera import CameraError, Cameras, intrinsics_from_fov, look_at
from vitlab.layers.projective_attention import ProjectiveAttention, project_to_views

torch.set_num_threads(1)
S = 32  # image size


def _rig(B: int = 2, V: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    az = 2 * math.pi * torch.arange(V) / V + 0.3 * torch.arange(B)[:, None]
    eye = torch.stack([4 * az.cos(), 4 * az.sin(), torch.full_like(az, 1.8)], -1)
    c2w = look_at(eye, torch.tensor([0.0, 0.0, 0.9]).expand(B, V, 3))
    return intrinsics_from_fov(torch.full((B, V), math.radians(60.0)), S, S), c2w


def test_projection_matches_camera_module():
    K, c2w = _rig()
    points = torch.randn(2, 5, 3) * 0.5 + torch.tensor([0.0, 0.0, 0.9])
    loc, visible = project_to_views(points, K, c2w, (S, S))
    uv, depth, front = Cameras(K, c2w, (S, S)).project(points[:, None].expand(-1, 3, -1, -1))  # (B, V, Q, ...)
    torch.testing.assert_close(loc * S, uv.transpose(1, 2), atol=1e-4, rtol=0)
    inside = ((uv >= 0) & (uv <= S)).all(-1) & front & (depth > 0)
    assert torch.equal(visible, inside.transpose(1, 2))
    assert visible.all()  # the room centre is in every view
    # a point high above the room is outside every (near-horizontal, 60 deg) view
    far = torch.tensor([[[0.0, 0.0, 50.0]]]).expand(2, 1, 3)
    assert not project_to_views(far, K, c2w, (S, S))[1][:, :, 0].any()


def _identity_attention(dim: int, fusion: str = "mean", views: int | None = None) -> ProjectiveAttention:
    attn = ProjectiveAttention(dim, num_heads=2, num_points=1, fusion=fusion, num_views=views)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(dim, proj.weight.shape[1]))
            proj.bias.zero_()
    return attn


def test_sampling_at_projected_point_reads_that_feature():
    # a world point that projects onto the centre of feature pixel (r, c) of view 0 returns that pixel's feature
    K, c2w = _rig(1, 2)
    h = w = 8
    stride = S // h
    r, c = 3, 5
    uv = torch.tensor([(c + 0.5) * stride, (r + 0.5) * stride])
    ray = torch.linalg.solve(K[0, 0], torch.cat([uv, torch.ones(1)]))
    point = c2w[0, 0, :3, :3] @ (ray * 3.0) + c2w[0, 0, :3, 3]  # 3 m in front of camera 0
    value = torch.randn(1, 2, 4, h, w)
    attn = _identity_attention(4)
    loc, visible = project_to_views(point.view(1, 1, 3), K, c2w, (S, S))
    torch.testing.assert_close(loc[0, 0, 0], torch.tensor([(c + 0.5) / w, (r + 0.5) / h]), atol=1e-5, rtol=0)
    out = attn(torch.zeros(1, 1, 4), point.view(1, 1, 3), value, K, c2w, (S, S))
    # mean fusion over the views that see the point; view 1 sees it somewhere else: read view 0 alone
    only0 = attn(torch.zeros(1, 1, 4), point.view(1, 1, 3), value[:, :1], K[:, :1], c2w[:, :1], (S, S))
    torch.testing.assert_close(only0[0, 0], value[0, 0, :, r, c], atol=1e-5, rtol=0)
    assert visible[0, 0].all()
    assert not torch.allclose(out, only0)


def test_mean_fusion_is_invariant_to_view_order_and_concat_is_not():
    torch.manual_seed(0)
    K, c2w = _rig(2, 3)
    q, pts = torch.randn(2, 6, 16), torch.randn(2, 6, 3) * 0.4 + torch.tensor([0.0, 0.0, 0.9])
    value = torch.randn(2, 3, 16, 8, 8)
    perm = torch.tensor([2, 0, 1])
    mean = ProjectiveAttention(16, 4, 3, "mean")
    a = mean(q, pts, value, K, c2w, (S, S))
    b = mean(q, pts, value[:, perm], K[:, perm], c2w[:, perm], (S, S))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    concat = ProjectiveAttention(16, 4, 3, "concat", num_views=3)
    a = concat(q, pts, value, K, c2w, (S, S))
    assert not torch.allclose(a, concat(q, pts, value[:, perm], K[:, perm], c2w[:, perm], (S, S)), atol=1e-4)


def test_point_seen_by_no_view_gives_bias_only_and_gradients_flow():
    K, c2w = _rig(1, 2)
    attn = ProjectiveAttention(8, 2, 2, "concat", num_views=2)
    value = torch.randn(1, 2, 8, 4, 4, requires_grad=True)
    q = torch.randn(1, 2, 8)
    pts = torch.tensor([[[0.0, 0.0, 50.0], [0.0, 0.0, 0.9]]])
    out = attn(q, pts, value, K, c2w, (S, S))
    torch.testing.assert_close(out[0, 0], attn.output_proj.bias)
    out[0, 1].sum().backward()
    # the offsets are learned through the bilinear sampling (their weight starts at zero, their gradient does not)
    assert value.grad.abs().sum() > 0
    assert attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_bad_cameras_raise():
    K, c2w = _rig(1, 2)
    attn = ProjectiveAttention(8, 2, 2, "mean")
    q, pts, value = torch.randn(1, 3, 8), torch.zeros(1, 3, 3), torch.randn(1, 2, 8, 4, 4)
    singular = K.clone()
    singular[0, 1, 0, 0] = 0.0
    with pytest.raises(CameraError, match="singular"):
        attn(q, pts, value, singular, c2w, (S, S))
    scaled = c2w.clone()
    scaled[0, 0, :3, :3] *= 1.5
    with pytest.raises(CameraError, match="not a rotation"):
        attn(q, pts, value, K, scaled, (S, S))
    with pytest.raises(CameraError, match="one per view of 2 views"):
        attn(q, pts, value, K[:, :1], c2w[:, :1], (S, S))
    with pytest.raises(CameraError, match="num_views=3"):
        ProjectiveAttention(8, 2, 2, "concat", num_views=3)(q, pts, value, K, c2w, (S, S))
    with pytest.raises(ValueError, match="fusion"):
        ProjectiveAttention(8, 2, 2, "max")
    with pytest.raises(ValueError, match="num_views"):
        ProjectiveAttention(8, 2, 2, "concat")
