"""Stick-figure humans: a 15-joint kinematic tree drawn as shaded capsules into calibrated cameras.

Multi-HMR (arXiv 2402.14654) and MvP (arXiv 2111.04076) fit SMPL-X / Panoptic skeletons; the SMPL-X model files are
licence-gated (not downloadable here), so vitlab uses a 15-joint stick model (CMU-Panoptic-like: pelvis as the body
centre, the pelvis-neck bone as the spine) with 4 shape parameters and per-joint Euler-angle limits.

World frame: z up, metres, the ground is z = 0 (as in :mod:`.render3d`). A person's body frame: x forward (facing),
y its left, z up; its ``yaw`` turns it about world z and its pelvis (the root) stands at ``root``. Joint ``j`` > 0
carries the rotation (Euler ``R_z R_y R_x`` of ``angles[j]`` in the parent's frame) of the bone parent -> ``j``:
``R_j = R_parent R(angles[j])``, ``X_j = X_parent + R_j offset_j``. Feet are put on the ground (the lowest joint one
shin radius above it). Cameras: :class:`vitlab.layers.camera.Cameras` (OpenCV frame, 4x4 ``cam_to_world``).

Rendering casts one ray per pixel centre (the camera module's rays) and intersects it exactly with every capsule
(a cylinder and two end spheres) in 3-D, so depth and occlusion between people and limbs are exact; the background
(a textured ground and far walls) comes from :func:`.render3d.render`. Each person has a shirt, trousers and skin
colour, left limbs lighter than right ones, hair on the back of the head and a darker shirt back (so that facing is
visible), Lambert-shaded under render3d's light. A joint is **visible** in a view
when it projects into the image in front of the camera, the pixel it falls in shows its own person, and that
pixel's depth is at most (joint radius + 3 cm) in front of the joint (the joint lies inside its own capsules, whose
surface is that close; anything nearer occludes it). Sets, caching and ``vitlab data make stick_humans``:
:mod:`.humans_sets`.
"""

import math

import numpy as np
import torch

from ...layers.camera import Cameras, camera_rays, intrinsics_from_fov, look_at, transform_points
from .render3d import Plane, Scene, procedural_texture, render

__all__ = [
    "JOINTS",
    "LIMITS",
    "NUM_JOINTS",
    "PARENTS",
    "POSES",
    "SHAPE_NAMES",
    "annotate",
    "body_turn",
    "bone_lengths",
    "forward_kinematics",
    "joint_radii",
    "local_rotations",
    "named_pose",
    "render_humans",
    "sample_people",
    "sample_pose",
    "sample_room_cameras",
    "skeleton_from_rotations",
]

JOINTS = (
    "pelvis", "neck", "head",
    "l_shoulder", "l_elbow", "l_wrist", "r_shoulder", "r_elbow", "r_wrist",
    "l_hip", "l_knee", "l_ankle", "r_hip", "r_knee", "r_ankle",
)  # fmt: skip
NUM_JOINTS = len(JOINTS)
PARENTS = (-1, 0, 1, 1, 3, 4, 1, 6, 7, 0, 9, 10, 0, 12, 13)
SHAPE_NAMES = ("height", "torso", "arms", "legs")  # height scales everything, the others their bones
_TORSO, _ARMS, _LEGS = 1, 2, 3
# bone parent -> j at rest, body frame, for a 1.75 m person (height 1): (offset, shape group, capsule radius)
_BONES = (
    ((0.0, 0.0, 0.0), 0, 0.0),
    ((0.0, 0.0, 0.52), _TORSO, 0.13),
    ((0.0, 0.0, 0.22), _TORSO, 0.045),
    ((0.0, 0.18, 0.0), _TORSO, 0.055),
    ((0.0, 0.0, -0.29), _ARMS, 0.05),
    ((0.0, 0.0, -0.26), _ARMS, 0.04),
    ((0.0, -0.18, 0.0), _TORSO, 0.055),
    ((0.0, 0.0, -0.29), _ARMS, 0.05),
    ((0.0, 0.0, -0.26), _ARMS, 0.04),
    ((0.0, 0.10, -0.06), _TORSO, 0.085),
    ((0.0, 0.0, -0.44), _LEGS, 0.07),
    ((0.0, 0.0, -0.42), _LEGS, 0.05),
    ((0.0, -0.10, -0.06), _TORSO, 0.085),
    ((0.0, 0.0, -0.44), _LEGS, 0.07),
    ((0.0, 0.0, -0.42), _LEGS, 0.05),
)
_HEAD_RADIUS = 0.11  # a sphere at the head joint
# part of each bone's capsule (0 skin, 1 shirt, 2 trousers) and the head sphere's; left limbs are drawn lighter
_PART = (0, 1, 0, 1, 1, 0, 1, 1, 0, 2, 2, 2, 2, 2, 2)
_LEFT = tuple(j in (3, 4, 5, 9, 10, 11) for j in range(NUM_JOINTS))
_HAIR = (0.16, 0.11, 0.07)  # the back of every head

