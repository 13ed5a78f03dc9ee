"""Cached driving sets (``vitlab data make driving``): ego views of :mod:`.driving` worlds with the expert's plan.

A sample is one ego state in one world: ``views`` uint8 (V, 3, S, S) (V = 3: left, front, right; or 1: front),
``depth`` (V, S, S) z-depth (0: sky), ``semantic`` int64 (V, S, S) (:data:`.driving.CLASSES`), the rig ``K``
(V, 3, 3) and ``cam_to_ego`` (V, 4, 4), ``measurements`` (6,) (speed, command, route target), the expert's
``waypoints`` (4, 2) (ego frame, m) and ``light`` (int64: 0 green, 1 red). States are drawn along the expert's path
with noise (lateral offset sd 0.25 m, heading sd 0.05 rad, speed 60-110 % of the plan's), and for a third of the
red-light worlds at a standstill before the line, so a policy learns to recover and to wait. Sample ``i`` depends
only on ``(seed, split, i)``; :func:`world_of` rebuilds its world (the closed-loop evaluation drives in it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..datasets import TensorImageDataset
from ..fashion_mnist import load_fashion_mnist
from ._cache import atomic_write, load_or_generate
from ._viewset import ViewSet
from .driving import CLASSES, DrivingWorld, expert_waypoints, measurements, render_ego_views, sample_world
from .fmnist_scenes import _SPLIT_TAG, SPLITS, _check_range, _mean_std, _source_key

__all__ = ["DrivingDataset", "generate_driving", "make_driving", "save_driving_preview", "world_of"]

GENERATOR_VERSION = 1
_FORMAT_VERSION = 1
_ARRAYS = ("views", "depth", "semantic", "K", "cam_to_ego", "measurements", "waypoints", "light")
_STREAM = 0x445256  # keeps these streams apart from the other generators'


@dataclass(eq=False)
class DrivingDataset(ViewSet):
    """Driving samples in memory (see the module docstring for the fields)."""

    views: torch.Tensor  # uint8 (N, V, 3, S, S)
    depth: torch.Tensor  # float32 (N, V, S, S)
    semantic: torch.Tensor  # uint8 (N, V, S, S)
    K: torch.Tensor  # float32 (N, V, 3, 3)
    cam_to_ego: torch.Tensor  # float32 (N, V, 4, 4)
    measurements: torch.Tensor  # float32 (N, 6)
    waypoints: torch.Tensor  # float32 (N, 4, 2)
    light: torch.Tensor  # int64 (N,)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    KIND: ClassVar[str] = "driving"
    ARRAYS: ClassVar[tuple[str, ...]] = _ARRAYS
    FORMAT_VERSION: ClassVar[int] = _FORMAT_VERSION

    def __post_init__(self) -> None:
        self.check_arrays(lambda N, V, H, W: (
            ("depth", torch.float32, (N, V, H, W)), ("semantic", torch.uint8, (N, V, H, W)),
            ("K", torch.float32, (N, V, 3, 3)), ("cam_to_ego", torch.float32, (N, V, 4, 4)),
            ("measurements", torch.float32, (N, 6)), ("waypoints", torch.float32, (N, 4, 2)),
            ("light", torch.int64, (N,))))  # fmt: skip

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.check_index(i)
        item = {k: getattr(self, k)[i] for k in _ARRAYS}
        item["semantic"] = item["semantic"].long()
        return item


def world_of(split: str, i: int, seed: int, pool: torch.Tensor, max_obstacles: int = 3) -> tuple[DrivingWorld, Any]:
    """World ``i`` of a set (the same one the sample was rendered in) and its random stream after the world."""
    rng = np.random.default_rng([seed, _SPLIT_TAG[split], i, _STREAM])
    return sample_world(rng, pool, max_obstacles), rng


def _sample_state(world: DrivingWorld, rng: np.random.Generator) -> np.ndarray:
    if world.red and rng.random() < 1 / 3:  # waiting at the line
        x = world.stop_x - 2.5 + rng.uniform(-0.4, 0.3)
        return np.array([x, world.path_y(x) + rng.normal(0, 0.1), world.heading(x), rng.uniform(0, 0.3)])
    x_end = world.stop_x - 2.5 if world.red else 40.0
    x = rng.uniform(0, x_end)
    speed = float(world.target_speed(x)) * rng.uniform(0.6, 1.1)
    y = float(world.path_y(x)) + float(np.clip(rng.normal(0, 0.25), -0.6, 0.6))
    psi = float(world.heading(x)) + float(np.clip(rng.normal(0, 0.05), -0.15, 0.15))
    return np.array([x, y, psi, speed])


def generate_driving(split: str = "train", n: int = 1000, seed: int = 0, *, views: int = 3, size: int = 32,
                     max_obstacles: int = 3, data_dir: str | Path | None = None,
                     source: TensorImageDataset | None = None, cache: bool = True,
                     cache_dir: str | Path | None = None) -> DrivingDataset:  # fmt: skip
    """Generate (or load from the cache) ``n`` driving samples, ``views`` (3 or 1) cameras of ``size`` px."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    if views not in (1, 3):
        raise ValueError(f"views={views!r}: the driving rig has 3 cameras (left, front, right) or 1 (front)")
    _check_range("n", n, 1, 10_000_000)
    _check_range("size", size, 16, 128)
    _check_range("max_obstacles", max_obstacles, 0, 3)
    params = {"generator": "driving", "version": GENERATOR_VERSION, "split": split, "n": int(n), "seed": int(seed),
              "views": views, "size": size, "max_obstacles": max_obstacles}  # fmt: skip

    def generate() -> DrivingDataset:
        pool = (source if source is not None else load_fashion_mnist(data_dir, split=split)).images
        V, S = views, size
        arrays = {"views": torch.empty(n, V, 3, S, S, dtype=torch.uint8), "depth": torch.empty(n, V, S, S),
                  "semantic": torch.empty(n, V, S, S, dtype=torch.uint8), "K": torch.empty(n, V, 3, 3),
                  "cam_to_ego": torch.empty(n, V, 4, 4), "measurements": torch.empty(n, 6),
                  "waypoints": torch.empty(n, 4, 2), "light": torch.empty(n, dtype=torch.int64)}  # fmt: skip
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for i in range(n):
                    world, rng = world_of(split, i, seed, pool, max_obstacles)
                    state = _sample_state(world, rng)
                    out = render_ego_views(world, state, S, "three" if V == 3 else "front")
                    for k in ("views", "depth", "semantic", "K", "cam_to_ego"):
                        arrays[k][i] = out[k]
                    arrays["measurements"][i] = torch.from_numpy(measurements(world, state))
                    arrays["waypoints"][i] = torch.from_numpy(expert_waypoints(world, state)).float()
                    arrays["light"][i] = int(world.red)
        finally:
            torch.set_num_threads(threads)
        mean, std = _mean_std(arrays["views"])
        return DrivingDataset(**arrays, mean=tuple(mean), std=tuple(std), name=f"driving/{split}", params=params)

    key = {**params, "source": _source_key(split, data_dir, source)} if cache else None
    return load_or_generate("driving", key, DrivingDataset.load, generate, cache_dir)


