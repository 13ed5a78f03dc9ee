"""Render3D: a small pure-PyTorch ray caster for scenes of textured planes and boxes seen by calibrated cameras.

A scene is plain data: a list of primitives (:class:`Plane`: a textured rectangle; :class:`Box`: a textured box,
axis-aligned or rotated) and a stack of textures. :func:`render` casts one ray per pixel centre of every view
(vectorised over rays and primitives: a plane intersection, the slab test for boxes, the nearest hit wins) and
returns per view RGB (uint8), z-depth, pointmaps in the world and camera frames, normals, rays, a valid mask and an
object-id mask. A scene sampler is a small function that returns a :class:`Scene`; :func:`sample_boxes_scene` (boxes on
a textured ground inside four walls) and :func:`sample_orbit_cameras` (cameras around the centre looking at it, with
varied focal length and optional roll and lens distortion) are the default ones. The cached multi-view sets and
``vitlab data make render3d`` are in :mod:`.render3d_sets`.

Conventions: cameras are :class:`vitlab.layers.camera.Cameras` (OpenCV camera frame, 4x4 ``cam_to_world``, pixel
(r, c) covers [c, c + 1) x [r, r + 1), Brown-Conrady and unified-camera-model lenses); the rays come from that module,
so what the renderer shows is what ``Cameras.project`` predicts. World frame: z up, the default ground is z = 0,
metres. ``depth`` is z-depth (0 where nothing is hit); ``normals`` are world-frame unit normals facing the camera;
``object_id`` is 0 for the sky and ``k + 1`` for primitive ``k`` of the scene's list. Pixels whose ray leaves the
lens model (undistortion did not converge) are invalid and black. Shading: texture x (ambient + diffuse Lambert)
under one directional light; the sky is a gradient. Textures are Fashion-MNIST items tinted with two colours (boxes)
and procedural checkers, stripes and noise (ground, walls): scikit-image, whose sample images the issue suggests, is
not installed here.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...layers.camera import Cameras, axis_angle_to_matrix, camera_rays, intrinsics_from_fov, look_at, transform_points

__all__ = [
    "TEXTURE_SIZE",
    "Box",
    "Plane",
    "Scene",
    "item_texture",
    "procedural_texture",
    "render",
    "sample_boxes_scene",
    "sample_orbit_cameras",
]

TEXTURE_SIZE = 28  # every texture is (3, 28, 28): the Fashion-MNIST side
_EPS = 1e-4  # nearest accepted hit distance (m): rays do not hit the surface they start on
_SKY = ((0.78, 0.82, 0.86), (0.38, 0.56, 0.86))  # horizon and zenith colours
_BELOW = (0.25, 0.25, 0.27)  # a ray that misses everything below the horizon


@dataclass
class Plane:
    """A textured rectangle ``centre + a axis_u + b axis_v`` for a, b in [-1, 1] (axes: orthogonal half-extents).

    The texture spans the rectangle ``tile`` times along each axis; the plane is two-sided.
    """

    centre: tuple[float, float, float]
    axis_u: tuple[float, float, float]
    axis_v: tuple[float, float, float]
    texture: int
    tile: float = 1.0


@dataclass
class Box:
    """A textured box ``centre + R (a hx, b hy, c hz)``, a, b, c in [-1, 1]; ``rotation`` is R as an axis-angle vector.

    Every face shows the whole texture.
    """

    centre: tuple[float, float, float]
    half_size: tuple[float, float, float]
    texture: int
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Scene:
    """Primitives, the textures (T, 3, h, w) float in [0, 1] they index, and the light (towards it, world frame)."""

    primitives: list[Plane | Box]
    textures: torch.Tensor
    light: tuple[float, float, float] = (0.35, -0.45, 0.82)
    ambient: float = 0.45

    def __post_init__(self) -> None:
        t = self.textures
        if not torch.is_tensor(t) or t.ndim != 4 or t.shape[1] != 3 or len(t) == 0:
            raise ValueError(f"Scene.textures must be (T, 3, h, w) with T >= 1, got {getattr(t, 'shape', type(t))}")
        bad = [i for i, p in enumerate(self.primitives) if not 0 <= p.texture < len(t)]
        if bad or not self.primitives or len(self.primitives) > 255:
            raise ValueError(
                f"a scene needs 1..255 primitives whose textures index its {len(t)} textures; bad primitives: {bad}"
            )


def _plane_hits(planes: list[Plane], o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Ray distance (V, N, P) (inf: no hit), texture coords (V, N, P, 2), normals (V, N, P, 3) of rays o (V, 3), d."""
    C, U, Vx = (torch.tensor([getattr(p, k) for p in planes], dtype=d.dtype) for k in ("centre", "axis_u", "axis_v"))
    normal = torch.linalg.cross(U, Vx, dim=-1)
    normal = normal / normal.norm(dim=-1, keepdim=True)
    dn = d @ normal.T  # (V, N, P)
    t = (((C[None] - o[:, None]) * normal).sum(-1)[:, None] / torch.where(dn.abs() < 1e-9, 1e-9, dn)).nan_to_num()
    oc = o[:, None] - C[None]  # (V, P, 3): the in-plane coordinates are linear in t
    a = ((oc * U).sum(-1)[:, None] + t * (d @ U.T)) / (U * U).sum(-1)
    b = ((oc * Vx).sum(-1)[:, None] + t * (d @ Vx.T)) / (Vx * Vx).sum(-1)
    hit = (t > _EPS) & (a.abs() <= 1) & (b.abs() <= 1)
    tile = torch.tensor([p.tile for p in planes], dtype=d.dtype)
    uv = torch.stack([a, b], -1).add(1).mul(0.5 * tile[:, None])
    return torch.where(hit, t, torch.inf), uv, normal.expand(*t.shape, 3)


