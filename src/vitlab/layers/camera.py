"""Camera geometry in one convention: poses, intrinsics, lens models, rays, Plücker coordinates, (un)projection.

Convention (every camera user in vitlab reads it from here):

- Camera frame: OpenCV, x right, y down, z forward. A pose is a 4x4 matrix (..., 4, 4); ``cam_to_world`` maps camera
  points to world points, ``X_w = R X_c + t``: the columns of ``R`` are the camera axes in the world, ``t`` is the
  camera centre. ``world_to_cam`` is its inverse (:func:`invert_pose`). Functions take 4x4 poses only; build one
  from ``(R, t)`` with :func:`pose_from_rt`.
- Pixels: pixel (row r, column c) covers [c, c + 1) x [r, r + 1), centre (c + 0.5, r + 0.5), as in the synthetic
  sets (OpenCV puts centres at integers: its principal point is ours minus 0.5). ``K = [[fx, s, cx], [0, fy, cy],
  [0, 0, 1]]`` maps a normalised point m to ``(u, v) = (fx m_x + s m_y + cx, fy m_y + cy)``.
- Lens: X goes to ``m = (X, Y) / (Z + xi |X|)`` (the unified camera model of Geyer & Daniilidis / Mei & Rives;
  ``xi = 0`` is the pinhole), then through Brown-Conrady distortion with OpenCV's coefficient order
  ``(k1, k2, p1, p2, k3)``, then ``K``. Distortion is exact; undistortion runs Newton's method on it and flags
  pixels where it did not converge (outside the region where the polynomial is invertible).
- Depth: ``"z"`` (z-depth, the point's camera Z) or ``"distance"`` (ray distance ``|X_c|``). Depth maps are z-depth
  unless named otherwise. Rays are unit directions; world rays start at the camera centre. Plücker coordinates of a
  ray are ``(d, o x d)`` with ``d`` unit (the moment does not depend on which point ``o`` of the ray is used).
- :func:`look_at` takes a world up vector (default +z, a z-up world): image up (-y) is its side, no roll.
Lens models: :mod:`.camera_lens`. Deviation from the issue: plain torch instead of kornia (not installed here).
"""

from dataclasses import dataclass

import torch

from .camera_lens import distort, lens_project, lens_unproject, undistort

__all__ = [
    "CameraError",
    "Cameras",
    "axis_angle_to_matrix",
    "camera_rays",
    "check_intrinsics",
    "check_pose",
    "distort",
    "intrinsics_from_fov",
    "intrinsics_matrix",
    "invert_pose",
    "look_at",
    "matrix_to_rotation_6d",
    "pixel_grid",
    "plucker",
    "pose_from_rt",
    "project",
    "random_rotation",
    "rotation_6d_to_matrix",
    "transform_points",
    "undistort",
    "unproject",
]

DEPTH_KINDS = ("z", "distance")


class CameraError(ValueError):
    """A camera that cannot be used: singular intrinsics, a pose that is not a rotation, mismatched counts."""