_COLOURS = np.array([[0.55, 0.75, 0.95], [0.35, 0.35, 0.38], [1.0, 1.0, 1.0], [0.95, 0.6, 0.1], [0.9, 0.1, 0.1],
                     [0.1, 0.85, 0.2]])  # fmt: skip


def save_driving_preview(data: DrivingDataset, path: str | Path, count: int = 4,
                         predicted: torch.Tensor | None = None) -> Path:  # fmt: skip
    """A PNG of ``count`` samples: per sample a row of the views (left to right), their semantic classes, and a
    top-down plot of the expert's waypoints (and ``predicted`` (N, 4, 2) ones, if given) with the light state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, V = max(1, min(count, len(data))), data.num_views
    fig = Figure(figsize=(1.0 * (2 * V + 1) + 0.4, 1.1 * count + 0.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(count, 2 * V + 1, squeeze=False)
    for i in range(count):
        for v in range(V):
            axes[i, v].imshow(data.views[i, v].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i, V + v].imshow(_COLOURS[data.semantic[i, v].long().numpy()], interpolation="nearest")
        ax = axes[i, -1]
        wp = data.waypoints[i].numpy()
        ax.plot(-wp[:, 1], wp[:, 0], "o-", color="tab:blue", ms=2, lw=1, label="expert")
        if predicted is not None:
            p = predicted[i].numpy()
            ax.plot(-p[:, 1], p[:, 0], "x--", color="tab:orange", ms=3, lw=1, label="model")
        ax.plot([0], [0], "ks", ms=3)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-1, 11)
        ax.set_facecolor((1.0, 0.9, 0.9) if int(data.light[i]) else (0.9, 1.0, 0.9))
        ax.set_title(f"v={5 * float(data.measurements[i, 0]):.1f} m/s", fontsize=5)
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_title("views (left..right) | classes | plan", fontsize=6, loc="left")
    fig.suptitle(f"{data.name}: {len(data)} samples, {V} views; plan background red/green = light", fontsize=7)
    fig.subplots_adjust(left=0.02, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.25)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_driving(out: str | Path, preview: int = 4, **kwargs: Any) -> Path:
    """``vitlab data make driving``: write ``driving.npz``, ``preview.png`` and ``info.json`` into ``out``."""
    data = generate_driving(**kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "driving.npz"
    if data.path is not None and data.path.is_file():
        atomic_write(target, lambda f: f.write(data.path.read_bytes()))
    else:
        data.save(target)
    save_driving_preview(data, out / "preview.png", count=preview)
    share = data.semantic.long().flatten().bincount(minlength=len(CLASSES)).float()
    info = {"generator": "driving", "params": data.params, "name": data.name, "num_samples": len(data),
            "num_views": data.num_views, "img_size": list(data.img_size), "mean": list(data.mean),
            "std": list(data.std), "classes": list(CLASSES),
            "class_pixel_fraction": [round(float(s), 4) for s in share / share.sum()],
            "red_fraction": round(float(data.light.float().mean()), 4),
            "files": {"data": target.name, "preview": "preview.png"}}  # fmt: skip
    atomic_write(out / "info.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return out
