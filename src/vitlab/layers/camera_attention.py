"""Relative camera encodings inside attention: PRoPE / GTA, UCPE's relative ray encoding, and its adapter.

- ``prope_attention``: "Cameras as Relative Positional Encoding" (PRoPE, arXiv:2507.10496) and GTA (Miyato et al.,
  ICLR 2024). Every token carries an invertible 4x4 matrix ``P`` (PRoPE: ``[K 0; 0 1] @ world_to_cam`` of its view,
  :func:`prope_transforms`). Head dims are cut into chunks of 4; a query chunk is multiplied by ``P_qᵀ``, key and
  value chunks by ``P_k⁻¹``, and the attention output by the query token's ``P_q``, so scores and outputs depend
  only on ``P_q P_k⁻¹``: a change of world frame (every ``world_to_cam`` right-multiplied by one invertible ``G``)
  leaves the output unchanged. Optionally the last head dims get 2-D RoPE instead (PRoPE: half the dims, patch
  row/column, base 100); rotations are applied GTA-style to q, k, v and undone on the output.
- ``relative_ray_transforms`` + ``ray_rope_angles``: UCPE's Relative Ray Encoding ("Unified Camera Positional
  Encoding", arXiv:2512.07237, github.com/chengzhag/UCPE): one world->ray SE(3) frame per token (z along the world
  ray, x = camera y-axis x ray, origin at the camera centre), used as ``P`` above, plus RoPE of the ray's camera-frame
  azimuth/elevation (base 100) on the other half of the dims. Lens models only enter through the rays.
- ``CameraAttentionAdapter``: UCPE's adapter (like MV-Adapter's parallel branch): a camera self-attention of width
  ``dim // compress`` beside a block's attention, zero-initialised output, so the wrapped block starts as the
  original. It wraps the block (a forward hook on ``block.attn`` adds the branch); the block's forward and
  state-dict keys are untouched.

Deviations. The official UCPE pipeline defines azimuth/elevation RoPE helpers but never passes them to attention,
which then falls back to PRoPE's patch-position RoPE; we follow the paper (ray angles): pass ``patch_rope_angles``
instead of ``ray_rope_angles`` to reproduce the code. The split (camera matrices on half the head dims, RoPE on the
rest) is PRoPE's and UCPE's when angles are given; without angles the matrices take all dims (GTA without RoPE).
Our RoPE pairs channel i with i + r/2 over the whole RoPE chunk (vitlab's ``apply_rope``, computed in float32)
where PRoPE rotates row and column halves separately (and by -angle): the same encoding up to a fixed signed channel
permutation. The adapter gives the branch ``max(1, heads // compress)`` heads (the official code needs
``heads >= compress``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend
from .pos_embed import apply_rope, rope_2d_angles
from .tracing import is_fx_tracing

__all__ = [
    "CameraAttentionAdapter",
    "CameraSelfAttention",
    "patch_rope_angles",
    "prope_attention",
    "prope_transforms",
    "ray_rope_angles",
    "relative_ray_transforms",
    "tokens_from_views",
]


def tokens_from_views(per_view: torch.Tensor, tokens_per_view: int) -> torch.Tensor:
    """Repeat per-view tensors ``(B, V, ...)`` for every token of a view: ``(B, V * tokens_per_view, ...)``."""
    return per_view.repeat_interleave(tokens_per_view, dim=1)


def prope_transforms(
    world_to_cam: torch.Tensor, K: torch.Tensor | None = None, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """PRoPE's per-view matrix ``[K 0; 0 1] @ world_to_cam`` ``(..., 4, 4)`` (GTA: ``world_to_cam`` when ``K`` is None).

    With ``image_size = (H, W)`` the intrinsics are first normalised as PRoPE does (``fx / W``, ``cx / W - 0.5``,
    ``fy / H``, ``cy / H - 0.5``), so the matrices stay O(1) whatever the resolution.
    """
    if world_to_cam.shape[-2:] != (4, 4):
        raise ValueError(f"world_to_cam must be (..., 4, 4), got {tuple(world_to_cam.shape)}")
    if K is None:
        return world_to_cam
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"K must be (..., 3, 3), got {tuple(K.shape)}")
    if image_size is not None:
        H, W = image_size
        norm = K.new_tensor([[1.0 / W, 0.0, -0.5], [0.0, 1.0 / H, -0.5], [0.0, 0.0, 1.0]])
        K = norm @ K
    lifted = torch.zeros(*K.shape[:-2], 4, 4, dtype=K.dtype, device=K.device)
    lifted[..., :3, :3] = K
    lifted[..., 3, 3] = 1.0
    return lifted @ world_to_cam


def patch_rope_angles(positions: torch.Tensor, rope_dims: int, base: float = 100.0) -> torch.Tensor:
    """PRoPE's RoPE of patch ``(row, col)`` positions ``(..., 2)`` -> angles ``(..., rope_dims // 2)`` (base 100)."""
    return rope_2d_angles(positions, rope_dims, theta=base)