# Euler-angle limits (degrees) per joint, rows (x, y, z) as (low, high); x: sideways (abduction for hanging limbs,
# + moves a left limb outwards), y: + bends a hanging limb backwards / the spine forwards, z: twist about up
_LIM = {
    "neck": ((-20, 20), (-15, 40), (-35, 35)),
    "head": ((-25, 25), (-30, 45), (-60, 60)),
    "l_shoulder": ((-10, 20), (-10, 10), (-15, 15)),
    "r_shoulder": ((-20, 10), (-10, 10), (-15, 15)),
    "l_elbow": ((-10, 170), (-170, 50), (-70, 70)),  # the upper arm's angles (shoulder joint)
    "r_elbow": ((-170, 10), (-170, 50), (-70, 70)),
    "l_wrist": ((0, 0), (-145, 0), (0, 0)),  # the forearm: an elbow hinge
    "r_wrist": ((0, 0), (-145, 0), (0, 0)),
    "l_knee": ((-20, 45), (-120, 30), (-40, 40)),  # the thigh's angles (hip joint)
    "r_knee": ((-45, 20), (-120, 30), (-40, 40)),
    "l_ankle": ((0, 0), (0, 140), (0, 0)),  # the shin: a knee hinge
    "r_ankle": ((0, 0), (0, 140), (0, 0)),
}
LIMITS = torch.tensor([_LIM.get(j, ((0, 0),) * 3) for j in JOINTS], dtype=torch.float32).mul(math.pi / 180)
# named poses (degrees, joints not named are 0 = hanging straight)
POSES = {
    "standing": {"l_elbow": (8, 0, 0), "r_elbow": (-8, 0, 0), "l_wrist": (0, -10, 0), "r_wrist": (0, -10, 0)},
    "walking": {
        "l_knee": (3, -25, 0), "r_knee": (-3, 15, 0), "l_ankle": (0, 10, 0), "r_ankle": (0, 35, 0),
        "l_elbow": (6, 20, 0), "r_elbow": (-6, -20, 0), "l_wrist": (0, -25, 0), "r_wrist": (0, -25, 0),
    },
    "arms_up": {"l_elbow": (160, 0, 0), "r_elbow": (-160, 0, 0), "l_wrist": (0, -10, 0), "r_wrist": (0, -10, 0)},
    "t_pose": {"l_elbow": (90, 0, 0), "r_elbow": (-90, 0, 0)},
    "crouching": {
        "neck": (0, 25, 0), "l_knee": (10, -80, 0), "r_knee": (-10, -80, 0), "l_ankle": (0, 100, 0),
        "r_ankle": (0, 100, 0), "l_elbow": (10, -70, 0), "r_elbow": (-10, -70, 0),
    },
}  # fmt: skip


