"""Stick-figure human sets: scenes of :mod:`.humans` seen by 1-8 calibrated cameras, cached and previewed.

A sample is a dict of, per view, ``views`` uint8 (V, 3, H, W), ``depth`` (V, H, W) z-depth, ``person_id`` int64
(V, H, W) (0 background, p + 1 person p), ``joints_2d`` (V, P, 15, 2) pixels, ``joint_depth``, ``in_image`` and
``visible`` (V, P, 15), ``centre_2d`` (V, P, 2) (projected pelvis) and ``heatmap`` (V, H / stride, W / stride); per
scene ``joints_3d`` (P, 15, 3) world (z up, metres), ``root`` (P, 3) (pelvis), ``shape`` (P, 4), ``angles``
(P, 15, 3), ``yaw`` (P,), ``pose_id`` (P,) (index into :data:`.humans.POSES`, -1 padding), ``person_mask`` bool (P,),
``K`` (V, 3, 3) and ``cam_to_world`` (V, 4, 4). P is ``max_people``: absent people are padded (mask False, zero
joints, shape 1, nothing in the image, no heatmap peak). The 2-D targets are derived on access from the stored 3-D
joints, cameras, depth and ids (:func:`.humans.annotate`), so they always agree with the camera module. Sample
``i`` depends only on ``(seed, split, i)`` and the parameters. ``vitlab data make stick_humans --out DIR [--n]
[--views] [--size] [--max-items (people)]`` writes ``stick_humans.npz``, ``preview.png`` (views with skeletons) and
``info.json``.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...layers.camera import Cameras
from ._cache import atomic_write, load_or_generate
from ._viewset import ViewSet
from .fmnist_scenes import _SPLIT_TAG, SPLITS, _check_range
from .humans import (
    NUM_JOINTS,
    PARENTS,
    _colours,
    _default_background,
    annotate,
    render_humans,
    sample_people,
    sample_room_cameras,
)

__all__ = ["GENERATOR_VERSION", "HumansDataset", "generate_stick_humans", "make_stick_humans", "save_humans_preview"]

GENERATOR_VERSION = 2  # 2: hair and a darker shirt back (front/back cues)
_FORMAT_VERSION = 1
_ARRAYS = ("views", "depth", "person_id", "joints_3d", "angles", "shape", "yaw", "pose_id", "num_people", "K",
           "cam_to_world")  # fmt: skip
_STREAM = 0x48554D  # keeps these streams apart from the other generators' for the same seed


@dataclass(eq=False)
class HumansDataset(ViewSet):
    """Multi-view stick-figure scenes in memory (N scenes, V views, up to P people); fields: the module docstring."""

    views: torch.Tensor  # uint8 (N, V, 3, H, W)
    depth: torch.Tensor  # float32 (N, V, H, W)
    person_id: torch.Tensor  # uint8 (N, V, H, W)
    joints_3d: torch.Tensor  # float32 (N, P, 15, 3)
    angles: torch.Tensor  # float32 (N, P, 15, 3)
    shape: torch.Tensor  # float32 (N, P, 4), 1 for padding
    yaw: torch.Tensor  # float32 (N, P)
    pose_id: torch.Tensor  # int64 (N, P)
    num_people: torch.Tensor  # int64 (N,)
    K: torch.Tensor  # float32 (N, V, 3, 3)
    cam_to_world: torch.Tensor  # float32 (N, V, 4, 4)
    stride: int = 4
    sigma: float = 1.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    KIND: ClassVar[str] = "humans"
    ARRAYS: ClassVar[tuple[str, ...]] = _ARRAYS
    FORMAT_VERSION: ClassVar[int] = _FORMAT_VERSION
    EXTRA_META: ClassVar[tuple[str, ...]] = ("stride", "sigma")

    def __post_init__(self) -> None:
        P = self.joints_3d.shape[1] if torch.is_tensor(self.joints_3d) and self.joints_3d.ndim == 4 else -1
        self.check_arrays(lambda N, V, H, W: (
            ("depth", torch.float32, (N, V, H, W)), ("person_id", torch.uint8, (N, V, H, W)),
            ("joints_3d", torch.float32, (N, P, NUM_JOINTS, 3)), ("angles", torch.float32, (N, P, NUM_JOINTS, 3)),
            ("shape", torch.float32, (N, P, 4)), ("yaw", torch.float32, (N, P)), ("pose_id", torch.int64, (N, P)),
            ("num_people", torch.int64, (N,)), ("K", torch.float32, (N, V, 3, 3)),
            ("cam_to_world", torch.float32, (N, V, 4, 4))))  # fmt: skip

    @property
    def max_people(self) -> int:
        return self.joints_3d.shape[1]

    def cameras(self, i: int) -> Cameras:
        """The V cameras of sample ``i``."""
        return Cameras(self.K[i], self.cam_to_world[i], self.img_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.check_index(i)
        count, P = int(self.num_people[i]), self.max_people
        mask = torch.arange(P) < count
        person_id = self.person_id[i].long()
        ann = annotate(self.joints_3d[i, :count], self.shape[i, :count], self.cameras(i), self.depth[i], person_id,
                       self.stride, self.sigma)  # fmt: skip
        for k in ("joints_2d", "joint_depth", "in_image", "visible", "centre_2d"):  # pad people: (V, P, ...)
            pad = ann[k].new_zeros(ann[k].shape[0], P - count, *ann[k].shape[2:])
            ann[k] = torch.cat([ann[k], pad], 1)
        return {
            "views": self.views[i],
            "depth": self.depth[i],
            "person_id": person_id,
            **ann,
            "joints_3d": self.joints_3d[i],
            "root": self.joints_3d[i, :, 0],
            "shape": self.shape[i],
            "angles": self.angles[i],
            "yaw": self.yaw[i],
            "pose_id": self.pose_id[i],
            "person_mask": mask,
            "K": self.K[i],
            "cam_to_world": self.cam_to_world[i],
        }


def _validate(split: str, n: int, seed: int, views: int, size: int, max_people: int, fov, stride: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    for name, value in (("n", n), ("seed", seed), ("views", views), ("size", size), ("max_people", max_people)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
    _check_range("n", n, 1, 10_000_000)
    _check_range("seed", seed, 0, 2**63 - 1)
    _check_range("views", views, 1, 8)
    _check_range("size", size, 16, 256)
    _check_range("max_people", max_people, 1, 8)
    if len(fov) != 2 or not 10 <= fov[0] <= fov[1] <= 150:
        raise ValueError(f"fov={fov}: expected (low, high) degrees with 10 <= low <= high <= 150")
    if stride < 1 or size % stride:
        raise ValueError(f"stride={stride} must be >= 1 and divide size={size}")


def generate_stick_humans(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    *,
    views: int = 1,
    size: int = 64,
    max_people: int = 3,
    fov: tuple[float, float] = (40.0, 90.0),
    stride: int = 4,
    sigma: float = 1.0,
    data_dir: str | Path | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> HumansDataset:
    """Generate (or load from the cache) ``n`` scenes of 1..``max_people`` stick figures seen by ``views`` cameras.

    ``views=1`` with the default ``fov`` (40-90 deg per view) is the Multi-HMR setting, ``views=3`` or 4 the MvP one
    (cameras spread around the room). ``split`` only seeds the scenes apart (no image data is read; ``data_dir`` is
    accepted for :func:`vitlab.data.synthetic.make`'s sake and ignored). ``stride`` and ``sigma``: the heatmaps.
    """
    fov = (float(fov[0]), float(fov[1]))
    _validate(split, n, seed, views, size, max_people, fov, stride)
    params = {"generator": "stick_humans", "version": GENERATOR_VERSION, "split": split, "n": int(n), "seed": int(seed)}
    params |= {"views": views, "size": size, "max_people": max_people, "fov": list(fov)}

    def generate() -> HumansDataset:
        V, S, P = views, size, max_people
        arrays = {
            "views": torch.empty(n, V, 3, S, S, dtype=torch.uint8),
            "depth": torch.empty(n, V, S, S),
            "person_id": torch.empty(n, V, S, S, dtype=torch.uint8),
            "joints_3d": torch.zeros(n, P, NUM_JOINTS, 3),
            "angles": torch.zeros(n, P, NUM_JOINTS, 3),
            "shape": torch.ones(n, P, 4),
            "yaw": torch.zeros(n, P),
            "pose_id": torch.full((n, P), -1, dtype=torch.int64),
            "num_people": torch.empty(n, dtype=torch.int64),
            "K": torch.empty(n, V, 3, 3),
            "cam_to_world": torch.empty(n, V, 4, 4),
        }
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small per-scene tensors: intra-op threads cost more than they save
        try:
            with torch.inference_mode():
                for i in range(n):
                    rng = np.random.default_rng([seed, _SPLIT_TAG[split], i, _STREAM])
                    count = int(rng.integers(1, P + 1))
                    people = sample_people(rng, count)
                    cams = sample_room_cameras(rng, V, S, fov)
                    out = render_humans(people, cams, _colours(rng, count), _default_background(rng))
                    arrays["views"][i], arrays["depth"][i] = out["rgb"], out["depth"]
                    arrays["person_id"][i] = out["person_id"]
                    for k, src in (("joints_3d", "joints"), ("angles", "angles"), ("shape", "shape"), ("yaw", "yaw"),
                                   ("pose_id", "pose_id")):  # fmt: skip
                        arrays[k][i, :count] = people[src]
                    arrays["num_people"][i] = count
                    arrays["K"][i], arrays["cam_to_world"][i] = cams.K, cams.cam_to_world
        finally:
            torch.set_num_threads(threads)
        x = arrays["views"].transpose(0, 2).reshape(3, -1).double() / 255
        mean, std = x.mean(1).tolist(), x.std(1).tolist()
        return HumansDataset(**arrays, stride=stride, sigma=float(sigma), mean=tuple(mean), std=tuple(std),
                             name=f"stick_humans/{split}", params=params)  # fmt: skip

    key = {**params, "stride": stride, "sigma": float(sigma)} if cache else None
    return load_or_generate("stick_humans", key, HumansDataset.load, generate, cache_dir)


def save_humans_preview(data: HumansDataset, path: str | Path, count: int = 4) -> Path:
    """Write a PNG of ``count`` samples: a row per sample, a column per view, skeletons drawn over the views
    (joints: filled where visible, hollow where occluded or outside), and the centre heatmap of view 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, V = max(1, min(count, len(data))), data.num_views
    fig = Figure(figsize=(1.3 * (V + 1) + 0.4, 1.35 * count + 0.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(count, V + 1, squeeze=False)
    colours = ("#ffd000", "#00e5ff", "#ff4fd8", "#7dff4f", "#ff7f0e", "#ffffff", "#a0a0ff", "#ff3030")
    for i in range(count):
        s = data[i]
        for v in range(V):
            ax = axes[i, v]
            ax.imshow(s["views"][v].permute(1, 2, 0).numpy(), interpolation="nearest")
            for p in range(int(data.num_people[i])):
                uv, vis, c = s["joints_2d"][v, p].numpy() - 0.5, s["visible"][v, p].numpy(), colours[p % 8]
                for j, parent in enumerate(PARENTS):
                    if parent >= 0:
                        ax.plot(uv[[parent, j], 0], uv[[parent, j], 1], color=c, lw=0.6)
                ax.scatter(uv[vis, 0], uv[vis, 1], s=3, color=c)
                ax.scatter(uv[~vis, 0], uv[~vis, 1], s=3, facecolors="none", edgecolors=c, linewidths=0.4)
            H, W = data.img_size
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            ax.set_title(f"#{i} view {v}", fontsize=6)
        axes[i, V].imshow(s["heatmap"][0].numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        axes[i, V].set_title(f"centres, stride {data.stride}", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    H, W = data.img_size
    fig.suptitle(f"{data.name}: {len(data)} scenes of {V} views, {W}x{H} px", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.02, wspace=0.05, hspace=0.25)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_stick_humans(out: str | Path, preview: int = 4, **kwargs: Any) -> Path:
    """``vitlab data make stick_humans``: write ``stick_humans.npz``, ``preview.png`` and ``info.json`` into ``out``.

    ``kwargs`` go to :func:`generate_stick_humans` (``split``, ``n``, ``seed``, ``views``, ``size``, ...).
    """
    data = generate_stick_humans(**kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "stick_humans.npz"
    if data.path is not None and data.path.is_file():
        atomic_write(target, lambda f: f.write(data.path.read_bytes()))
    else:
        data.save(target)
    save_humans_preview(data, out / "preview.png", count=preview)
    info = {
        "generator": "stick_humans",
        "params": data.params,
        "name": data.name,
        "num_samples": len(data),
        "num_views": data.num_views,
        "img_size": list(data.img_size),
        "people_per_scene": {
            k: round(float(f(data.num_people.float())), 3)
            for k, f in (("min", torch.min), ("max", torch.max), ("mean", torch.mean))
        },
        "person_pixel_fraction": round(float((data.person_id > 0).float().mean()), 4),
        "mean": list(data.mean),
        "std": list(data.std),
        "files": {"data": target.name, "preview": "preview.png"},
    }
    atomic_write(out / "info.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return out
