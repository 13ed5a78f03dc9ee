"""Absolute camera-ray encodings of tokens and feature maps: Multi-HMR's Fourier rays, MvP's RayConv, Plücker maps,
UCPE's absolute orientation (Lat-Up) map.

Inputs are tensors built by the camera module (``layers/camera.py``: OpenCV frames, x right, y down, z forward):
per-token or per-pixel ray directions, ray origins, and ``cam_to_world`` poses. Nothing here builds rays itself.

- ``FourierRayEmbed`` (Multi-HMR, arXiv:2402.14654, github.com/naver/multi-hmr ``blocks/camera_embed.py``): the
  token-centre ray ``K⁻¹[u, v, 1]`` (z = 1, not unit length, as the paper) is encoded as ``[r, sin(pi f r),
  cos(pi f r)]`` with ``num_bands`` linear frequencies ``f`` from 1 to ``max_resolution / 2`` per coordinate (16 and
  64 in the paper: 99 channels); concatenated to the token features (the paper) or projected and added (option).
- ``RayConv`` (MvP, arXiv:2111.04076, github.com/sail-sg/mvp): unit per-pixel ray directions (world frame in MvP)
  concatenated to a feature map, ``(B, C, H, W) -> (B, C + 3, H, W)``, then by default a 1x1 conv back to C.
- ``plucker_embed`` / ``PluckerEmbed`` (the CameraCtrl baseline, arXiv:2404.02101): per-pixel Plücker coordinates
  ``(d, o x d)`` with unit ``d``, patchified to ``6 p²`` features per token, then a linear layer.
- ``absolute_orientation_map`` (UCPE, arXiv:2512.07237, github.com/chengzhag/UCPE): per token the image-plane
  direction in which the world "up" lies (2-D unit vector) and the ray's latitude ``asin(d_world · up)`` (1-D),
  from ``cam_to_world``'s rotation only, so camera yaw (about ``world_up``) and translation do not change it.
  The direction is the exact derivative of the lens projection along the great circle from the ray towards up
  (closed form for the pinhole, ``torch.func.jvp`` of a given projection); the official code takes a finite
  0.1 rad step instead (``delta=0.1`` reproduces it; for a pinhole both agree, a great circle images to a line).
  ``world_up`` defaults to ``(0, -1, 0)``: an OpenCV world with y down, as the official code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FourierRayEmbed",
    "PluckerEmbed",
    "RayConv",
    "absolute_orientation_map",
    "fourier_ray_features",
    "plucker_embed",
]


def fourier_ray_features(rays: torch.Tensor, num_bands: int = 16, max_resolution: float = 64.0) -> torch.Tensor:
    """Multi-HMR's code of rays ``(..., D)``: ``[rays, sin(pi f r), cos(pi f r)]`` -> ``(..., D (1 + 2 num_bands))``.

    ``f`` runs linearly from 1 to ``max_resolution / 2``; the sin and cos blocks are coordinate-major.
    """
    freqs = torch.linspace(1.0, max_resolution / 2, num_bands, device=rays.device, dtype=rays.dtype)
    angles = (math.pi * rays.unsqueeze(-1) * freqs).flatten(-2)  # (..., D * num_bands)
    return torch.cat((rays, angles.sin(), angles.cos()), dim=-1)


class FourierRayEmbed(nn.Module):
    """Fourier ray features for tokens: ``forward(x (B, N, C), rays (B, N, 3)) -> (B, N, out_dim)``.

    ``mode="concat"`` (Multi-HMR): ``out_dim = C + 3 (1 + 2 num_bands)``, no parameters. ``mode="add"``: a linear
    layer maps the features to C and adds them (``out_dim = C``). ``normalize=True`` makes the rays unit length
    first (the paper keeps ``K⁻¹[u, v, 1]`` with z = 1).
    """

    def __init__(
        self,
        dim: int,
        num_bands: int = 16,
        max_resolution: float = 64.0,
        mode: str = "concat",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("concat", "add"):
            raise ValueError(f"mode must be 'concat' or 'add', got {mode!r}")
        self.dim, self.num_bands, self.max_resolution = dim, num_bands, max_resolution
        self.mode, self.normalize = mode, normalize
        self.ray_dim = 3 * (1 + 2 * num_bands)
        self.proj = nn.Linear(self.ray_dim, dim) if mode == "add" else None
        self.out_dim = dim if mode == "add" else dim + self.ray_dim

    def forward(self, x: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim or rays.shape != (*x.shape[:2], 3):
            got = (tuple(x.shape), tuple(rays.shape))
            raise ValueError(f"expected x (B, N, {self.dim}) and rays (B, N, 3), got {got}")
        r = F.normalize(rays, dim=-1) if self.normalize else rays
        feats = fourier_ray_features(r.to(x.dtype), self.num_bands, self.max_resolution)
        return x + self.proj(feats) if self.proj is not None else torch.cat((x, feats), dim=-1)


class RayConv(nn.Module):
    """MvP's RayConv: ``forward(x (B, C, H, W), rays (B, H, W, 3))`` -> ``(B, C, H, W)`` (or ``C + 3``).

    The rays are made unit length and concatenated as 3 channels; ``project=True`` (default) follows with a 1x1
    convolution back to ``C`` channels, ``project=False`` returns the ``C + 3`` concatenation.
    """

    def __init__(self, dim: int, project: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Conv2d(dim + 3, dim, 1) if project else None

    def forward(self, x: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.dim != C or rays.shape != (B, H, W, 3):
            got = (tuple(x.shape), tuple(rays.shape))
            raise ValueError(f"expected x (B, {self.dim}, H, W) and rays (B, H, W, 3), got {got}")
        d = F.normalize(rays, dim=-1).to(x.dtype).permute(0, 3, 1, 2)
        out = torch.cat((x, d), dim=1)
        return self.proj(out) if self.proj is not None else out


def plucker_embed(directions: torch.Tensor, origins: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patchified Plücker maps: ``directions (B, H, W, 3)``, ``origins (B, H, W, 3)`` or ``(B, 3)`` -> ``(B, N, 6 p²)``.

    Each pixel gives ``(d, o x d)`` with ``d`` unit; a token holds its ``p x p`` pixels (row-major, channels last).
    """
    if directions.ndim != 4 or directions.shape[-1] != 3:
        raise ValueError(f"directions must be (B, H, W, 3), got {tuple(directions.shape)}")
    B, H, W, _ = directions.shape
    if origins.shape == (B, 3):
        origins = origins[:, None, None].expand_as(directions)
    if origins.shape != directions.shape:
        raise ValueError(f"origins must be (B, 3) or {tuple(directions.shape)}, got {tuple(origins.shape)}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"the ray map {H}x{W} must be a multiple of patch_size {patch_size}")
    d = F.normalize(directions, dim=-1)
    maps = torch.cat((d, torch.linalg.cross(origins, d)), dim=-1)  # (B, H, W, 6)
    p = patch_size
    maps = maps.reshape(B, H // p, p, W // p, p, 6).permute(0, 1, 3, 2, 4, 5)
    return maps.reshape(B, (H // p) * (W // p), p * p * 6)


class PluckerEmbed(nn.Module):
    """CameraCtrl-style Plücker tokens: ``forward(directions, origins) -> (B, N, dim)`` (see ``plucker_embed``)."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(6 * patch_size * patch_size, dim)

    def forward(self, directions: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
        return self.proj(plucker_embed(directions, origins, self.patch_size).to(self.proj.weight.dtype))


def _pinhole(d: torch.Tensor) -> torch.Tensor:
    """Normalised pinhole image coordinates ``(x / z, y / z)`` of camera-frame directions."""
    return d[..., :2] / d[..., 2:3]


def absolute_orientation_map(
    rays_cam: torch.Tensor,
    cam_to_world: torch.Tensor,
    *,
    world_up: tuple[float, float, float] | torch.Tensor = (0.0, -1.0, 0.0),
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    delta: float | None = None,
) -> torch.Tensor:
    """UCPE's Lat-Up map: camera-frame rays ``(..., 3)`` and poses ``(..., 4, 4)`` or rotations ``(..., 3, 3)``.

    Returns ``(..., 3)``: the unit image-plane direction ``(du, dv)`` in which ``world_up`` lies at that ray
    (image v points down), and the ray latitude in radians. ``project`` maps camera-frame directions to image
    coordinates (default: normalised pinhole ``(x/z, y/z)``, i.e. ``fx = fy``; pass the lens's projection for
    fisheye/UCM rays). ``delta`` (radians): a finite step instead of the exact derivative (the official code: 0.1).
    Where the ray is parallel to ``world_up`` the direction is zero.
    """
    if rays_cam.shape[-1] != 3 or cam_to_world.shape[-2:] not in ((4, 4), (3, 3)):
        raise ValueError(
            f"rays_cam must be (..., 3) and cam_to_world (..., 4, 4) or (..., 3, 3), got {tuple(rays_cam.shape)}, "
            f"{tuple(cam_to_world.shape)}"
        )
    if cam_to_world.shape[:-2] != rays_cam.shape[:-1]:
        got = (tuple(cam_to_world.shape), tuple(rays_cam.shape))
        raise ValueError(f"one pose per ray: cam_to_world, rays_cam shapes {got}")
    R = cam_to_world[..., :3, :3]
    d = F.normalize(rays_cam, dim=-1)
    up = F.normalize(torch.as_tensor(world_up, dtype=d.dtype, device=d.device), dim=-1).expand_as(d)
    d_world = (R @ d.unsqueeze(-1)).squeeze(-1)
    sin_lat = (d_world * up).sum(-1, keepdim=True)
    latitude = torch.asin(sin_lat.clamp(-1.0, 1.0))
    tangent = (R.transpose(-1, -2) @ (up - d_world * sin_lat).unsqueeze(-1)).squeeze(-1)  # towards up, camera frame
    if delta is not None:
        rotated = d * math.cos(delta) + F.normalize(tangent, dim=-1) * math.sin(delta)
        step = (project or _pinhole)(rotated) - (project or _pinhole)(d)
    elif project is None:  # d(x/z, y/z) = (t_xy z - xy t_z) / z²; z² > 0 does not change the direction
        step = tangent[..., :2] * d[..., 2:3] - d[..., :2] * tangent[..., 2:3]
    else:
        with warnings.catch_warnings():  # torch's first forward-mode AD call warns about its own jit use
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            _, step = torch.func.jvp(project, (d,), (tangent,))
    return torch.cat((F.normalize(step, dim=-1), latitude), dim=-1)