def named_pose(name: str) -> torch.Tensor:
    """Joint angles (15, 3) in radians of a pose in :data:`POSES`."""
    if name not in POSES:
        raise ValueError(f"pose {name!r} is unknown; expected one of {list(POSES)}")
    angles = torch.zeros(NUM_JOINTS, 3)
    for joint, xyz in POSES[name].items():
        angles[JOINTS.index(joint)] = torch.tensor(xyz, dtype=torch.float32) * (math.pi / 180)
    return angles


def sample_pose(rng: np.random.Generator, noise_deg: float = 12.0) -> tuple[torch.Tensor, int]:
    """A named pose (drawn uniformly) plus Gaussian noise on every free angle, clamped to :data:`LIMITS`.

    Returns the angles (15, 3) and the index of the named pose in :data:`POSES`.
    """
    k = int(rng.integers(len(POSES)))
    noise = torch.from_numpy(rng.normal(0.0, math.radians(noise_deg), (NUM_JOINTS, 3))).float()
    angles = named_pose(list(POSES)[k]) + noise
    return angles.clamp(LIMITS[..., 0], LIMITS[..., 1]), k


def local_rotations(angles: torch.Tensor) -> torch.Tensor:
    """Rotations (..., 3, 3) ``R_z(c) R_y(b) R_x(a)`` of angles (..., 3) = (a, b, c): each bone's rotation in its
    parent's frame from joint angles (..., 15, 3)."""
    c, s = angles.cos(), angles.sin()
    one, zero = torch.ones_like(c[..., 0]), torch.zeros_like(c[..., 0])

    def rot(*rows: torch.Tensor) -> torch.Tensor:
        return torch.stack(rows, -1).unflatten(-1, (3, 3))

    ci, si = c.unbind(-1), s.unbind(-1)
    rx = rot(one, zero, zero, zero, ci[0], -si[0], zero, si[0], ci[0])
    ry = rot(ci[1], zero, si[1], zero, one, zero, -si[1], zero, ci[1])
    rz = rot(ci[2], -si[2], zero, si[2], ci[2], zero, zero, zero, one)
    return rz @ ry @ rx


def _check_people(angles: torch.Tensor, shape: torch.Tensor) -> None:
    if angles.ndim != 3 or angles.shape[1:] != (NUM_JOINTS, 3) or len(angles) == 0:
        raise ValueError(f"angles must be (P, {NUM_JOINTS}, 3) with P >= 1 people, got {tuple(angles.shape)}")
    if shape.shape != (len(angles), len(SHAPE_NAMES)) or bool((shape <= 0).any()):
        raise ValueError(f"shape must be positive ({len(angles)}, {len(SHAPE_NAMES)}), got {tuple(shape.shape)}")


def bone_lengths(shape: torch.Tensor) -> torch.Tensor:
    """Length (P, 15) of the bone parent -> j (0 for the pelvis) of people with shape parameters (P, 4)."""
    rest = torch.tensor([b[0] for b in _BONES]).norm(dim=-1)
    group = shape[:, [b[1] for b in _BONES]]  # column 0 (height) stands in for the root's unused group
    return rest * group * shape[:, :1] * (rest > 0)


def joint_radii(shape: torch.Tensor) -> torch.Tensor:
    """The largest capsule radius (P, 15) at each joint (the head: its sphere), in metres."""
    r = torch.tensor([b[2] for b in _BONES])
    at = torch.zeros(NUM_JOINTS)
    for j, p in enumerate(PARENTS):
        if p >= 0:
            at[j], at[p] = max(at[j], r[j]), max(at[p], r[j])
    at[JOINTS.index("head")] = _HEAD_RADIUS
    return at * shape[:, :1]


