"""layers/camera_attention.py: PRoPE/GTA and UCPE's relative ray encoding against their claims (frame invariance)."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from vitlab.layers import (
    Attention,
    CameraAttentionAdapter,
    MetaBlock,
    patch_rope_angles,
    prope_attention,
    prope_transforms,
    ray_rope_angles,
    relative_ray_transforms,
    tokens_from_views,
)


def _rotation(*shape: int, dtype=torch.float64, generator=None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(*shape, 3, 3, dtype=dtype, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.det(q)[..., None, None]  # det +1


def _pose(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    P = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype)
    P[..., :3, :3], P[..., :3, 3], P[..., 3, 3] = R, t, 1.0
    return P


def _cameras(B=2, V=3, dtype=torch.float64):
    """Per-view world_to_cam (B, V, 4, 4), cam_to_world and pixel intrinsics for 8x8 images."""
    g = torch.Generator().manual_seed(0)
    c2w = _pose(_rotation(B, V, dtype=dtype, generator=g), torch.randn(B, V, 3, dtype=dtype, generator=g) * 2)
    f = 6.0 + torch.rand(B, V, dtype=dtype, generator=g) * 4
    K = torch.zeros(B, V, 3, 3, dtype=dtype)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = f, f, 4.0, 4.0, 1.0
    return torch.linalg.inv(c2w), c2w, K


def _qkv(B, N, heads=2, d=16, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, N, d, dtype=dtype, generator=g) for _ in range(3)]


def _world_change(rigid: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if rigid:
        return _pose(_rotation(generator=g), torch.randn(3, dtype=torch.float64, generator=g) * 3)
    G = torch.eye(4, dtype=torch.float64) + 0.5 * torch.randn(4, 4, dtype=torch.float64, generator=g)
    assert torch.linalg.det(G).abs() > 0.1
    return G


@pytest.mark.parametrize("rigid", [True, False])
@pytest.mark.parametrize("with_rope", [False, True])
def test_prope_is_invariant_to_the_world_frame(rigid, with_rope):
    # PRoPE's claim: attention sees cameras only through P_i P_j^-1, so right-multiplying every world_to_cam by one
    # invertible matrix (a new world frame) changes nothing
    w2c, _, K = _cameras()
    T = 4  # tokens per view
    q, k, v = _qkv(2, 3 * T)
    rope = (
        patch_rope_angles(
            torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij"), -1).reshape(T, 2).repeat(3, 1),
            8,
        )
        if with_rope
        else None
    )

    def run(w2c):
        P = tokens_from_views(prope_transforms(w2c, K, (8, 8)), T)
        return prope_attention(q, k, v, P, P, rope_q=rope, rope_k=rope)

    out = run(w2c)
    assert torch.allclose(run(w2c @ _world_change(rigid)), out, atol=1e-9)
    moved = w2c.clone()
    moved[:, 1, :3, 3] += 1.0  # one camera moves relative to the others: the output must change
    assert not torch.allclose(run(moved), out, atol=1e-3)


def test_prope_cross_attention_is_invariant_too():
    # target-view queries attending to source-view keys (novel-view synthesis): Nq != Nk
    w2c, _, K = _cameras()
    P = prope_transforms(w2c, K, (8, 8))
    q, _, _ = _qkv(2, 4)
    _, k, v = _qkv(2, 8, seed=2)

    def run(P):
        return prope_attention(q, k, v, tokens_from_views(P[:, :1], 4), tokens_from_views(P[:, 1:], 4))

    out = run(P)
    assert out.shape == q.shape
    assert torch.allclose(run(prope_transforms(w2c @ _world_change(False), K, (8, 8))), out, atol=1e-9)


def test_prope_invariance_holds_in_float32():
    w2c, _, K = _cameras(dtype=torch.float32)
    q, k, v = _qkv(2, 12, dtype=torch.float32)
    G = _world_change(rigid=True).float()
    P1 = tokens_from_views(prope_transforms(w2c, K, (8, 8)), 4)
    P2 = tokens_from_views(prope_transforms(w2c @ G, K, (8, 8)), 4)
    assert torch.allclose(prope_attention(q, k, v, P1, P1), prope_attention(q, k, v, P2, P2), atol=1e-4)


def test_identity_matrices_give_plain_attention():
    q, k, v = _qkv(2, 10, dtype=torch.float32)
    eye = torch.eye(4).expand(2, 10, 4, 4)
    assert torch.allclose(prope_attention(q, k, v, eye, eye), F.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_matches_a_naive_per_token_reference():
    # scores q_i^T P_i P_j^-1 k_j and output P_i sum_j a_ij P_j^-1 v_j, written token by token
    B, N, d = 1, 5, 8
    q, k, v = _qkv(B, N, heads=1, d=d)
    P = _pose(_rotation(B, N), torch.randn(B, N, 3, dtype=torch.float64))
    P = P * torch.tensor([1.5, 1.0, 0.7, 1.0], dtype=torch.float64)[:, None]  # not orthogonal: transpose != inverse
    Pinv = torch.linalg.inv(P)
    blocks = lambda M, x: torch.cat([M @ c for c in x.split(4)])  # noqa: E731
    scores = torch.stack(
        [
            torch.stack([blocks(P[0, i].T, q[0, 0, i]) @ blocks(Pinv[0, j], k[0, 0, j]) for j in range(N)])
            for i in range(N)
        ]
    ) / math.sqrt(d)
    a = scores.softmax(-1)
    ref = torch.stack(
        [blocks(P[0, i], sum(a[i, j] * blocks(Pinv[0, j], v[0, 0, j]) for j in range(N))) for i in range(N)]
    )
    assert torch.allclose(prope_attention(q, k, v, P, P)[0, 0], ref, atol=1e-10)


def test_rope_part_depends_on_relative_positions_only():
    q, k, v = _qkv(1, 6)
    eye = torch.eye(4, dtype=torch.float64).expand(1, 6, 4, 4)
    pos = torch.randint(0, 5, (6, 2))
    run = lambda p: prope_attention(q, k, v, eye, eye, rope_q=patch_rope_angles(p, 8), rope_k=patch_rope_angles(p, 8))  # noqa: E731
    assert torch.allclose(run(pos + torch.tensor([3, -2])), run(pos), atol=1e-5)
    assert not torch.allclose(run(pos.flip(0)), run(pos), atol=1e-3)


def test_gradients_reach_inputs_and_matrices():
    w2c, _, K = _cameras(dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 12, dtype=torch.float32))
    P = tokens_from_views(prope_transforms(w2c, K, (8, 8)), 4).requires_grad_()
    prope_attention(q, k, v, P, P).square().sum().backward()
    for t in (q, k, v, P):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 4, dtype=torch.float32)
    eye = torch.eye(4).expand(1, 4, 4, 4).clone()
    singular = eye.clone()
    singular[0, 2, 1] = 0.0
    with pytest.raises(ValueError, match=r"P_k.*token 2.*not invertible"):
        prope_attention(q, k, v, eye, singular)
    with pytest.raises(ValueError, match=r"P_q.*token 2"):
        prope_attention(q, k, v, singular, eye)
    with pytest.raises(ValueError, match="P_q"):
        prope_attention(q, k, v, eye[:, :3], eye)
    q6, k6, v6 = _qkv(1, 4, d=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiples of 4"):
        prope_attention(q6, k6, v6, eye, eye)
    with pytest.raises(ValueError, match="rope_q"):
        prope_attention(q, k, v, eye, eye, rope_q=torch.zeros(4, 3), rope_k=torch.zeros(4, 3))


def _ucpe_scene(B=2, V=3, T=4, dtype=torch.float64):
    """World rays, centres and camera y-axes per token for V cameras with T rays each."""
    g = torch.Generator().manual_seed(3)
    _, c2w, _ = _cameras(B, V, dtype)
    xy = torch.randn(B, V, T, 2, dtype=dtype, generator=g) * 0.5
    rays_cam = torch.cat((xy, torch.ones(B, V, T, 1, dtype=dtype)), -1)
    rays_world = (c2w[:, :, None, :3, :3] @ rays_cam.unsqueeze(-1)).squeeze(-1).flatten(1, 2)
    centres = tokens_from_views(c2w[..., :3, 3], T)
    ups = tokens_from_views(c2w[..., :3, 1], T)
    return rays_world, centres, ups, rays_cam.flatten(1, 2)


def test_relative_ray_frames_are_rigid_and_follow_the_ray():
    rays, centres, ups, _ = _ucpe_scene()
    M = relative_ray_transforms(rays, centres, ups)
    R = M[..., :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones_like(R[..., 0, 0]))
    assert torch.allclose(R[..., 2, :], F.normalize(rays, dim=-1))  # z along the ray
    centre_in_ray_frame = (R @ centres.unsqueeze(-1)).squeeze(-1) + M[..., :3, 3]
    assert torch.allclose(centre_in_ray_frame, torch.zeros_like(rays), atol=1e-10)
    assert torch.allclose((R[..., 0, :] * ups).sum(-1), torch.zeros_like(rays[..., 0]), atol=1e-10)  # x ⟂ camera y


def test_relative_ray_frames_handle_rays_along_the_camera_axis():
    up = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    M = relative_ray_transforms(torch.tensor([[0.0, -2.0, 0.0], [0.0, 0.0, 1.0]]), torch.zeros(2, 3), up)
    R = M[..., :3, :3]
    assert torch.isfinite(M).all()
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(2, 3, 3), atol=1e-6)


@pytest.mark.parametrize("rope", ["rays", "patches"])
def test_relative_ray_attention_is_invariant_to_a_rigid_world_change(rope):
    # UCPE's claim: with world->ray frames, attention depends on relative ray geometry only
    rays, centres, ups, rays_cam = _ucpe_scene()
    q, k, v = _qkv(2, 12)
    if rope == "rays":
        angles = ray_rope_angles(rays_cam, 8)
    else:  # the official code's fallback: patch positions
        angles = patch_rope_angles(
            torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij"), -1).reshape(4, 2).repeat(3, 1),
            8,
        )

    def run(r, c, u):
        M = relative_ray_transforms(r, c, u)
        return prope_attention(q, k, v, M, M, rope_q=angles, rope_k=angles)

    Q, t = _rotation(generator=torch.Generator().manual_seed(9)), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    moved = run(rays @ Q.T, centres @ Q.T + t, ups @ Q.T)
    assert torch.allclose(moved, run(rays, centres, ups), atol=1e-9)
    assert not torch.allclose(run(rays, centres + torch.randn_like(centres), ups), moved, atol=1e-3)


def test_ray_rope_angles_of_known_rays():
    rays = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, -1.0, 1.0]])
    a = ray_rope_angles(rays, 8)  # (3, 4): 2 azimuth angles, then 2 elevation angles
    assert torch.allclose(a[0], torch.zeros(4))
    assert torch.allclose(a[1, :2], torch.tensor([math.pi / 4, math.pi / 4 / 100**0.5]), atol=1e-6)
    assert torch.allclose(a[2, 2:], torch.tensor([math.pi / 4, math.pi / 4 / 100**0.5]), atol=1e-6)  # up = positive


def _adapter(orientation_dim=0):
    torch.manual_seed(0)
    block = Block(dim=64, num_heads=4).eval()
    return block, CameraAttentionAdapter(block, compress=8, orientation_dim=orientation_dim)


@pytest.mark.parametrize("host", ["timm", "vitlab"])
def test_adapter_equals_the_block_at_init_and_detaches(host):
    if host == "timm":
        block = Block(dim=64, num_heads=4).eval()
    else:
        block = MetaBlock(64, lambda d: Attention(d, num_heads=4)).eval()
    x = torch.randn(2, 12, 64)
    ref = block(x)
    adapter = CameraAttentionAdapter(block, orientation_dim=3)
    assert adapter.camera_attn.num_heads == 1
    assert adapter.camera_attn.head_dim == 8
    eye = torch.eye(4).expand(2, 12, 4, 4)
    assert torch.equal(adapter(x, eye, orientation=torch.randn(2, 12, 3)), ref)
    assert "camera_attn" not in " ".join(block.state_dict())  # the host's (timm) keys are untouched
    with pytest.raises(RuntimeError, match="call the adapter"):
        block(x)
    assert torch.equal(adapter.remove()(x), ref)


def test_adapter_trains_and_stays_frame_invariant():
    _, adapter = _adapter()
    rays, centres, ups, rays_cam = _ucpe_scene(dtype=torch.float32)
    M = relative_ray_transforms(rays, centres, ups)
    angles = ray_rope_angles(rays_cam, 4)  # head_dim 8: 4 camera dims + 4 RoPE dims
    x = torch.randn(2, 12, 64)
    adapter(x, M, angles).square().mean().backward()
    grad = adapter.camera_attn.proj.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    torch.nn.init.normal_(adapter.camera_attn.proj.weight, std=0.1)
    Q = _rotation(dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 1.0, -1.0])
    with torch.no_grad():
        out = adapter(x, M, angles)
        moved = adapter(x, relative_ray_transforms(rays @ Q.T, centres @ Q.T + t, ups @ Q.T), angles)
        plain = adapter.remove()(x)
    assert torch.allclose(out, moved, atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_adapter_rejects_bad_blocks_and_cameras():
    with pytest.raises(ValueError, match="attn"):
        CameraAttentionAdapter(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="head_dim"):
        CameraAttentionAdapter(Block(dim=48, num_heads=4), compress=8)  # 6-wide branch heads
    _, adapter = _adapter()
    with pytest.raises(ValueError, match="P_q"):
        adapter(torch.randn(2, 12, 64), torch.eye(4).expand(2, 10, 4, 4))
    with pytest.raises(ValueError, match="orientation"):
        adapter(torch.randn(2, 12, 64), torch.eye(4).expand(2, 12, 4, 4), orientation=torch.randn(2, 12, 3))


def test_pixel_intrinsics_and_far_cameras_are_not_mistaken_for_singular():
    # float32 P @ P^-1 misses I by far more than 1e-3 when K is in pixels (f = 1500) and cameras sit 20 m away
    _, c2w, K = _cameras(dtype=torch.float32)
    c2w = c2w.clone()
    c2w[..., :3, 3] *= 10
    K = K * torch.tensor([1500 / 8, 1500 / 8, 1.0]).view(3, 1)
    q, k, v = _qkv(2, 12, dtype=torch.float32)
    P = tokens_from_views(prope_transforms(torch.linalg.inv(c2w), K), 4)
    assert torch.isfinite(prope_attention(q, k, v, P, P)).all()