def pose_from_rt(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The 4x4 pose (..., 4, 4) ``[[R, t], [0, 1]]`` from a rotation (..., 3, 3) and a translation (..., 3)."""
    top = torch.cat([R, t.unsqueeze(-1)], -1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], -2)


def invert_pose(pose: torch.Tensor) -> torch.Tensor:
    """The inverse of rigid poses (..., 4, 4): ``[[R^T, -R^T t], [0, 1]]`` (``cam_to_world`` <-> ``world_to_cam``)."""
    Rt = pose[..., :3, :3].transpose(-1, -2)
    return pose_from_rt(Rt, -(Rt @ pose[..., :3, 3:]).squeeze(-1))


def transform_points(pose: torch.Tensor, points: torch.Tensor, *, direction: bool = False) -> torch.Tensor:
    """Points (..., 3) through poses (..., 4, 4) (leading dims broadcast); ``direction`` leaves out the translation."""
    out = (pose[..., :3, :3] * points.unsqueeze(-2)).sum(-1)  # R p without tiny batched matmuls
    return out if direction else out + pose[..., :3, 3]


Scalar = float | torch.Tensor


def intrinsics_matrix(fx: Scalar, fy: Scalar, cx: Scalar, cy: Scalar, skew: Scalar = 0.0) -> torch.Tensor:
    """K (..., 3, 3) from focal lengths, principal point and skew (floats or broadcastable tensors), in pixels."""
    fx, fy, cx, cy, skew = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=torch.float32) for v in (fx, fy, cx, cy, skew))
    )
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx, skew, cx, zero, fy, cy, zero, zero, one], -1).unflatten(-1, (3, 3))


def intrinsics_from_fov(fov_x: Scalar, H: int, W: int, fov_y: Scalar | None = None) -> torch.Tensor:
    """K (..., 3, 3) of a pinhole with horizontal field of view ``fov_x`` (radians), principal point at the centre.

    ``fov_y`` defaults to square pixels (``fy = fx``).
    """
    fx = (W / 2) / torch.tan(torch.as_tensor(fov_x, dtype=torch.float32) / 2)
    fy = fx if fov_y is None else (H / 2) / torch.tan(torch.as_tensor(fov_y, dtype=torch.float32) / 2)
    return intrinsics_matrix(fx, fy, W / 2, H / 2)


def check_intrinsics(K: torch.Tensor, name: str = "K") -> None:
    """Raise :class:`CameraError` unless ``K`` is finite (..., 3, 3) upper-triangular with nonzero focal lengths."""
    if not torch.is_tensor(K) or K.ndim < 2 or K.shape[-2:] != (3, 3):
        raise CameraError(f"{name} must be a (..., 3, 3) intrinsics tensor, got {getattr(K, 'shape', type(K))}")
    if not bool(torch.isfinite(K).all()):
        raise CameraError(f"{name} holds NaN or infinite entries")
    bottom = K[..., 2, :] - K.new_tensor([0.0, 0.0, 1.0])
    if bool((bottom.abs() > 1e-6).any()) or bool((K[..., 1, 0].abs() > 1e-6).any()):
        raise CameraError(f"{name} must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]]; got another lower part")
    focal = torch.stack([K[..., 0, 0], K[..., 1, 1]], -1).abs()
    if bool((focal < 1e-6).any()):
        raise CameraError(f"{name} is singular: a focal length is 0 (smallest |fx|, |fy| = {float(focal.min()):.3g})")


def check_pose(pose: torch.Tensor, name: str = "cam_to_world", atol: float = 1e-4) -> None:
    """Raise :class:`CameraError` unless ``pose`` is a rigid (..., 4, 4) transform: R R^T = I and det R = 1."""
    if not torch.is_tensor(pose) or pose.ndim < 2 or pose.shape[-2:] != (4, 4):
        raise CameraError(f"{name} must be a (..., 4, 4) pose, got {getattr(pose, 'shape', type(pose))}")
    if not bool(torch.isfinite(pose).all()):
        raise CameraError(f"{name} holds NaN or infinite entries")
    if bool(((pose[..., 3, :] - pose.new_tensor([0.0, 0.0, 0.0, 1.0])).abs() > atol).any()):
        raise CameraError(f"{name}'s last row must be (0, 0, 0, 1)")
    R = pose[..., :3, :3].double()
    off = (R @ R.transpose(-1, -2) - torch.eye(3, dtype=R.dtype)).abs().amax()
    det = torch.linalg.det(R)
    if float(off) > atol or bool(((det - 1).abs() > atol).any()):
        raise CameraError(
            f"{name}'s 3x3 block is not a rotation: max |R R^T - I| = {float(off):.3g}, det in "
            f"[{float(det.min()):.4g}, {float(det.max()):.4g}] (need 1; a reflection or a scaled matrix?)"
        )


def _lens_inputs(K: torch.Tensor, extra: int, distortion: torch.Tensor | None, xi: torch.Tensor | None):
    """K, distortion and xi with ``extra`` point dims inserted before their own, ready to broadcast."""
    at = (slice(None),) * (K.ndim - 2) + (None,) * extra
    dist = None if distortion is None else distortion[at]
    xi = None if xi is None else torch.as_tensor(xi, dtype=K.dtype, device=K.device)[at[: K.ndim - 2 + extra]]
    return K[at], dist, xi


def project(
    points: torch.Tensor, K: torch.Tensor, distortion: torch.Tensor | None = None, xi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (..., 2) of camera-frame points (..., 3) and where they are in front of the lens (...).

    ``K`` (..., 3, 3), ``distortion`` (..., 5) and ``xi`` (...) broadcast against the points' leading dims.
    """
    m, valid = lens_project(points, distortion, xi)
    u = K[..., 0, 0] * m[..., 0] + K[..., 0, 1] * m[..., 1] + K[..., 0, 2]
    v = K[..., 1, 1] * m[..., 1] + K[..., 1, 2]
    return torch.stack([u, v], -1), valid


def unproject(
    uv: torch.Tensor,
    K: torch.Tensor,
    distortion: torch.Tensor | None = None,
    xi: torch.Tensor | None = None,
    depth: torch.Tensor | None = None,
    depth_kind: str = "z",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-frame unit rays (or points at ``depth``) (..., 3) through pixels (..., 2), and where they are valid (...).

    ``depth_kind`` names what ``depth`` (...) holds: ``"z"`` (z-depth) or ``"distance"`` (along the unit ray).
    """
    if depth_kind not in DEPTH_KINDS:
        raise ValueError(f"depth_kind={depth_kind!r}; expected one of {DEPTH_KINDS}")
    my = (uv[..., 1] - K[..., 1, 2]) / K[..., 1, 1]
    mx = (uv[..., 0] - K[..., 0, 2] - K[..., 0, 1] * my) / K[..., 0, 0]
    ray, valid = lens_unproject(torch.stack([mx, my], -1), distortion, xi)
    if depth is None:
        return ray, valid
    if depth_kind == "distance":
        return ray * depth[..., None], valid
    valid = valid & (ray[..., 2] > 1e-8)
    return ray * (depth / torch.where(valid, ray[..., 2], torch.ones_like(mx)))[..., None], valid


def pixel_grid(H: int, W: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """Pixel centres (H, W, 2) as (u, v) = (c + 0.5, r + 0.5)."""
    v, u = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=device) + 0.5,
        torch.arange(W, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], -1)


def camera_rays(
    K: torch.Tensor, H: int, W: int, distortion: torch.Tensor | None = None, xi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rays (..., H, W, 3) through the pixel centres in the camera frame, and their valid mask (..., H, W)."""
    K_, dist, xi_ = _lens_inputs(K, 2, distortion, xi)
    return unproject(pixel_grid(H, W, K.dtype, K.device), K_, dist, xi_)


def plucker(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Plücker coordinates (..., 6) = (d, o x d) of rays with origins and directions (..., 3); d is normalised."""
    d = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.cat([d, torch.linalg.cross(origins.expand_as(d), d, dim=-1)], -1)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``cam_to_world`` (..., 4, 4) of cameras at ``eye`` (..., 3) looking at ``target``; image up is ``up``'s side.

    ``up`` defaults to world +z (z-up worlds). Raises :class:`CameraError` where ``eye == target`` or the view
    direction is parallel to ``up``.
    """
    up = eye.new_tensor([0.0, 0.0, 1.0]) if up is None else up
    z = target - eye
    zn = z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, up.expand_as(z), dim=-1)  # x = z x up: camera y (down) = -up, and x = y x z
    xn = x.norm(dim=-1, keepdim=True)
    if bool((zn < 1e-9).any()) or bool((xn < 1e-6 * zn * up.norm(dim=-1, keepdim=True)).any()):
        raise CameraError("look_at: the eye equals the target, or the view direction is parallel to `up`")
    z, x = z / zn, x / xn
    y = torch.linalg.cross(z, x, dim=-1)
    return pose_from_rt(torch.stack([x, y, z], -1), eye)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotations (..., 3, 3) from axis-angle vectors (..., 3) (angle = norm, radians; Rodrigues' formula)."""
    angle = axis_angle.norm(dim=-1, keepdim=True)
    k = axis_angle / angle.clamp(min=1e-12)
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    cross = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).unflatten(-1, (3, 3))
    s, c = angle.sin()[..., None], angle.cos()[..., None]
    return torch.eye(3, dtype=k.dtype, device=k.device) + s * cross + (1 - c) * (cross @ cross)


def rotation_6d_to_matrix(a: torch.Tensor) -> torch.Tensor:
    """Rotations (..., 3, 3) from the 6-D representation (..., 6) = the first two columns, Gram-Schmidt
    orthonormalised (Zhou et al., CVPR 2019: continuous, so a network or Adam can regress it)."""
    b1 = torch.nn.functional.normalize(a[..., :3], dim=-1)
    b2 = torch.nn.functional.normalize(a[..., 3:] - (b1 * a[..., 3:]).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.linalg.cross(b1, b2, dim=-1)], -1)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """The 6-D representation (..., 6) of rotations (..., 3, 3): their first two columns."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], -1)


def random_rotation(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` rotations (n, 3, 3) drawn uniformly (Haar) from normalised Gaussian quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    )  # fmt: skip
    return R.unflatten(-1, (3, 3)).to(dtype)


@dataclass
class Cameras:
    """A batch of calibrated cameras of one image size: every tensor shares the batch shape (e.g. (B, V)).

    ``K`` (*batch, 3, 3), ``cam_to_world`` (*batch, 4, 4), ``distortion`` (*batch, 5) or None (none),
    ``xi`` (*batch) or None (pinhole), ``image_size`` (H, W).
    """

    K: torch.Tensor
    cam_to_world: torch.Tensor
    image_size: tuple[int, int]
    distortion: torch.Tensor | None = None
    xi: torch.Tensor | None = None

    def __post_init__(self) -> None:
        size = self.image_size
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(isinstance(v, int) for v in size):
            raise CameraError(f"image_size must be a pair of ints (H, W), got {size!r}")
        if self.xi is not None and not torch.is_tensor(self.xi):
            self.xi = torch.as_tensor(self.xi, dtype=self.K.dtype).expand(self.K.shape[:-2])
        check_intrinsics(self.K)
        check_pose(self.cam_to_world)
        shapes = {"K": self.K.shape[:-2], "cam_to_world": self.cam_to_world.shape[:-2]}
        if self.distortion is not None:
            shapes["distortion"] = self.distortion.shape[:-1] if self.distortion.shape[-1:] == (5,) else None
        if self.xi is not None:
            shapes["xi"] = self.xi.shape
        if len(set(shapes.values())) != 1 or None in shapes.values():
            got = ", ".join(f"{k} {tuple(s) if s is not None else 'not (..., 5)'}" for k, s in shapes.items())
            raise CameraError(f"camera tensors disagree on the batch/view shape: {got}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise CameraError(f"image_size must be (H, W) >= 1, got {self.image_size}")

    @property
    def batch_shape(self) -> torch.Size:
        return self.K.shape[:-2]

    @property
    def world_to_cam(self) -> torch.Tensor:
        return invert_pose(self.cam_to_world)

    @property
    def centres(self) -> torch.Tensor:
        """Camera centres (*batch, 3) in the world."""
        return self.cam_to_world[..., :3, 3]

    def check_views(self, tensor: torch.Tensor, name: str = "views", trailing: int = 3) -> None:
        """Raise :class:`CameraError` unless ``tensor``'s leading dims (all but ``trailing``) equal the batch shape."""
        lead = tuple(tensor.shape[: tensor.ndim - trailing])
        if lead != tuple(self.batch_shape):
            raise CameraError(f"{name} has batch/view shape {lead}, but the cameras have {tuple(self.batch_shape)}")

    def rays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """World-frame ray origins and unit directions (*batch, H, W, 3), and the valid mask (*batch, H, W)."""
        d, valid = camera_rays(self.K, *self.image_size, self.distortion, self.xi)
        pose = self.cam_to_world[..., None, None, :, :]
        return self.centres[..., None, None, :].expand_as(d), transform_points(pose, d, direction=True), valid

    def plucker(self) -> torch.Tensor:
        """Per-pixel Plücker coordinates (*batch, H, W, 6) in the world frame."""
        return plucker(*self.rays()[:2])

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixels (*batch, *P, 2), z-depth and validity (*batch, *P) of world points (*batch, *P, 3)."""
        extra = points.ndim - 1 - len(self.batch_shape)
        pose = self.world_to_cam[(..., *(None,) * extra, slice(None), slice(None))]
        cam = transform_points(pose, points)
        uv, valid = project(cam, *_lens_inputs(self.K, extra, self.distortion, self.xi))
        return uv, cam[..., 2], valid

    def unproject(self, depth: torch.Tensor, depth_kind: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
        """World points (*batch, H, W, 3) of a depth map (*batch, H, W) and where they are valid."""
        self.check_views(depth, "depth", 2)
        K_, dist, xi = _lens_inputs(self.K, 2, self.distortion, self.xi)
        grid = pixel_grid(*self.image_size, self.K.dtype, self.K.device)
        cam, valid = unproject(grid, K_, dist, xi, depth, depth_kind)
        return transform_points(self.cam_to_world[..., None, None, :, :], cam), valid