def skeleton_from_rotations(local: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Root-relative joints (..., 15, 3) in the body frame (x forward, y left, z up) of people with bone rotations
    ``local`` (..., 15, 3, 3) in their parents' frames (row 0, the root's, is not used) and shape (..., 4).

    Differentiable in both: a task head that regresses rotations and shape (Multi-HMR's SMPL-X parametrisation)
    gets its joints from here.
    """
    unit = torch.tensor([b[0] for b in _BONES], dtype=local.dtype, device=local.device)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    offsets = unit * bone_lengths(shape.reshape(-1, shape.shape[-1])).view(*shape.shape[:-1], NUM_JOINTS)[..., None]
    rot = [torch.eye(3, dtype=local.dtype, device=local.device).expand_as(local[..., 0, :, :])]
    pos = [torch.zeros_like(offsets[..., 0, :])]
    for j in range(1, NUM_JOINTS):
        p = PARENTS[j]
        rot.append(rot[p] @ local[..., j, :, :])
        pos.append(pos[p] + (rot[j] @ offsets[..., j, :, None])[..., 0])
    return torch.stack(pos, -2)


def body_turn(yaw: torch.Tensor) -> torch.Tensor:
    """The body frame -> world rotations (..., 3, 3) of people turned by ``yaw`` (...,) about world z."""
    zero = torch.zeros_like(yaw)
    return local_rotations(torch.stack([zero, zero, yaw], -1))


def forward_kinematics(angles: torch.Tensor, shape: torch.Tensor, root: torch.Tensor, yaw: torch.Tensor):
    """World joints (P, 15, 3) of people with angles (P, 15, 3), shape (P, 4), pelvis ``root`` (P, 3), ``yaw`` (P,)."""
    _check_people(angles, shape)
    body = skeleton_from_rotations(local_rotations(angles), shape)
    return root[:, None] + body @ body_turn(yaw).transpose(-1, -2)


def sample_people(rng: np.random.Generator, count: int, area: float = 1.3, min_gap: float = 0.7) -> dict:
    """``count`` people with random shapes, poses, yaws and places (disc of radius ``area`` m, ``min_gap`` apart).

    Returns ``angles`` (P, 15, 3), ``pose_id`` (P,), ``shape`` (P, 4), ``yaw`` (P,), ``joints`` (P, 15, 3) (feet on
    the ground) and ``root`` (P, 3) (the pelvis).
    """
    if count < 1:
        raise ValueError(f"a scene needs at least one person, got {count}")
    shape = np.concatenate([rng.uniform(0.85, 1.12, (count, 1)), rng.uniform(0.9, 1.1, (count, 3))], 1)
    poses = [sample_pose(rng) for _ in range(count)]
    yaw = rng.uniform(0, 2 * np.pi, count)
    xy = np.zeros((count, 2))
    for i in range(count):  # rejection sampling; after 200 tries the gap is not enforced
        for _ in range(200):
            xy[i] = area * math.sqrt(rng.uniform()) * np.array([math.cos(a := rng.uniform(0, 2 * np.pi)), math.sin(a)])
            if i == 0 or np.linalg.norm(xy[:i] - xy[i], axis=1).min() >= min_gap:
                break
    angles = torch.stack([p[0] for p in poses])
    shape_t, yaw_t = torch.tensor(shape, dtype=torch.float32), torch.tensor(yaw, dtype=torch.float32)
    root = torch.cat([torch.tensor(xy, dtype=torch.float32), torch.zeros(count, 1)], 1)
    joints = forward_kinematics(angles, shape_t, root, yaw_t)
    lift = joint_radii(shape_t)[:, JOINTS.index("l_ankle")] - joints[..., 2].amin(1)  # lowest joint a radius up
    joints[..., 2] += lift[:, None]
    root[:, 2] += lift
    pose_id = torch.tensor([p[1] for p in poses])
    return {"angles": angles, "pose_id": pose_id, "shape": shape_t, "yaw": yaw_t, "joints": joints, "root": root}


def sample_room_cameras(
    rng: np.random.Generator, views: int, size: int, fov: tuple[float, float] = (40.0, 90.0)
) -> Cameras:
    """``views`` pinhole cameras around the room centre, spread evenly in azimuth (+-20 deg jitter).

    Field of view uniform in ``fov`` (degrees) per view; the distance (2.6-5.9 m) grows as the field narrows so a
    3.4 m wide strip at the centre stays in view; eyes 1.0-2.6 m high, looking at a point near (0, 0, 0.9).
    """
    fovs = np.radians(rng.uniform(*fov, views))
    azimuth = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(views) / views + np.radians(rng.uniform(-20, 20, views))
    dist = np.clip(1.7 / np.tan(fovs / 2), 2.6, 5.5) + rng.uniform(0, 0.4, views)
    eye = np.stack([dist * np.cos(azimuth), dist * np.sin(azimuth), rng.uniform(1.0, 2.6, views)], -1)
    target = np.concatenate([rng.uniform(-0.3, 0.3, (views, 2)), rng.uniform(0.7, 1.1, (views, 1))], -1)
    pose = look_at(torch.tensor(eye, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    return Cameras(intrinsics_from_fov(torch.tensor(fovs, dtype=torch.float32), size, size), pose, (size, size))


def _capsules(joints: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Capsule ends A, B (C, 3), radii (C,), person (C,) and part index (C,): 14 bones and a head sphere each."""
    P = len(joints)
    child = torch.arange(1, NUM_JOINTS)
    parent = torch.tensor(PARENTS[1:])
    head = JOINTS.index("head")
    a = torch.cat([joints[:, parent], joints[:, head : head + 1]], 1)  # (P, 15, 3)
    b = torch.cat([joints[:, child], joints[:, head : head + 1]], 1)
    r = torch.tensor([b_[2] for b_ in _BONES[1:]] + [_HEAD_RADIUS]) * shape[:, :1]
    slot = torch.cat([child, torch.tensor([0])])  # colour slot: the bone's child joint, 0 for the head sphere
    return a.flatten(0, 1), b.flatten(0, 1), r.flatten(), torch.arange(P).repeat_interleave(NUM_JOINTS), slot.repeat(P)


def _ray_capsules(o: torch.Tensor, d: torch.Tensor, A: torch.Tensor, B: torch.Tensor, r: torch.Tensor):
    """Nearest ray distances (V, N, C) (inf: miss) of rays o (V, 3) + t d (V, N, 3), d unit, with capsules."""
    ba = B - A  # (C, 3)
    oa = o[:, None] - A  # (V, C, 3)
    baba = (ba * ba).sum(-1)
    bard = d @ ba.T  # (V, N, C)
    baoa = (oa * ba).sum(-1)[:, None]  # (V, 1, C)
    rdoa = torch.einsum("vnk,vck->vnc", d, oa)
    oaoa = (oa * oa).sum(-1)[:, None]
    # the infinite cylinder: |(oa + t d) x ba|^2 = r^2 |ba|^2, a quadratic a t^2 + 2 b t + c = 0
    qa = baba - bard * bard
    qb = baba * rdoa - baoa * bard
    qc = baba * oaoa - baoa * baoa - r * r * baba
    h = qb * qb - qa * qc
    t_cyl = (-qb - h.clamp(min=0).sqrt()) / torch.where(qa.abs() < 1e-12, 1e-12, qa)
    y = baoa + t_cyl * bard  # where along the axis (times |ba|^2) the cylinder is hit
    cyl_ok = (h >= 0) & (qa > 1e-12) & (y > 0) & (y < baba) & (t_cyl > 1e-4)
    t = torch.where(cyl_ok, t_cyl, torch.inf)
    for end, dot, sq in ((A, rdoa, oaoa), (B, None, None)):  # the end spheres
        if dot is None:
            ob = o[:, None] - end
            dot, sq = torch.einsum("vnk,vck->vnc", d, ob), (ob * ob).sum(-1)[:, None]
        disc = dot * dot - (sq - r * r)
        ts = -dot - disc.clamp(min=0).sqrt()
        t = torch.minimum(t, torch.where((disc >= 0) & (ts > 1e-4), ts, torch.inf))
    return t


def _forward(joints: torch.Tensor) -> torch.Tensor:
    """Unit facing direction (P, 3) of each person: its left (hips and shoulders, right to left) crossed with its up."""
    j = JOINTS.index
    left = joints[:, j("l_hip")] - joints[:, j("r_hip")] + joints[:, j("l_shoulder")] - joints[:, j("r_shoulder")]
    up = joints[:, j("neck")] - joints[:, j("pelvis")]
    fwd = torch.linalg.cross(left, up)
    return fwd / fwd.norm(dim=-1, keepdim=True).clamp(min=1e-9)


def _colours(rng: np.random.Generator, count: int) -> torch.Tensor:
    """Per person the RGB (P, 3, 3) of its skin, shirt and trousers."""
    skin = rng.uniform([0.45, 0.3, 0.2], [0.95, 0.75, 0.6], (count, 3))
    cloth = rng.uniform(0.08, 0.95, (count, 2, 3))
    return torch.tensor(np.concatenate([skin[:, None], cloth], 1), dtype=torch.float32)


def render_humans(
    people: dict, cameras: Cameras, colours: torch.Tensor, background: Scene | None = None
) -> dict[str, torch.Tensor]:
    """Render people (``joints`` (P, 15, 3), ``shape`` (P, 4)) into every view of ``cameras`` (V views; lens
    parameters go to the camera module's rays, but the sets and tests use pinholes only).

    Returns ``rgb`` uint8 (V, 3, H, W), ``depth`` (V, H, W) z-depth (0: nothing hit) and ``person_id`` int64 (V, H, W)
    (0 background, p + 1 person p). ``colours`` (P, 3, 3): skin, shirt, trousers; ``background`` defaults to a grey
    ground with far walls.
    """
    H, W = cameras.image_size
    if cameras.K.ndim != 3:
        raise ValueError(f"cameras must have one batch dim (V,), got batch shape {tuple(cameras.batch_shape)}")
    scene = background if background is not None else _default_background()
    bg = render(scene, cameras)
    d_cam, _ = camera_rays(cameras.K, H, W, cameras.distortion, cameras.xi)
    d = transform_points(cameras.cam_to_world[:, None, None], d_cam, direction=True).flatten(1, 2)  # (V, N, 3)
    o = cameras.centres
    A, B, r, person, slot = _capsules(people["joints"], people["shape"])
    t, k = _ray_capsules(o, d, A, B, r).min(-1)  # (V, N)
    z = t * d_cam.flatten(1, 2)[..., 2]
    bg_depth = bg["depth"].flatten(1)
    front = torch.isfinite(t) & ((bg_depth <= 0) | (z < bg_depth))
    hit = o[:, None] + torch.where(front, t, 0)[..., None] * d
    axis = B[k] - A[k]
    s = ((hit - A[k]) * axis).sum(-1) / (axis * axis).sum(-1).clamp(min=1e-12)
    normal = hit - (A[k] + s.clamp(0, 1)[..., None] * axis)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    part = torch.tensor(_PART)[slot[k]]
    albedo = colours[person[k], part] * torch.where(torch.tensor(_LEFT)[slot[k]], 1.25, 0.8)[..., None]
    # front/back cues, so that a person's facing (yaw) can be read from one view: hair on the back of the head and a
    # darker shirt back (a symmetric figure is ambiguous under a 180 deg turn)
    facing = (normal * _forward(people["joints"])[person[k]]).sum(-1)
    hair = (slot[k] == 0) & (facing < 0.2)
    albedo = torch.where(hair[..., None], torch.tensor(_HAIR), albedo)
    albedo = albedo * torch.where((part == 1) & (facing < 0), 0.6, 1.0)[..., None]
    light = torch.tensor(scene.light)
    lambert = (normal @ (light / light.norm())).clamp(min=0)
    shaded = (albedo * (0.45 + 0.55 * lambert)[..., None]).clamp(0, 1).mul(255).round().to(torch.uint8)
    rgb = bg["rgb"].permute(0, 2, 3, 1).flatten(1, 2)
    rgb = torch.where(front[..., None], shaded, rgb)
    return {
        "rgb": rgb.view(-1, H, W, 3).permute(0, 3, 1, 2).contiguous(),
        "depth": torch.where(front, z, bg_depth).view(-1, H, W),
        "person_id": torch.where(front, person[k] + 1, 0).view(-1, H, W),
    }


def _default_background(rng: np.random.Generator | None = None) -> Scene:
    """A ground of half-side 7 m with walls 2.5 m high at its edges (textured when ``rng`` is given, else grey)."""
    room = 7.0
    if rng is None:
        textures = torch.full((5, 3, 28, 28), 0.55)
    else:
        textures = torch.stack([procedural_texture(rng) * 0.6 + 0.3 for _ in range(5)])
    prims = [Plane((0.0, 0.0, 0.0), (room, 0.0, 0.0), (0.0, room, 0.0), 0, tile=room / 1.5)]
    for j in range(4):
        c, s = math.cos(j * math.pi / 2), math.sin(j * math.pi / 2)
        prims.append(Plane((room * c, room * s, 1.25), (-s * room, c * room, 0.0), (0.0, 0.0, 1.25), 1 + j, room / 2))
    return Scene(prims, textures)


def annotate(
    joints: torch.Tensor, shape: torch.Tensor, cameras: Cameras, depth: torch.Tensor, person_id: torch.Tensor,
    stride: int = 4, sigma: float = 1.0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-view 2-D targets of people ``joints`` (P, 15, 3) seen by ``cameras`` (V,) with rendered maps (V, H, W).

    Returns ``joints_2d`` (V, P, 15, 2) pixels (the camera module's projection), ``joint_depth`` (V, P, 15) z-depth,
    ``in_image`` and ``visible`` (V, P, 15) (see the module docstring), ``centre_2d`` (V, P, 2) (the projected
    pelvis) and ``heatmap`` (V, H / stride, W / stride): per cell the largest of the people's Gaussians (``sigma`` in
    heatmap cells) centred at their projected pelvis (CenterNet style), for people whose pelvis is in the image.
    """
    H, W = cameras.image_size
    V, P = len(cameras.K), len(joints)
    if H % stride or W % stride:
        raise ValueError(f"stride={stride} must divide the image size {H}x{W}")
    uv, z, valid = cameras.project(joints.expand(V, P, NUM_JOINTS, 3))
    inside = valid & (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    col = uv[..., 0].floor().clamp(0, W - 1).long()
    row = uv[..., 1].floor().clamp(0, H - 1).long()
    view = torch.arange(V)[:, None, None]
    seen_id, seen_z = person_id[view, row, col], depth[view, row, col]
    own = seen_id == torch.arange(1, P + 1)[None, :, None]
    visible = inside & own & (seen_z >= z - joint_radii(shape)[None] - 0.03)
    centre = uv[:, :, 0]
    grid = (torch.arange(H // stride) + 0.5, torch.arange(W // stride) + 0.5)
    gy, gx = torch.meshgrid(*grid, indexing="ij")
    c = centre / stride
    g = torch.exp(-((gx - c[..., 0, None, None]) ** 2 + (gy - c[..., 1, None, None]) ** 2) / (2 * sigma**2))
    g = torch.where(inside[:, :, 0, None, None], g, 0)  # (V, P, h, w)
    return {
        "joints_2d": uv, "joint_depth": z, "in_image": inside, "visible": visible, "centre_2d": centre,
        "heatmap": g.amax(1),
    }  # fmt: skip
