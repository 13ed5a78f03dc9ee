"""3-D scene sets: a :class:`SceneDataset` whose instances are billboards with 7-DoF boxes, seen by pinhole cameras.

Conventions (every 3-D generator and task reads them from here):

- Camera frame: OpenCV, x right, y down, z forward, in metres. The camera looks horizontally from ``camera_height``
  above the ground, so the ground is the plane ``y = camera_height``; a principal point above the image centre shows
  more ground (a crop of a wider camera). A world frame on the ground below the camera with the same axes has
  ``world_to_cam = [I | (0, camera_height, 0)]``.
- Pixels and ``K``: those of ``layers/camera.py`` (the one place of the camera convention: pixel (row r, column c)
  covers [c, c + 1) x [r, r + 1), centre (c + 0.5, r + 0.5), OpenCV's principal point is ours minus 0.5;
  ``u = fx x / z + cx``, ``v = fy y / z + cy``), also the 2-D boxes' (a horizontal flip maps u to W - u).
  :func:`project_points` and :func:`pixel_rays` are thin pinhole forms of its ``project`` and ``pixel_grid``.
- Boxes (T, 7) ``(x, y, z, w, h, l, yaw)``: the box centre in the camera frame; its sizes along the object's own x
  (width), y (height) and z (length) axes; ``yaw`` turns the object's axes into the camera's about the camera y axis,
  ``R = [[cos, 0, sin], [0, 1, 0], [-sin, 0, cos]]`` (KITTI's ``rotation_y`` matrix), so corner ``(sx, sy, sz)`` is
  ``centre + R (sx w/2, sy h/2, sz l/2)``. At yaw 0 an object faces the camera, its width along +x; a positive yaw
  brings its right end (+w/2) nearer.
- Instances are billboards: the box's mid-plane (local z = 0) carries the texture. Depth is the z (not the ray
  length) of the surface a pixel centre sees: the billboard's plane on instance pixels, the ground below the horizon
  (up to :data:`MAX_DEPTH`), and 0 (no depth) elsewhere. It is derived from the panoptic map, boxes and camera on
  access, never stored, so it always agrees with them; so are the projected box centres.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...layers.camera import pixel_grid, project
from ..errors import DataError
from .scenes import SceneDataset

__all__ = [
    "MAX_DEPTH",
    "Scene3DDataset",
    "box3d_corners",
    "box3d_edges",
    "pixel_rays",
    "project_points",
    "render_depth",
    "save_preview_3d",
]

MAX_DEPTH = 100.0  # metres; ground farther than this (a row at the horizon) gets no depth

# corner i of box3d_corners has signs (sx, sy, sz) from the bits of i (x: bit 2, y: bit 1, z: bit 0)
_CORNER_SIGNS = torch.tensor([[1 if i & b else -1 for b in (4, 2, 1)] for i in range(8)], dtype=torch.float32)


def box3d_corners(boxes3d: torch.Tensor) -> torch.Tensor:
    """Corners (T, 8, 3) of boxes (T, 7) in the camera frame; corner i has sign bits (x: 4, y: 2, z: 1)."""
    centre, size, yaw = boxes3d[:, :3], boxes3d[:, 3:6], boxes3d[:, 6]
    c, s, zero, one = yaw.cos(), yaw.sin(), torch.zeros_like(yaw), torch.ones_like(yaw)
    R = torch.stack([c, zero, s, zero, one, zero, -s, zero, c], dim=1).view(-1, 3, 3)
    local = _CORNER_SIGNS.to(boxes3d) * size[:, None] / 2  # (T, 8, 3)
    return centre[:, None] + local @ R.transpose(1, 2)


def box3d_edges() -> list[tuple[int, int]]:
    """The 12 edges of a box as pairs of :func:`box3d_corners` indices (corners differing in one sign)."""
    return [(i, j) for i in range(8) for j in range(i + 1, 8) if (i ^ j).bit_count() == 1]


def project_points(points: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates (..., 2) of camera-frame points (..., 3) in front of a pinhole ``intrinsics`` (..., 3, 3)
    (broadcast): :func:`vitlab.layers.camera.project` without its in-front mask."""
    return project(points, intrinsics)[0]


