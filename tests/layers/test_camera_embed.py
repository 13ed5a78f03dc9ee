"""layers/camera_embed.py: Fourier rays, RayConv, Plücker maps and UCPE's Lat-Up map against formulas and claims."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.layers import (
    FourierRayEmbed,
    PluckerEmbed,
    RayConv,
    absolute_orientation_map,
    fourier_ray_features,
    plucker_embed,
)


def _token_rays(B=2, H=3, W=4, f=5.0):
    """K⁻¹[u, v, 1] at token centres of a pinhole camera (focal f, principal point at the image centre)."""
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    rays = torch.stack(((u - W / 2) / f, (v - H / 2) / f, torch.ones_like(u)), -1)
    return rays.reshape(1, H * W, 3).expand(B, -1, -1)


def test_fourier_features_follow_multi_hmr():
    rays = _token_rays()
    feats = fourier_ray_features(rays, num_bands=16, max_resolution=64)
    assert feats.shape == (2, 12, 99)  # the paper's 3 + 3 * 16 * 2 channels
    r, n = rays[0, 5], 16
    freqs = torch.linspace(1, 32, n)
    assert torch.allclose(feats[0, 5, :3], r)
    assert torch.allclose(feats[0, 5, 3 + n + 7], torch.sin(math.pi * r[1] * freqs[7]), atol=1e-5)  # y, band 7
    assert torch.allclose(feats[0, 5, 3 + 3 * n + 2 * n + 3], torch.cos(math.pi * r[2] * freqs[3]), atol=1e-5)


@pytest.mark.parametrize("mode", ["concat", "add"])
def test_fourier_ray_embed_modes(mode):
    x = torch.randn(2, 12, 32)
    embed = FourierRayEmbed(32, num_bands=4, mode=mode)
    out = embed(x, _token_rays())
    assert out.shape == (2, 12, embed.out_dim)
    if mode == "concat":
        assert embed.out_dim == 32 + 27
        assert torch.equal(out[..., :32], x)
    else:
        assert embed.out_dim == 32
        assert sum(p.numel() for p in embed.parameters()) == 27 * 32 + 32
    # different intrinsics give a different code: the point of the embedding
    assert not torch.allclose(out, embed(x, _token_rays(f=9.0)))
    with pytest.raises(ValueError, match="rays"):
        embed(x, _token_rays()[:, :5])


def test_ray_conv_concatenates_unit_rays():
    x = torch.randn(2, 8, 3, 4)
    rays = _token_rays().reshape(2, 3, 4, 3) * 3.0
    out = RayConv(8, project=False)(x, rays)
    assert out.shape == (2, 11, 3, 4)
    assert torch.equal(out[:, :8], x)
    assert torch.allclose(out[:, 8:].permute(0, 2, 3, 1), F.normalize(rays, dim=-1))
    conv = RayConv(8)
    assert conv(x, rays).shape == (2, 8, 3, 4)
    with pytest.raises(ValueError, match="rays"):
        conv(x, rays.permute(0, 3, 1, 2))


def test_plucker_embed_values_and_moment_invariance():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 4, 6, 3, generator=g)
    o = torch.randn(2, 3, generator=g)
    feats = plucker_embed(d, o, patch_size=2)
    assert feats.shape == (2, 6, 24)
    dn = F.normalize(d[0, 0, 1], dim=0)  # token 0 holds pixels (0, 0), (0, 1), (1, 0), (1, 1)
    assert torch.allclose(feats[0, 0, 6:12], torch.cat((dn, torch.linalg.cross(o[0], dn))), atol=1e-6)
    assert torch.allclose(feats[0, 1, 18:24], plucker_embed(d[:, 1:2, 3:4], o, 1)[0, 0], atol=1e-6)
    # the moment does not depend on which point of the ray is the origin
    shifted = o[:, None, None] + 2.5 * F.normalize(d, dim=-1)
    assert torch.allclose(plucker_embed(d, shifted, 2), feats, atol=1e-5)
    assert PluckerEmbed(16, 2)(d, o).shape == (2, 6, 16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        plucker_embed(d, o, 4)
    with pytest.raises(ValueError, match="origins"):
        plucker_embed(d, o[:, :2], 2)


def _rot(axis: str, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    R = torch.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def _poses(R: torch.Tensor, t=(0.0, 0.0, 0.0), n=12) -> torch.Tensor:
    P = torch.eye(4)
    P[:3, :3], P[:3, 3] = R, torch.tensor(t)
    return P.expand(1, n, 4, 4)


def test_orientation_map_of_a_level_camera():
    # OpenCV world, up = -y: the centre ray of a level camera has latitude 0 and "up" points to -v in the image
    rays = torch.tensor([[[0.0, 0.0, 1.0]]])
    out = absolute_orientation_map(rays, _poses(torch.eye(3), n=1))
    assert torch.allclose(out, torch.tensor([[[0.0, -1.0, 0.0]]]), atol=1e-6)
    # a ray towards the top of the image (v < 0) looks 45 degrees up
    out = absolute_orientation_map(torch.tensor([[[0.0, -1.0, 1.0]]]), _poses(torch.eye(3), n=1))
    assert torch.allclose(out[..., 2], torch.tensor(math.pi / 4), atol=1e-6)


def test_orientation_map_sees_pitch_and_roll_not_yaw_or_translation():
    rays = _token_rays(B=1)
    level = absolute_orientation_map(rays, _poses(torch.eye(3)))
    yawed = absolute_orientation_map(rays, _poses(_rot("y", 0.7), t=(1.0, -2.0, 3.0)))
    assert torch.allclose(yawed, level, atol=1e-5)
    pitch, roll = 0.3, 0.4
    pitched = absolute_orientation_map(rays, _poses(_rot("x", pitch)))
    rolled = absolute_orientation_map(rays, _poses(_rot("z", roll)))
    assert not torch.allclose(pitched, level, atol=1e-3)
    assert not torch.allclose(rolled, level, atol=1e-3)
    centre = torch.tensor([[[0.0, 0.0, 1.0]]])
    assert torch.allclose(absolute_orientation_map(centre, _poses(_rot("x", pitch), n=1))[..., 2], torch.tensor(pitch))
    rolled_up = absolute_orientation_map(centre, _poses(_rot("z", roll), n=1))[0, 0, :2]
    assert torch.allclose(rolled_up, torch.tensor([-math.sin(roll), -math.cos(roll)]), atol=1e-6)


def test_orientation_map_lens_and_finite_step_options():
    rays = _token_rays(B=1)
    poses = _poses(_rot("x", 0.2) @ _rot("z", 0.3))
    exact = absolute_orientation_map(rays, poses)
    # a pixel projection with fx = fy gives the same directions; the official finite step is close to the limit
    f = 7.0
    pixels = absolute_orientation_map(rays, poses, project=lambda d: f * d[..., :2] / d[..., 2:3] + 3.0)
    assert torch.allclose(pixels, exact, atol=1e-5)
    # pinhole: a great circle images to a straight line, so the official finite step (0.1 rad) is exact
    assert torch.allclose(absolute_orientation_map(rays, poses, delta=0.1), exact, atol=1e-5)
    # a unified-camera-model lens (xi = 0.8) bends it: the step and the derivative then differ slightly
    ucm = lambda d: d[..., :2] / (d[..., 2:3] + 0.8 * d.norm(dim=-1, keepdim=True))  # noqa: E731
    wide = absolute_orientation_map(rays, poses, project=ucm)
    step = absolute_orientation_map(rays, poses, project=ucm, delta=0.1)
    assert torch.allclose(step, wide, atol=0.05)
    assert (step - wide).abs().max() > 1e-4
    with pytest.raises(ValueError, match="one pose per ray"):
        absolute_orientation_map(rays, poses[:, :5])
