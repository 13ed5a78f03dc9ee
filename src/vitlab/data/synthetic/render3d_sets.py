"""Render3D multi-view sets: scenes of :mod:`.render3d` seen by 1-8 calibrated cameras, cached and previewed.

A sample is a dict of ``views`` uint8 (V, 3, H, W), ``depth`` (V, H, W) z-depth (0: nothing hit), ``valid`` bool
(V, H, W), ``pointmap`` and ``pointmap_cam`` (V, H, W, 3) (world frame; each view's camera frame), ``normals``
(V, H, W, 3) world frame, ``rays`` (V, H, W, 3) world unit directions, ``object_id`` int64 (V, H, W) (0 sky, k + 1
primitive k), and the cameras: ``K`` (V, 3, 3), ``cam_to_world`` (V, 4, 4), ``distortion`` (V, 5) (k1, k2, p1, p2, k3)
and ``xi`` (V,) (conventions: :mod:`vitlab.layers.camera`). The set stores views, depth, normals, object ids and
cameras; pointmaps, rays and the valid mask are derived on access through the camera module, so they always agree
with the cameras. :meth:`Render3DDataset.collate` stacks samples into (B, V, ...) batches; for DUSt3R-style pairs,
``pointmap`` of view 2 in view 1's frame is ``transform_points(invert_pose(cam_to_world[0]), pointmap[1])``.
Sample ``i`` depends only on ``(seed, split, i)`` and the parameters (:func:`generate_render3d`).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...layers.camera import Cameras, camera_rays, pixel_grid, transform_points, unproject
from ..datasets import TensorImageDataset
from ..fashion_mnist import load_fashion_mnist
from ._cache import atomic_write, load_or_generate
from ._viewset import ViewSet
from .fmnist_scenes import _SPLIT_TAG, SPLITS, _check_range, _mean_std, _source_key
from .render3d import render, sample_boxes_scene, sample_orbit_cameras

__all__ = ["GENERATOR_VERSION", "Render3DDataset", "generate_render3d", "make_render3d", "save_render3d_preview"]

GENERATOR_VERSION = 1
_FORMAT_VERSION = 1
_ARRAYS = ("views", "depth", "normals", "object_id", "K", "cam_to_world", "distortion", "xi")
_STREAM = 0x523344  # keeps these streams apart from the other generators' for the same seed


@dataclass(eq=False)
class Render3DDataset(ViewSet):
    """Multi-view samples in memory (N samples of V views, H x W px); see the module docstring for the fields."""

    views: torch.Tensor  # uint8 (N, V, 3, H, W)
    depth: torch.Tensor  # float32 (N, V, H, W)
    normals: torch.Tensor  # float16 (N, V, H, W, 3)
    object_id: torch.Tensor  # uint8 (N, V, H, W)
    K: torch.Tensor  # float32 (N, V, 3, 3)
    cam_to_world: torch.Tensor  # float32 (N, V, 4, 4)
    distortion: torch.Tensor  # float32 (N, V, 5)
    xi: torch.Tensor  # float32 (N, V)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the .npz this set was loaded from or saved to (make_render3d copies it)
    KIND: ClassVar[str] = "render3d"
    ARRAYS: ClassVar[tuple[str, ...]] = _ARRAYS
    FORMAT_VERSION: ClassVar[int] = _FORMAT_VERSION

    def __post_init__(self) -> None:
        self.check_arrays(lambda N, V, H, W: (
            ("depth", torch.float32, (N, V, H, W)), ("normals", torch.float16, (N, V, H, W, 3)),
            ("object_id", torch.uint8, (N, V, H, W)), ("K", torch.float32, (N, V, 3, 3)),
            ("cam_to_world", torch.float32, (N, V, 4, 4)), ("distortion", torch.float32, (N, V, 5)),
            ("xi", torch.float32, (N, V))))  # fmt: skip

    def cameras(self, i: int) -> Cameras:
        """The V cameras of sample ``i``."""
        return Cameras(self.K[i], self.cam_to_world[i], self.img_size, self.distortion[i], self.xi[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.check_index(i)
        H, W = self.img_size
        K, pose, depth = self.K[i], self.cam_to_world[i], self.depth[i]
        # all-zero lens parameters are the pinhole, as in the renderer
        dist = self.distortion[i] if self.distortion[i].any() else None
        xi = self.xi[i] if self.xi[i].any() else None
        at = (slice(None), None, None)
        valid = depth > 0
        cam, _ = unproject(
            pixel_grid(H, W), K[at], None if dist is None else dist[at], None if xi is None else xi[at], depth
        )
        cam = torch.where(valid[..., None], cam, 0)
        world = torch.where(valid[..., None], transform_points(pose[at], cam), 0)
        rays = transform_points(pose[at], camera_rays(K, H, W, dist, xi)[0], direction=True)
        return {
            "views": self.views[i],
            "depth": depth,
            "valid": valid,
            "pointmap": world,
            "pointmap_cam": cam,
            "normals": self.normals[i].float(),
            "rays": rays,
            "object_id": self.object_id[i].long(),
            "K": K,
            "cam_to_world": pose,
            "distortion": self.distortion[i],
            "xi": self.xi[i],
        }


@dataclass(frozen=True)
class _Recipe:
    """Everything a sample depends on besides its seed (cache key order)."""

    views: int
    size: int
    max_boxes: int
    fov: tuple[float, float]
    spread: float
    roll: float
    distortion: float
    xi: float
    walls: bool
    supersample: int
    shared_orbit: bool = False  # these two are only in the cache key when True: the default's key is the old one
    pan: bool = False


def _validate(split: str, n: int, seed: int, r: _Recipe) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    for name, value in (("n", n), ("seed", seed), ("views", r.views), ("size", r.size), ("max_boxes", r.max_boxes)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
    _check_range("n", n, 1, 10_000_000)
    _check_range("seed", seed, 0, 2**63 - 1)
    _check_range("views", r.views, 1, 8)
    _check_range("size", r.size, 16, 256)
    _check_range("max_boxes", r.max_boxes, 1, 16)
    if len(r.fov) != 2 or not 5 <= r.fov[0] <= r.fov[1] <= 150:
        raise ValueError(f"fov={r.fov}: expected (low, high) degrees with 5 <= low <= high <= 150")
    _check_range("spread", r.spread, 0, 180)
    _check_range("roll", r.roll, 0, 180)
    _check_range("distortion", r.distortion, 0, 0.5)
    _check_range("xi", r.xi, 0, 1)
    _check_range("supersample", r.supersample, 1, 4)
    if r.shared_orbit and r.pan:
        raise ValueError("shared_orbit=True and pan=True: two different camera motions, pick at most one")


def generate_render3d(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    *,
    views: int = 2,
    size: int = 64,
    max_boxes: int = 4,
    fov: tuple[float, float] = (40.0, 75.0),
    spread: float = 60.0,
    roll: float = 0.0,
    distortion: float = 0.0,
    xi: float = 0.0,
    walls: bool = True,
    supersample: int = 1,
    shared_orbit: bool = False,
    pan: bool = False,
    data_dir: str | Path | None = None,
    source: TensorImageDataset | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> Render3DDataset:
    """Generate (or load from the cache) ``n`` samples of ``views`` views of the default Render3D scene.

    Scenes come from :func:`.render3d.sample_boxes_scene`, cameras from :func:`.render3d.sample_orbit_cameras`
    (``fov`` in degrees, ``spread`` the azimuth range around view 1 in degrees, ``roll`` degrees, ``distortion`` the
    largest |k1|, ``xi`` the largest unified-model xi, ``shared_orbit`` every view at view 1's target, distance and
    height: only the azimuth differs, ``pan`` every view at view 1's eye, turned about the vertical). ``split`` picks
    the Fashion-MNIST split of the box textures; ``source`` replaces Fashion-MNIST by gray (N, 1, 28, 28) items;
    ``supersample`` s renders RGB with s x s rays per pixel.
    """
    recipe = _Recipe(views, size, max_boxes, (float(fov[0]), float(fov[1])), float(spread), float(roll),
                     float(distortion), float(xi), bool(walls), supersample, bool(shared_orbit), bool(pan))  # fmt: skip
    _validate(split, n, seed, recipe)
    params = {"generator": "render3d", "version": GENERATOR_VERSION, "split": split, "n": int(n), "seed": int(seed)}
    params |= {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(recipe).items()}
    for option in ("shared_orbit", "pan"):
        if not params[option]:
            del params[option]  # the default leaves the samples and the cache key as they were before it existed

    def generate() -> Render3DDataset:
        pool = (source if source is not None else load_fashion_mnist(data_dir, split=split)).images
        V, S = views, size
        arrays = {
            "views": torch.empty(n, V, 3, S, S, dtype=torch.uint8),
            "depth": torch.empty(n, V, S, S),
            "normals": torch.empty(n, V, S, S, 3, dtype=torch.float16),
            "object_id": torch.empty(n, V, S, S, dtype=torch.uint8),
            "K": torch.empty(n, V, 3, 3),
            "cam_to_world": torch.empty(n, V, 4, 4),
            "distortion": torch.empty(n, V, 5),
            "xi": torch.empty(n, V),
        }
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small per-sample tensors: intra-op threads cost more than they save; restored below
        try:
            with torch.inference_mode():
                for i in range(n):
                    # a per-sample stream: sample i is the same whatever n is and whichever samples come before it
                    rng = np.random.default_rng([seed, _SPLIT_TAG[split], i, _STREAM])
                    scene, _ = sample_boxes_scene(rng, pool, max_boxes, walls)
                    cams = sample_orbit_cameras(
                        rng, V, S, recipe.fov, spread, roll, distortion, xi, recipe.shared_orbit, recipe.pan
                    )
                    out = render(scene, cams, supersample)
                    for k, v in (("views", out["rgb"]), ("depth", out["depth"]), ("normals", out["normals"])):
                        arrays[k][i] = v
                    arrays["object_id"][i] = out["object_id"]
                    arrays["K"][i], arrays["cam_to_world"][i] = cams.K, cams.cam_to_world
                    arrays["distortion"][i], arrays["xi"][i] = cams.distortion, cams.xi
        finally:
            torch.set_num_threads(threads)
        mean, std = _mean_std(arrays["views"])
        return Render3DDataset(**arrays, mean=tuple(mean), std=tuple(std), name=f"render3d/{split}", params=params)

    key = {**params, "source": _source_key(split, data_dir, source)} if cache else None
    return load_or_generate("render3d", key, Render3DDataset.load, generate, cache_dir)


def save_render3d_preview(data: Render3DDataset, path: str | Path, count: int = 4) -> Path:
    """Write a PNG of ``count`` samples: rows RGB, depth (per-view colour scale, black = nothing) and world normals
    (mapped from [-1, 1] to colours); a column per view, the views of one sample side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, V = max(1, min(count, len(data))), data.num_views
    fig = Figure(figsize=(0.9 * count * V + 0.8, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, count * V, squeeze=False)
    for i in range(count):
        for v in range(V):
            col = i * V + v
            depth = data.depth[i, v].numpy()
            normals = (data.normals[i, v].float().numpy() + 1) / 2 * (depth > 0)[..., None]
            axes[0, col].imshow(data.views[i, v].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[1, col].imshow(np.ma.masked_equal(depth, 0), cmap="viridis_r", interpolation="nearest")
            axes[1, col].set_facecolor("black")
            axes[2, col].imshow(normals.clip(0, 1), interpolation="nearest")
            axes[0, col].set_title(f"#{i} view {v}", fontsize=6)
            for ax in axes[:, col]:
                ax.set_xticks([])
                ax.set_yticks([])
    for r, label in enumerate(("RGB", "z-depth", "normals")):
        axes[r, 0].set_ylabel(label, fontsize=7)
    H, W = data.img_size
    fig.suptitle(f"{data.name}: {len(data)} samples of {V} views, {W}x{H} px", fontsize=8)
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=0.99, top=0.86, bottom=0.02, wspace=0.05, hspace=0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_render3d(out: str | Path, preview: int = 4, **kwargs: Any) -> Path:
    """``vitlab data make render3d``: write ``render3d.npz``, ``preview.png`` and ``info.json`` into ``out``.

    ``kwargs`` go to :func:`generate_render3d` (``split``, ``n``, ``seed``, ``views``, ``size``, ...).
    """
    data = generate_render3d(**kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "render3d.npz"
    if data.path is not None and data.path.is_file():
        atomic_write(target, lambda f: f.write(data.path.read_bytes()))
    else:
        data.save(target)
    save_render3d_preview(data, out / "preview.png", count=preview)
    ids = data.object_id
    info = {
        "generator": "render3d",
        "params": data.params,
        "name": data.name,
        "num_samples": len(data),
        "num_views": data.num_views,
        "img_size": list(data.img_size),
        "mean": list(data.mean),
        "std": list(data.std),
        "valid_fraction": round(float((data.depth > 0).float().mean()), 4),
        "box_pixel_fraction": round(float((ids > 1 + 4 * int(data.params.get("walls", True))).float().mean()), 4),
        "files": {"data": target.name, "preview": "preview.png"},
    }
    atomic_write(out / "info.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return out