def pixel_rays(intrinsics: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Rays (..., H, W, 3) through the pixel centres (:func:`vitlab.layers.camera.pixel_grid`), scaled to z = 1, for a
    pinhole ``intrinsics`` (..., 3, 3): ``camera_rays`` over their z, computed directly so no rounding is added (the
    generators threshold on where these rays meet the billboards)."""
    K = intrinsics.to(torch.float32)
    uv = pixel_grid(H, W)  # (H, W, 2) float32
    dx = (uv[..., 0] - K[..., 0, 2, None, None]) / K[..., 0, 0, None, None]
    dy = (uv[..., 1] - K[..., 1, 2, None, None]) / K[..., 1, 1, None, None]
    return torch.stack([dx, dy, torch.ones_like(dx)], dim=-1)


def _plane_hits(
    centre: torch.Tensor, size: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rays: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where rays (T or 1, H, W, 3) meet billboards (centre (T, 3), width/height (T, 2), yaw as cos/sin (T,)).

    Returns the hit's z (T, H, W), inf where the plane is not met in front of the camera, and its place on the
    billboard (T, H, W, 2) as shares of its width and height from its centre (inside: both within +-0.5).
    Basic arithmetic only: no transcendental op whose result could depend on a tensor's length.
    """
    c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
    x, y, z = (centre[:, k].view(-1, 1, 1) for k in range(3))
    dx, dy = rays[..., 0], rays[..., 1]
    # the plane's normal is the box's local z axis (sin, 0, cos); the ray point is depth * (dx, dy, 1)
    depth = (s * x + c * z) / (s * dx + c)
    depth = torch.where(depth > 0, depth, torch.inf)
    qx, qy, qz = depth * dx - x, depth * dy - y, depth - z
    along_w = (c * qx - s * qz) / size[:, 0].view(-1, 1, 1)
    along_h = qy / size[:, 1].view(-1, 1, 1)
    return depth, torch.stack([along_w, along_h], dim=-1)


def render_depth(
    panoptic: torch.Tensor, boxes3d: torch.Tensor, intrinsics: torch.Tensor, camera_height: float | torch.Tensor
) -> torch.Tensor:
    """Depth (H, W) float32 of a scene: instance ``j`` on ``panoptic == j + 1``, then the ground, else 0."""
    H, W = panoptic.shape
    rays = pixel_rays(intrinsics, H, W)  # (H, W, 3)
    dy = rays[..., 1]
    ground = torch.as_tensor(camera_height, dtype=torch.float32) / dy
    depth = torch.where((dy > 0) & (ground <= MAX_DEPTH), ground, torch.zeros(()))
    if len(boxes3d):
        b = boxes3d.to(torch.float32)
        hit, _ = _plane_hits(b[:, :3], b[:, 3:5], b[:, 6].cos(), b[:, 6].sin(), rays.unsqueeze(0))
        index = (panoptic.long() - 1).clamp(min=0).unsqueeze(0)
        depth = torch.where(panoptic > 0, hit.gather(0, index)[0], depth)
    return depth


@dataclass(eq=False, kw_only=True)
class Scene3DDataset(SceneDataset):
    """Scenes with 3-D targets: ``boxes3d`` float32 (T, 7), ``intrinsics`` float32 (N, 3, 3), ``camera_height``
    float32 (N,) metres; conventions in the module docstring. Every 2-D task can train on it as a SceneDataset.
    """

    boxes3d: torch.Tensor
    intrinsics: torch.Tensor
    camera_height: torch.Tensor

    FIXED_KEYS: ClassVar[tuple[str, ...]] = (*SceneDataset.FIXED_KEYS, "depth", "intrinsics", "camera_height")
    LIST_KEYS: ClassVar[tuple[str, ...]] = (*SceneDataset.LIST_KEYS, "boxes3d", "centers2d")
    SCENE_ARRAYS: ClassVar[tuple[str, ...]] = ("intrinsics", "camera_height")
    INSTANCE_ARRAYS: ClassVar[tuple[str, ...]] = ("boxes3d",)

    def __post_init__(self) -> None:
        super().__post_init__()
        N, T = len(self.images), len(self.labels)
        for key, shape in (("boxes3d", (T, 7)), ("intrinsics", (N, 3, 3)), ("camera_height", (N,))):
            t = getattr(self, key)
            if not torch.is_tensor(t) or t.dtype != torch.float32 or t.shape != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
                raise DataError(f"scene set {self.name!r}: {key} must be a float32 tensor {shape}, got {got}")
            if not bool(t.isfinite().all()):
                raise DataError(f"scene set {self.name!r}: {key} holds a value that is not finite")
        if T and bool((self.boxes3d[:, 3:6] <= 0).any()):
            raise DataError(f"scene set {self.name!r}: boxes3d sizes (w, h, l) must be positive")
        if N and bool((self.intrinsics[:, [0, 1], [0, 1]] <= 0).any()):
            raise DataError(f"scene set {self.name!r}: focal lengths (intrinsics fx, fy) must be positive")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Scene ``i``: the 2-D keys of :meth:`SceneDataset.__getitem__` plus 3-D ones.

        Added keys: depth float32 (H, W), boxes3d float32 (M, 7), centers2d float32 (M, 2) (the projected box
        centres, pixels), intrinsics float32 (3, 3), camera_height float32 ().
        """
        sample = super().__getitem__(i)
        i %= len(self)
        boxes3d = self.boxes3d[int(self.offsets[i]) : int(self.offsets[i + 1])].clone()
        K, height = self.intrinsics[i], self.camera_height[i]
        sample["depth"] = render_depth(sample["panoptic"], boxes3d, K, height)
        sample["boxes3d"] = boxes3d
        sample["centers2d"] = project_points(boxes3d[:, :3], K)
        sample["intrinsics"] = K
        sample["camera_height"] = height
        return sample

    def hflip(self, batch: dict[str, Any], flip: torch.Tensor) -> dict[str, Any]:
        """Flip the chosen scenes as :meth:`SceneDataset.hflip`, and their 3-D targets with them.

        Mirroring the image about its centre is the camera seeing the mirrored world (x -> -x) with ``cx -> W - cx``:
        boxes get ``x -> -x``, ``yaw -> -yaw``; projected centres ``u -> W - u``; depth maps flip with the image.
        """
        out = super().hflip(batch, flip)
        if not bool(flip.any()):
            return out
        W = batch["image"].shape[-1]
        decisions = flip.tolist()
        if "depth" in batch:
            out["depth"] = torch.where(flip.view(-1, 1, 1), batch["depth"].flip(-1), batch["depth"])
        if "intrinsics" in batch:
            out["intrinsics"] = batch["intrinsics"].clone()
            out["intrinsics"][flip, 0, 2] = W - batch["intrinsics"][flip, 0, 2]
        if "boxes3d" in batch:
            mirror = torch.tensor([-1.0, 1, 1, 1, 1, 1, -1])
            out["boxes3d"] = [b * mirror if f else b for b, f in zip(batch["boxes3d"], decisions, strict=True)]
        if "centers2d" in batch:
            out["centers2d"] = [
                torch.stack([W - c[:, 0], c[:, 1]], dim=1) if f else c
                for c, f in zip(batch["centers2d"], decisions, strict=True)
            ]
        return out


def save_preview_3d(scenes: Scene3DDataset, path: str | Path, count: int = 16, columns: int = 4) -> Path:
    """Write a PNG grid of the first ``count`` scenes: image, image with projected 3-D boxes, depth map."""
    # imported here: matplotlib is only needed for previews; Agg draws without a display
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    count = min(count, len(scenes))
    if count < 1:
        raise ValueError(f"count={count} is out of range; expected at least 1 scene to preview")
    rows = -(-count // columns)
    H, W = scenes.img_size
    palette = np.array([to_rgb(f"C{k % 10}") for k in range(len(scenes.thing_classes))])
    cmap = mpl.colormaps["turbo"].with_extremes(bad="black")
    cell = 1.6  # inches per panel row: 96 px scenes show at about 1.5x
    fig = Figure(figsize=(3 * columns * cell * W / H, rows * cell + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 3 * columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    edges: Sequence[tuple[int, int]] = box3d_edges()
    max_depth = float(scenes.params.get("depth_range", [0, MAX_DEPTH])[1]) * 1.5
    for i in range(count):
        scene = scenes[i]
        gray = scene["image"].float().mean(0).numpy() / 255
        ax_image, ax_boxes, ax_depth = (axes[i // columns, 3 * (i % columns) + k] for k in range(3))
        ax_image.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax_image.set_title(f"#{i}", fontsize=7)
        ax_boxes.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        corners = project_points(box3d_corners(scene["boxes3d"]), scene["intrinsics"]).numpy() - 0.5
        for uv, (u, v), label in zip(corners, scene["centers2d"].tolist(), scene["labels"].tolist(), strict=True):
            for a, b in edges:  # imshow puts pixel centre c + 0.5 at c
                ax_boxes.plot(uv[[a, b], 0], uv[[a, b], 1], color=palette[label], lw=0.7)
            ax_boxes.plot(u - 0.5, v - 0.5, "o", ms=1.5, color=palette[label])
        ax_boxes.set_xlim(-0.5, W - 0.5)
        ax_boxes.set_ylim(H - 0.5, -0.5)
        z = ", ".join(f"{d:.0f}" for d in scene["boxes3d"][:, 2].tolist())
        ax_boxes.set_title(f"z {z} m", fontsize=6)
        depth = np.ma.masked_less_equal(scene["depth"].numpy(), 0)
        ax_depth.imshow(depth, cmap=cmap, vmin=0, vmax=max_depth, interpolation="nearest")
        ax_depth.set_title("depth", fontsize=7)
    handles = [Patch(color=palette[k], label=name) for k, name in enumerate(scenes.thing_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(
        f"{scenes.name}: {len(scenes)} scenes of {W}x{H} px; depth 0-{max_depth:.0f} m (black: none)", fontsize=9
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.45 / fig.get_figheight(), bottom=0.7 / fig.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
