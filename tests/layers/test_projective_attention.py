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


def _point_at_pixel(K, c2w, r: float, c: float, stride: float) -> torch.Tensor:
    """A world point 3 m in front of camera 0 of scene 0 that projects onto the centre of map pixel (r, c)."""
    uv = torch.tensor([(c + 0.5) * stride, (r + 0.5) * stride])
    ray = torch.linalg.solve(K[0, 0], torch.cat([uv, torch.ones(1)]))
    return c2w[0, 0, :3, :3] @ (ray * 3.0) + c2w[0, 0, :3, 3]


def test_one_level_equals_the_single_map_attention_and_extra_levels_can_be_switched_off():
    torch.manual_seed(0)
    K, c2w = _rig(2, 3)
    q, pts = torch.randn(2, 6, 16), torch.randn(2, 6, 3) * 0.4 + torch.tensor([0.0, 0.0, 0.9])
    maps = [torch.randn(2, 3, 16, 8, 8), torch.randn(2, 3, 16, 16, 16)]
    one = ProjectiveAttention(16, 4, 3, "concat", num_views=3)
    with torch.no_grad():  # non-trivial offsets and weights, so every sample point and weight matters
        one.sampling_offsets.weight.normal_(0, 0.1)
        one.attention_weights.weight.normal_(0, 0.1)
    ref = one(q, pts, maps[0], K, c2w, (S, S))
    torch.testing.assert_close(one(q, pts, maps[:1], K, c2w, (S, S)), ref)  # a list of one map: the same
    two = ProjectiveAttention(16, 4, 3, "concat", num_views=3, levels=2)
    with torch.no_grad():  # level 0 carries `one`'s parameters, level 1 gets a weight of exp(-1e4) ~ 0
        for name in ("value_proj", "output_proj"):
            getattr(two, name).load_state_dict(getattr(one, name).state_dict())
        w = two.sampling_offsets.weight.view(4, 2, 3, 2, 16)
        b = two.sampling_offsets.bias.view(4, 2, 3, 2)
        w[:, 0], b[:, 0] = one.sampling_offsets.weight.view(4, 3, 2, 16), one.sampling_offsets.bias.view(4, 3, 2)
        w = two.attention_weights.weight.view(4, 2, 3, 16)
        b = two.attention_weights.bias.view(4, 2, 3)
        w[:, 0], b[:, 0] = one.attention_weights.weight.view(4, 3, 16), one.attention_weights.bias.view(4, 3)
        w[:, 1], b[:, 1] = 0.0, -1e4
    torch.testing.assert_close(two(q, pts, maps, K, c2w, (S, S)), ref, atol=1e-5, rtol=1e-5)


def test_sampling_at_a_projected_pixel_centre_reads_its_feature_at_each_level():
    K, c2w = _rig(1, 1)
    sizes = [8, 16, 4]
    maps = [torch.randn(1, 1, 4, s, s) for s in sizes]
    attn = ProjectiveAttention(4, num_heads=2, num_points=1, fusion="mean", levels=3)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
    for level, (size, (r, c)) in enumerate(zip(sizes, [(3, 5), (10, 4), (1, 2)], strict=True)):
        point = _point_at_pixel(K, c2w, r, c, S / size).view(1, 1, 3)
        with torch.no_grad():  # all the weight on this level
            attn.attention_weights.bias.view(2, 3, 1).fill_(-1e4)[:, level] = 0.0
        out = attn(torch.zeros(1, 1, 4), point, maps, K, c2w, (S, S))
        torch.testing.assert_close(out[0, 0], maps[level][0, 0, :, r, c], atol=1e-5, rtol=0)
    with torch.no_grad():  # equal weights: the mean of the three levels' bilinear reads
        attn.attention_weights.bias.zero_()
    point = _point_at_pixel(K, c2w, 3, 5, S / 8).view(1, 1, 3)  # centre of (3, 5) at 8 px: a corner at 16 px
    out = attn(torch.zeros(1, 1, 4), point, maps, K, c2w, (S, S))
    fine = maps[1][0, 0, :, 6:8, 10:12].mean((-1, -2))
    # at 4 x 4 the pixel (u, v) = (22, 14) is (x, y) = (2.75, 1.75) cells: 3/4 of rows 1 and cols 2, 1/4 of the next
    bilinear = torch.tensor([[0.75 * 0.75, 0.75 * 0.25], [0.25 * 0.75, 0.25 * 0.25]])
    coarse = (maps[2][0, 0, :, 1:3, 2:4] * bilinear).sum((-1, -2))
    torch.testing.assert_close(out[0, 0], (maps[0][0, 0, :, 3, 5] + fine + coarse) / 3, atol=1e-5, rtol=0)


@pytest.mark.parametrize("levels", [2, 3])
def test_multi_level_shapes_gradients_and_errors(levels):
    torch.manual_seed(0)
    K, c2w = _rig(2, 3)
    attn = ProjectiveAttention(16, 4, 2, "concat", num_views=3, levels=levels)
    assert attn.sampling_offsets.out_features == 4 * levels * 2 * 2
    maps = [torch.randn(2, 3, 16, s, s, requires_grad=True) for s in (8, 16, 4)[:levels]]
    q, pts = torch.randn(2, 5, 16), torch.randn(2, 5, 3) * 0.4 + torch.tensor([0.0, 0.0, 0.9])
    out = attn(q, pts, maps, K, c2w, (S, S))
    assert out.shape == (2, 5, 16)
    out.sum().backward()
    assert all(m.grad.abs().sum() > 0 for m in maps)  # every level is read
    with pytest.raises(ValueError, match=f"levels={levels}"):
        attn(q, pts, maps[:1], K, c2w, (S, S))
    with pytest.raises(ValueError, match="level 1"):
        attn(q, pts, [maps[0], maps[1][:, :2], *maps[2:]], K, c2w, (S, S))
    with pytest.raises(ValueError, match="levels >= 1"):
        ProjectiveAttention(16, 4, 2, "mean", levels=0)