_OTHER_AXES = torch.tensor([[1, 2], [0, 2], [0, 1]])  # the face coordinates of the faces normal to x, y, z


def _box_hits(boxes: list[Box], o: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_plane_hits` for boxes (slab test in each box's own frame); a ray starting inside a box misses it."""
    C = torch.tensor([b.centre for b in boxes], dtype=d.dtype)
    half = torch.tensor([b.half_size for b in boxes], dtype=d.dtype)
    R = axis_angle_to_matrix(torch.tensor([b.rotation for b in boxes], dtype=d.dtype))  # (B, 3, 3)
    o_local = torch.einsum("vbj,bjk->vbk", o[:, None] - C[None], R)  # R^T (o - c)
    d_local = torch.einsum("vnj,bjk->vnbk", d, R)  # (V, N, B, 3)
    inv = 1 / torch.where(d_local.abs() < 1e-12, 1e-12, d_local)
    t1, t2 = (-half - o_local[:, None]) * inv, (half - o_local[:, None]) * inv
    near, axis = torch.minimum(t1, t2).max(-1)  # the entry face is normal to the last slab entered
    far = torch.maximum(t1, t2).amin(-1)
    hit = (near <= far) & (near > _EPS)
    p = o_local[:, None] + near[..., None] * d_local  # local hit points
    face = torch.gather(p / half, -1, _OTHER_AXES[axis])  # (V, N, B, 2) in [-1, 1]
    sign = -torch.gather(d_local, -1, axis[..., None]).sign()  # the entry face looks against the ray
    normal = R.transpose(1, 2)[torch.arange(len(boxes)), axis] * sign  # column `axis` of R, (V, N, B, 3)
    return torch.where(hit, near, torch.inf), face.add(1).mul(0.5), normal


def _sample_textures(textures: torch.Tensor, index: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear texture values (..., 3) at ``uv`` (..., 2) (wrapped to [0, 1)) of textures ``index`` (...)."""
    T = len(textures)
    uv = uv - uv.floor()
    z = (2 * index.to(uv.dtype) + 1) / T - 1  # slice centres (align_corners=False): no mixing across textures
    grid = torch.cat([uv * 2 - 1, z[..., None]], -1).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(
        textures.transpose(0, 1)[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.reshape(3, -1).T.reshape(*index.shape, 3)


def _cast(scene: Scene, cameras: Cameras) -> dict[str, torch.Tensor]:
    """Nearest hits of one ray per pixel centre of every view (batch shape of ``cameras`` flattened to V)."""
    H, W = cameras.image_size
    K, pose = cameras.K.reshape(-1, 3, 3), cameras.cam_to_world.reshape(-1, 4, 4)
    # all-zero lens parameters are the pinhole: skip them (undistortion is 12 Newton steps)
    dist = None if cameras.distortion is None or not cameras.distortion.any() else cameras.distortion.reshape(-1, 5)
    xi = None if cameras.xi is None or not cameras.xi.any() else cameras.xi.reshape(-1)
    d_cam, lens_ok = camera_rays(K, H, W, dist, xi)  # (V, H, W, 3) unit
    d = transform_points(pose[:, None, None], d_cam, direction=True).flatten(1, 2)  # (V, N, 3) world
    o = pose[:, :3, 3]
    parts = [
        f([p for p in scene.primitives if isinstance(p, kind)], o, d)
        for kind, f in ((Plane, _plane_hits), (Box, _box_hits))
        if any(isinstance(p, kind) for p in scene.primitives)
    ]
    t, uv, normal = (torch.cat(x, 2) for x in zip(*parts, strict=True))
    # primitive order in the concatenation: planes, then boxes; `order` maps it back to the scene's list
    order = torch.tensor(
        [i for kind in (Plane, Box) for i, p in enumerate(scene.primitives) if isinstance(p, kind)], dtype=torch.long
    )
    t, k = t.min(-1)
    hit = torch.isfinite(t) & lens_ok.flatten(1)
    uv = torch.gather(uv, 2, k[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
    normal = torch.gather(normal, 2, k[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    normal = torch.where(((normal * d).sum(-1) > 0)[..., None], -normal, normal)  # two-sided planes face the camera
    prim = order[k]
    t = torch.where(hit, t, torch.zeros_like(t))
    return {"t": t, "hit": hit, "uv": uv, "normal": normal, "prim": prim, "d": d, "o": o, "d_cam": d_cam.flatten(1, 2)}


def _shade(scene: Scene, c: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colours (V, N, 3) in [0, 1]: textured Lambert where hit, the sky elsewhere."""
    tex_id = torch.tensor([p.texture for p in scene.primitives], dtype=torch.long)[c["prim"]]
    albedo = _sample_textures(scene.textures.to(c["d"].dtype), tex_id, c["uv"])
    light = torch.tensor(scene.light, dtype=c["d"].dtype)
    lambert = (c["normal"] @ (light / light.norm())).clamp(min=0)
    lit = albedo * (scene.ambient + (1 - scene.ambient) * lambert)[..., None]
    up = c["d"][..., 2:].clamp(0, 1)
    horizon, zenith = (torch.tensor(s, dtype=up.dtype) for s in _SKY)
    sky = torch.where(c["d"][..., 2:] >= 0, horizon + (zenith - horizon) * up, torch.tensor(_BELOW, dtype=up.dtype))
    return torch.where(c["hit"][..., None], lit, sky)


def render(scene: Scene, cameras: Cameras, supersample: int = 1) -> dict[str, torch.Tensor]:
    """Render every view of ``cameras`` (batch shape flattened to V views) of ``scene``.

    Returns ``rgb`` uint8 (V, 3, H, W); ``depth`` (V, H, W) z-depth, 0 where invalid; ``valid`` bool (V, H, W);
    ``pointmap`` and ``pointmap_cam`` (V, H, W, 3) in the world and each camera's frame (0 where invalid);
    ``normals`` (V, H, W, 3) world frame; ``rays`` (V, H, W, 3) world unit directions; ``object_id`` int64 (V, H, W).
    ``supersample`` s > 1 averages RGB over s x s rays per pixel (antialiasing; geometry stays at pixel centres).
    """
    H, W = cameras.image_size
    c = _cast(scene, cameras)
    V = c["t"].shape[0]
    rgb = _shade(scene, c)
    if supersample > 1:  # K scaled by s maps pixel (r, c) onto the s x s block of subpixels it covers
        s = supersample
        scale = torch.tensor([[s, 0, 0], [0, s, 0], [0, 0, 1]], dtype=cameras.K.dtype)
        fine = Cameras(scale @ cameras.K, cameras.cam_to_world, (H * s, W * s), cameras.distortion, cameras.xi)
        rgb = F.avg_pool2d(_shade(scene, _cast(scene, fine)).view(V, H * s, W * s, 3).permute(0, 3, 1, 2), s)
        rgb = rgb.permute(0, 2, 3, 1).reshape(V, H * W, 3)
    valid = c["hit"] & (c["d_cam"][..., 2] > 1e-6)
    zero = torch.zeros_like(c["d"])
    out = {
        "rgb": (rgb * 255).round().clamp(0, 255).to(torch.uint8).view(V, H, W, 3).permute(0, 3, 1, 2).contiguous(),
        "depth": c["t"] * c["d_cam"][..., 2] * valid,
        "valid": valid,
        "pointmap": torch.where(valid[..., None], c["o"][:, None] + c["t"][..., None] * c["d"], zero),
        "pointmap_cam": torch.where(valid[..., None], c["t"][..., None] * c["d_cam"], zero),
        "normals": torch.where(valid[..., None], c["normal"], zero),
        "rays": c["d"],
        "object_id": torch.where(valid, c["prim"] + 1, 0),
    }
    return {k: v if k == "rgb" else v.view(V, H, W, *v.shape[2:]) for k, v in out.items()}


def _two_colours(rng: np.random.Generator) -> np.ndarray:
    """Two random RGB colours (2, 3) in [0.1, 0.95] with a visible contrast."""
    a = rng.uniform(0.1, 0.95, 3)
    b = np.clip(a + rng.choice([-1, 1], 3) * rng.uniform(0.25, 0.5, 3), 0.05, 0.95)
    return np.stack([a, b])


def procedural_texture(rng: np.random.Generator, kind: str | None = None) -> torch.Tensor:
    """A (3, 28, 28) texture in [0, 1]: ``"checker"``, ``"stripes"`` or ``"noise"`` (drawn when ``kind`` is None)."""
    kind = kind or str(rng.choice(["checker", "stripes", "noise"]))
    n = TEXTURE_SIZE
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n
    if kind == "checker":
        cells = int(rng.integers(2, 5)) * 2  # even: the pattern wraps without a seam when tiled
        level = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float64)
    elif kind == "stripes":
        fx, fy = rng.integers(-3, 4, 2)  # integer frequencies wrap seamlessly
        fx = fx or 2
        level = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy))
    elif kind == "noise":
        grid = rng.uniform(0, 1, (5, 5))
        coarse = torch.from_numpy(np.pad(grid, ((0, 1), (0, 1)), mode="wrap"))[None, None]
        level = F.interpolate(coarse, size=(n + n // 5, n + n // 5), mode="bilinear", align_corners=True)[0, 0, :n, :n]
        level = level.numpy()
    else:
        raise ValueError(f"kind={kind!r}; expected 'checker', 'stripes' or 'noise'")
    lo, hi = _two_colours(rng)
    tex = lo[:, None, None] + (hi - lo)[:, None, None] * level[None]
    return torch.from_numpy(tex).float()


def item_texture(rng: np.random.Generator, item: torch.Tensor) -> torch.Tensor:
    """A (3, 28, 28) texture in [0, 1]: a gray item (1, 28, 28) uint8 drawn in one colour on another."""
    lo, hi = (torch.from_numpy(c).float() for c in _two_colours(rng))
    level = item.float().div(255)[:, :TEXTURE_SIZE, :TEXTURE_SIZE]
    return lo[:, None, None] + (hi - lo)[:, None, None] * level


def sample_boxes_scene(
    rng: np.random.Generator, pool: torch.Tensor, max_boxes: int = 4, walls: bool = True, room: float = 6.0
) -> tuple[Scene, np.ndarray]:
    """The default scene: 1..``max_boxes`` boxes (Fashion-MNIST textures) on a textured ground, inside four walls.

    Boxes stand on the ground z = 0 within 1.8 m of the origin, turned about z; the ground is a square of half-side
    ``room`` (m) and the walls 2.5 m high at its edges. Returns the scene and the pool rows of the box textures.
    """
    k = int(rng.integers(1, max_boxes + 1))
    items = rng.integers(0, len(pool), k)
    textures = [procedural_texture(rng) for _ in range(1 + 4 * walls)] + [item_texture(rng, pool[i]) for i in items]
    prims: list[Plane | Box] = [Plane((0.0, 0.0, 0.0), (room, 0.0, 0.0), (0.0, room, 0.0), 0, tile=room / 1.5)]
    if walls:
        for j, a in enumerate(np.arange(4) * np.pi / 2):
            c, s = math.cos(a), math.sin(a)
            prims.append(
                Plane((room * c, room * s, 1.25), (-s * room, c * room, 0.0), (0.0, 0.0, 1.25), 1 + j, room / 2)
            )
    radius, angle = 1.8 * np.sqrt(rng.uniform(0, 1, k)), rng.uniform(0, 2 * np.pi, k)
    half = rng.uniform(0.2, 0.55, (k, 3))
    yaw = rng.uniform(0, 2 * np.pi, k)
    for j in range(k):
        centre = (radius[j] * math.cos(angle[j]), radius[j] * math.sin(angle[j]), half[j, 2])
        prims.append(Box(tuple(map(float, centre)), tuple(map(float, half[j])), len(textures) - k + j, (0, 0, yaw[j])))
    return Scene(prims, torch.stack(textures)), items


def sample_orbit_cameras(
    rng: np.random.Generator,
    views: int,
    size: int,
    fov: tuple[float, float] = (40.0, 75.0),
    spread: float = 60.0,
    roll: float = 0.0,
    distortion: float = 0.0,
    xi: float = 0.0,
    shared_orbit: bool = False,
    pan: bool = False,
) -> Cameras:
    """``views`` cameras 2.5-4.5 m from the centre, 0.6-2.5 m high, looking at a point near it; ``size`` px images.

    Field of view (degrees) uniform in ``fov`` per view, azimuths within +-``spread`` degrees of the first view's,
    roll uniform in +-``roll`` degrees; ``distortion`` > 0 draws k1 in [-distortion, distortion] (k2 = -k1 / 4 keeps
    strong barrels invertible further out) and ``xi`` > 0 a unified-camera-model xi in [0, xi] (the focal length stays
    the pinhole's for the drawn field of view, so such a lens sees wider). Every draw is made whatever the ranges, so
    a sample's scene and poses do not change when only the lens ranges do. ``shared_orbit``: every view takes view
    1's target, distance (from the target's vertical) and height (drawn as usual, then copied), so views differ by
    the azimuth change alone (and roll, lens): a pure orbit, the relative rotation a turn about the vertical.
    ``pan``: every view at view 1's eye, turned about the vertical by the azimuth changes drawn as usual (a camera
    panning on a tripod: no baseline, so no parallax), then the whole rig by one more draw, uniform over the circle:
    otherwise view 2 alone would tell its turn, by how far from the room's centre it looks.
    """
    if shared_orbit and pan:
        raise ValueError("shared_orbit and pan are two different camera motions: pick at most one")
    base = rng.uniform(0, 2 * np.pi)
    azimuth = base + np.radians(rng.uniform(-spread, spread, views)) * (np.arange(views) > 0)
    radius, height = rng.uniform(2.5, 4.5, views), rng.uniform(0.6, 2.5, views)
    eye = np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth), height], -1)
    target = np.concatenate([rng.uniform(-0.4, 0.4, (views, 2)), rng.uniform(0.1, 0.5, (views, 1))], -1)
    if shared_orbit:  # after the draws: the rng stream, hence everything else, stays as without it
        target = target[:1].repeat(views, 0)  # view 1's (unchanged); the others turn about the vertical through it
        offset = eye[0, :2] - target[0, :2]
        r, phi = np.hypot(*offset), np.arctan2(offset[1], offset[0]) + azimuth - azimuth[0]
        eye = np.stack([target[:, 0] + r * np.cos(phi), target[:, 1] + r * np.sin(phi), np.full(views, eye[0, 2])], -1)
    if pan:  # after the draws too
        look, turn = target[0] - eye[0], azimuth - azimuth[0]
        c, s = np.cos(turn), np.sin(turn)
        target = eye[0] + np.stack([c * look[0] - s * look[1], s * look[0] + c * look[1], np.full(views, look[2])], -1)
        eye = eye[:1].repeat(views, 0)
    pose = look_at(torch.tensor(eye, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    spin = axis_angle_to_matrix(
        torch.tensor(np.radians(rng.uniform(-roll, roll, views)), dtype=torch.float32)[:, None]
        * torch.tensor([0.0, 0.0, 1.0])
    )
    pose[:, :3, :3] = pose[:, :3, :3] @ spin  # roll about the optical axis
    K = intrinsics_from_fov(torch.tensor(np.radians(rng.uniform(*fov, views)), dtype=torch.float32), size, size)
    k1 = rng.uniform(-distortion, distortion, views)
    dist = torch.tensor(np.stack([k1, -k1 / 4, 0 * k1, 0 * k1, 0 * k1], -1), dtype=torch.float32)
    xis = torch.tensor(rng.uniform(0, xi, views), dtype=torch.float32)
    if pan:  # the last draw: the other motions' streams are unchanged
        pose[:, :3, :3] = axis_angle_to_matrix(torch.tensor([0.0, 0.0, rng.uniform(-np.pi, np.pi)])) @ pose[:, :3, :3]
    return Cameras(K, pose, (size, size), dist, xis)