def ray_rope_angles(rays_cam: torch.Tensor, rope_dims: int, base: float = 100.0) -> torch.Tensor:
    """UCPE's RoPE angles from camera-frame rays ``(..., 3)`` (OpenCV): ``(..., rope_dims // 2)``.

    Azimuth ``atan2(x, z)`` and elevation ``-asin(y / |d|)`` (y points down, so up is positive) in radians take the
    place of the patch row and column of 2-D RoPE. Camera-frame angles: they do not depend on the world frame.
    """
    d = F.normalize(rays_cam, dim=-1)
    azimuth = torch.atan2(d[..., 0], d[..., 2])
    elevation = -torch.asin(d[..., 1].clamp(-1.0, 1.0))
    return rope_2d_angles(torch.stack((azimuth, elevation), dim=-1), rope_dims, theta=base)


def relative_ray_transforms(
    rays_world: torch.Tensor, cam_centres: torch.Tensor, cam_up: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """UCPE's per-token world->ray frames ``(..., 4, 4)`` from world rays, camera centres, camera y-axes ``(..., 3)``.

    z is the unit world ray; x = ``cam_up x z`` normalised; y = z x x; the origin is the camera centre
    (``T = [R, -R c]`` with R's rows x, y, z). ``cam_up`` is the camera's y-axis in the world (column 1 of
    ``cam_to_world``'s rotation, as the official code uses; OpenCV's y points down in the image: negating it flips
    x and y of every frame, a fixed 180-degree turn about z). Where the ray is (anti)parallel to ``cam_up``
    (only wide lenses), x is built from the world axis least aligned with the ray instead; those tokens then lose
    exact invariance to global rotations.
    """
    if rays_world.shape[-1] != 3 or cam_centres.shape[-1] != 3 or cam_up.shape[-1] != 3:
        raise ValueError(
            f"rays_world, cam_centres, cam_up must end in 3, got {tuple(rays_world.shape)}, "
            f"{tuple(cam_centres.shape)}, {tuple(cam_up.shape)}"
        )
    rays_world, cam_centres, cam_up = torch.broadcast_tensors(rays_world, cam_centres, cam_up)
    z = F.normalize(rays_world, dim=-1)
    x = torch.linalg.cross(cam_up, z)
    norm = x.norm(dim=-1, keepdim=True)
    axis = F.one_hot(z.abs().argmin(-1), 3).to(z.dtype)  # the world axis least aligned with the ray
    x = torch.where(norm > eps * cam_up.norm(dim=-1, keepdim=True), x, torch.linalg.cross(axis, z))
    x = F.normalize(x, dim=-1)
    y = torch.linalg.cross(z, x)
    R = torch.stack((x, y, z), dim=-2)  # rows: world -> ray
    T = torch.zeros(*R.shape[:-2], 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = -(R @ cam_centres.unsqueeze(-1)).squeeze(-1)
    T[..., 3, 3] = 1.0
    return T


def _checked_inverse(P: torch.Tensor, name: str, atol: float = 1e-3) -> torch.Tensor:
    """``P⁻¹`` of ``(B, N, 4, 4)``; a singular or ill-conditioned matrix raises a ValueError naming the token."""
    inv, info = torch.linalg.inv_ex(P)
    if is_fx_tracing():
        return inv
    eye = torch.eye(4, dtype=P.dtype, device=P.device)
    residual = (P @ inv - eye).abs().amax(dim=(-2, -1))
    # relative to the entries' scale: pixel focal lengths times metres make float32 round-off alone exceed 1e-3
    scale = P.abs().amax(dim=(-2, -1)) * inv.abs().amax(dim=(-2, -1))
    bad = (info != 0) | ~torch.isfinite(residual) | (residual > atol * scale.clamp_min(1.0))
    if bool(bad.any()):
        b, n = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: the 4x4 matrix of batch {b}, token {n} is not invertible (P @ P^-1 != I)")
    return inv


def _apply_mats(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``M (B, N, 4, 4)`` times every 4-chunk of ``x (B, h, N, c)``, token by token."""
    B, h, N, c = x.shape
    return torch.einsum("bnij,bhnkj->bhnki", M, x.reshape(B, h, N, c // 4, 4)).reshape(B, h, N, c)


def prope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    P_q: torch.Tensor,
    P_k: torch.Tensor,
    *,
    rope_q: torch.Tensor | None = None,
    rope_k: torch.Tensor | None = None,
    camera_dims: int | None = None,
    P_k_inv: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """GTA/PRoPE attention: ``q (B, h, Nq, d)``, ``k, v (B, h, Nk, d)``, ``P_q (B, Nq, 4, 4)``, ``P_k (B, Nk, 4, 4)``.

    The first ``camera_dims`` head dims (a multiple of 4) are transformed by the matrices: q by ``P_qᵀ``, k and v
    by ``P_k⁻¹`` (pass ``P_k_inv`` to skip the inversion), the output by ``P_q``. The remaining dims get RoPE with
    ``rope_q (B or 1, Nq, r/2)`` / ``rope_k`` angles (r = d - camera_dims; rotations on q, k, v, undone on the output
    with the query's angles), or pass through untouched when no angles are given. ``camera_dims`` defaults to
    ``d // 2`` when angles are given (PRoPE's split) and to ``d`` otherwise. Scores use SDPA with ``bias``/``scale``.
    """
    d = q.shape[-1]
    if (rope_q is None and rope_k is not None) or (rope_q is not None and rope_k is None):
        raise ValueError("rope_q and rope_k must be given together")
    c = camera_dims if camera_dims is not None else (d // 2 if rope_q is not None else d)
    if not is_fx_tracing():
        if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or k.shape[-1] != d:
            raise ValueError(f"q, k, v must be (B, heads, N, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}")
        if d % 4 or c % 4 or not 0 < c <= d:
            raise ValueError(f"head_dim {d} and camera_dims {c} must be multiples of 4, 0 < camera_dims <= head_dim")
        for name, P, x in (("P_q", P_q, q), ("P_k", P_k, k)):
            if P.shape != (x.shape[0], x.shape[2], 4, 4):
                expect = (x.shape[0], x.shape[2], 4, 4)
                raise ValueError(f"{name} must be (B, N, 4, 4) = {expect}, got {tuple(P.shape)}")
        for name, a, x in (("rope_q", rope_q, q), ("rope_k", rope_k, k)):
            if a is not None and (a.shape[-2:] != (x.shape[2], (d - c) // 2) or c == d):
                raise ValueError(f"{name} must be (B, N, {(d - c) // 2}) angles, N={x.shape[2]}, got {tuple(a.shape)}")
        if P_q is not P_k:  # the output transform must be undoable too
            _checked_inverse(P_q, "P_q")
    inv = _checked_inverse(P_k, "P_k") if P_k_inv is None else P_k_inv
    P_q, inv = P_q.to(q.dtype), inv.to(q.dtype)
    (qc, qr), (kc, kr), (vc, vr) = (t.split((c, d - c), dim=-1) for t in (q, k, v))
    qc, kc, vc = _apply_mats(qc, P_q.transpose(-1, -2)), _apply_mats(kc, inv), _apply_mats(vc, inv)
    if rope_q is not None:
        qr, kr, vr = apply_rope(qr, rope_q), apply_rope(kr, rope_k), apply_rope(vr, rope_k)
    out = attend(torch.cat((qc, qr), -1), torch.cat((kc, kr), -1), torch.cat((vc, vr), -1), bias, dropout_p, scale)
    oc, orr = out.split((c, d - c), dim=-1)
    oc = _apply_mats(oc, P_q)
    if rope_q is not None:
        orr = apply_rope(orr, -rope_q)
    return torch.cat((oc, orr), dim=-1)


class CameraSelfAttention(nn.Module):
    """UCPE's camera branch: q/k/v of width ``heads * head_dim``, ``prope_attention``, zero-initialised ``proj``.

    ``forward(x (B, N, dim), transforms (B, N, 4, 4), rope_angles=None, orientation=None)``; ``orientation``
    ``(B, N, orientation_dim)`` (UCPE's Lat-Up map) goes through a linear layer and is added to the branch input.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, orientation_dim: int = 0, camera_dims: int | None = None
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 4x4 camera chunks, got {head_dim}")
        self.num_heads, self.head_dim, self.camera_dims = num_heads, head_dim, camera_dims
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        nn.init.zeros_(self.proj.weight)  # zero output: the host block is unchanged at init
        nn.init.zeros_(self.proj.bias)
        self.orientation = nn.Linear(orientation_dim, dim) if orientation_dim else None

    def forward(
        self,
        x: torch.Tensor,
        transforms: torch.Tensor,
        rope_angles: torch.Tensor | None = None,
        orientation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        if (orientation is None) != (self.orientation is None):
            expected = self.orientation is not None
            raise ValueError(f"orientation features: given {orientation is not None}, expected {expected}")
        if orientation is not None and self.orientation is not None:
            x = x + self.orientation(orientation)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = prope_attention(
            q, k, v, transforms, transforms, rope_q=rope_angles, rope_k=rope_angles, camera_dims=self.camera_dims
        )
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


class CameraAttentionAdapter(nn.Module):
    """Wrap a ViT block (timm ``Block`` or vitlab ``MetaBlock`` with an attention ``attn``) with a camera branch.

    The branch sees the same normalised input as ``block.attn`` and its output is added to the attention output
    (UCPE's "parallel" mode), before layer scale and drop path. Width ``dim // compress`` with
    ``max(1, heads // compress)`` heads (UCPE: ``attn_compress`` 8). Call the adapter, not the block:
    ``adapter(x, transforms, rope_angles=None, orientation=None)``; the block alone raises. ``remove()`` detaches.
    Every token needs a transform: give prefix (class) tokens the identity and zero RoPE angles.
    """

    def __init__(
        self, block: nn.Module, compress: int = 8, orientation_dim: int = 0, camera_dims: int | None = None
    ) -> None:
        super().__init__()
        attn = getattr(block, "attn", None)
        if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise ValueError(f"block must have an attention child 'attn' with 'qkv' and 'num_heads', got {type(block)}")
        dim, heads = attn.qkv.in_features, attn.num_heads
        if compress < 1 or dim % compress:
            raise ValueError(f"compress must divide the block width {dim}, got {compress}")
        branch_heads = max(1, heads // compress)
        head_dim = dim // compress // branch_heads
        if head_dim % 4 or head_dim * branch_heads != dim // compress:
            raise ValueError(f"branch width {dim // compress} over {branch_heads} heads needs head_dim % 4 == 0")
        self.block = block
        self.camera_attn = CameraSelfAttention(dim, branch_heads, head_dim, orientation_dim, camera_dims)
        self._context: dict[str, Any] | None = None
        self._handle = attn.register_forward_hook(self._add_branch, with_kwargs=True)

    def _add_branch(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor:
        if self._context is None:
            raise RuntimeError("a block wrapped by CameraAttentionAdapter needs cameras: call the adapter")
        return output + self.camera_attn(args[0] if args else kwargs["x"], **self._context)

    def forward(
        self,
        x: torch.Tensor,
        transforms: torch.Tensor,
        rope_angles: torch.Tensor | None = None,
        orientation: torch.Tensor | None = None,
        **block_kwargs: Any,
    ) -> torch.Tensor:
        self._context = {"transforms": transforms, "rope_angles": rope_angles, "orientation": orientation}
        try:
            return self.block(x, **block_kwargs)
        finally:
            self._context = None

    def remove(self) -> nn.Module:
        """Detach the branch and give the original block back."""
        self._handle.remove()
        return self.block
