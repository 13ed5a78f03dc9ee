"""Scripted expert camera paths over the 2-D camera-motion canvas (the demonstration world of DVGFormer, paper 39).

The world is the canvas of :mod:`.camera_motion` (a textured background, pinhole camera with pose ``(tx, ty,
log_zoom, roll, tilt)``, frames rendered by :func:`.camera_motion.camera_homographies`). The camera's look-at point
is a drone flying over the canvas; on it lie one *target* (a Fashion-MNIST item) and 1..``max_items`` *no-fly
zones* (disks drawn as ringed discs). A trajectory starts zoomed out (log-zoom -0.8, a random roll, tilt 0) with the
target in view, 0.65-0.95 frame sides away, and one no-fly zone across the straight line to it. The expert flies to
the target around the zones (a potential field: attraction to the target, radial and tangential push near a zone),
zooms in as it approaches, levels the roll, and stops when the target is centred at zoom 1 and roll 0.

Per frame ``t`` the camera takes ``substeps`` "dense" sub-steps of motion (``actions[t]``, (K, 5), per sub-step
deltas divided by :data:`ACTION_SCALE`); ``stop[t]`` is 1 from the frame at which the goal holds (its actions are
0). Which way to fly depends on where the target and the zones are, which only the frames show: a policy that sees
only its pose cannot solve an unseen layout. Each frame has two channels: the rendered gray view and a *proximity
map* computed exactly from the world (255 inside a no-fly zone, falling linearly to 0 at :data:`PROXIMITY_RANGE`
frame sides of clearance) -- the 2-D stand-in for DVGFormer's monocular-depth stream. Trajectories whose expert
collides or misses the goal are redrawn (deterministically). ``state[t]`` is the pose normalised
``(tx / size, ty / size, log_zoom, roll, tilt)``.

Trajectory ``i`` depends only on ``(seed, split, i)`` and the parameters; the set is cached like the other
generators. The 3-D drone world (Render3D, issue 18) is a follow-up.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import TensorImageDataset, subset_index
from ..errors import DataError
from ..fashion_mnist import load_fashion_mnist
from ._cache import atomic_write, load_or_generate
from .camera_motion import CAMERA_PARAMS, _apply, _Clip, _Recipe, _render_clip, camera_homographies
from .fmnist_scenes import _SPLIT_TAG, SPLITS, _check_range, _source_key
from .videos import VideoClipDataset

__all__ = [
    "ACTION_SCALE",
    "CameraPathDataset",
    "collisions",
    "generate_camera_paths",
    "goal_reached",
    "integrate_actions",
    "render_views",
]

GENERATOR_VERSION = 1
START_ZOOM = -0.8
MAX_SPEED = 0.04  # frame sides per sub-step
# per sub-step: tx, ty (MAX_SPEED frame sides), log-zoom, roll, tilt; actions are stored divided by these
ACTION_SCALE = (MAX_SPEED, MAX_SPEED, 0.06, 0.05, 0.05)
PROXIMITY_RANGE = 0.5  # frame sides of clearance at which the proximity map reaches 0
INFLUENCE = 0.3  # frame sides of clearance within which a zone pushes the expert
GOAL = (0.05, 0.03, 0.03)  # expert's goal: distance (frame sides), |log_zoom|, |roll|
_STREAM = 0x504154  # keeps the path streams apart from the other generators' for the same seed
_TRIES = 50


@dataclass(eq=False)
class CameraPathDataset(VideoClipDataset):
    """Expert trajectories: ``clips`` uint8 (N, T, 2, S, S) (view, proximity map), ``camera`` (N, T, 5) raw poses,
    ``state`` (N, T, 5), ``actions`` (N, T, K, 5), ``stop`` (N, T) float 0/1, ``route`` (N, T*K + 1, 2) the expert's
    look-at points (world px from the canvas centre), ``target`` (N, 5) (x, y, side, angle, mirror), ``zones``
    (N, M, 3) (x, y, radius; radius 0 pads), ``items`` uint8 (N, 1, h, w) the target textures."""

    state: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    stop: torch.Tensor | None = None
    route: torch.Tensor | None = None
    target: torch.Tensor | None = None
    zones: torch.Tensor | None = None
    items: torch.Tensor | None = None

    _EXTRA = ("state", "actions", "stop", "route", "target", "zones", "items")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {**item, "state": self.state[i], "actions": self.actions[i], "stop": self.stop[i]}

    def subset(self, n_or_indices: Any, seed: int = 0) -> "CameraPathDataset":
        index = subset_index(n_or_indices, len(self), seed, f"path set {self.name!r}")
        base = super().subset(index)
        return replace(base, **{k: getattr(self, k)[index] for k in self._EXTRA})

    def save(self, path: str | Path, key: dict[str, Any] | None = None) -> Path:
        arrays = {k: getattr(self, k).numpy() for k in ("clips", "motion", "identity", "camera", "track", *self._EXTRA)}
        arrays["meta"] = np.frombuffer(json.dumps(self._meta(key)).encode(), dtype=np.uint8)
        self.path = atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return self.path

    @classmethod
    def load(cls, path: str | Path, key: dict[str, Any] | None = None) -> "CameraPathDataset":
        base = VideoClipDataset.load(path, key)
        try:
            with np.load(path, allow_pickle=False) as npz:
                extra = {k: torch.from_numpy(npz[k]) for k in cls._EXTRA}
        except KeyError as e:
            raise DataError(f"path file {path} lacks an array: {e}") from e
        return cls(**{k: getattr(base, k) for k in base.__dataclass_fields__}, **extra)

    @property
    def substeps(self) -> int:
        return self.actions.shape[2]


@dataclass
class _Layout:
    """One trajectory's world (world px from the canvas centre) and its start pose."""

    start: np.ndarray  # (5,) raw pose
    target: np.ndarray  # (5,) x, y, side, angle, mirror
    zones: np.ndarray  # (M, 3) x, y, radius


def _background(rng: np.random.Generator, size: int, canvas: int) -> np.ndarray:
    level, low_amp, mid_amp = rng.uniform(0.05, 0.25), rng.uniform(0.03, 0.1), rng.uniform(0.03, 0.08)
    low, mid = rng.uniform(-1, 1, (6, 6)), rng.uniform(-1, 1, (max(2, canvas * 6 // size),) * 2)
    up = [F.interpolate(torch.from_numpy(g)[None, None], size=(canvas, canvas), mode="bilinear") for g in (low, mid)]
    return 255 * (level + low_amp * up[0][0, 0].numpy() + mid_amp * up[1][0, 0].numpy())


def _draw_layout(rng: np.random.Generator, size: int, max_items: int) -> _Layout:
    S = size
    start = np.array([*rng.uniform(-0.3, 0.3, 2) * S, START_ZOOM, rng.uniform(-0.4, 0.4), 0.0])
    heading, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.65, 0.95) * S
    direction = np.array([np.cos(heading), np.sin(heading)])
    goal = start[:2] + dist * direction
    target = np.array([*goal, 0.5 * S, rng.uniform(-0.5, 0.5), float(rng.random() < 0.5)])
    # one zone across the straight line, the others anywhere near (with passable gaps)
    zones = [[*(start[:2] + rng.uniform(0.35, 0.6) * dist * direction
               + rng.uniform(-0.08, 0.08) * S * direction[::-1] * [-1, 1]), rng.uniform(0.14, 0.2) * S]]  # fmt: skip
    for _ in range(int(rng.integers(0, max_items))):
        r = rng.uniform(0.14, 0.2) * S
        c = start[:2] + rng.uniform(0.3, 1.1) * S * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
        ok = np.hypot(*(c - start[:2])) > r + 0.12 * S and np.hypot(*(c - goal)) > r + 0.35 * S
        ok &= all(np.hypot(*(c - z[:2])) > r + z[2] + 0.15 * S for z in zones)
        if ok:
            zones.append([*c, r])
    return _Layout(start, target, np.array(zones))


def _expert_step(pose: np.ndarray, layout: _Layout, size: int) -> np.ndarray:
    """One sub-step (5,) of raw pose change."""
    S, p = size, pose[:2]
    d = layout.target[:2] - p
    dist = float(np.hypot(*d)) + 1e-9
    steer = d / dist
    for x, y, r in layout.zones:
        v = p - (x, y)
        n = v / (np.hypot(*v) + 1e-9)
        clear = np.hypot(*v) - r
        if clear < INFLUENCE * S:
            t = np.array([-n[1], n[0]])
            t = t if t @ d >= 0 else -t  # go round on the side that leads to the target
            steer = steer + 2.5 * ((INFLUENCE * S - clear) / (INFLUENCE * S)) ** 2 * (n + 1.5 * t)
    speed = min(MAX_SPEED * S, 0.5 * dist)
    step = np.zeros(5)
    step[:2] = speed * steer / (np.hypot(*steer) + 1e-9)
    zoom_goal = START_ZOOM * min(1.0, dist / (0.6 * S))
    step[2] = np.clip(zoom_goal - pose[2], -ACTION_SCALE[2], ACTION_SCALE[2])
    step[3] = np.clip(-pose[3], -ACTION_SCALE[3], ACTION_SCALE[3])
    return step


def goal_reached(camera: torch.Tensor, target: torch.Tensor, size: int, tol: tuple[float, ...] = GOAL) -> torch.Tensor:
    """Whether poses ``camera`` (..., 5) hold the goal of ``target`` (..., 5): centred within ``tol[0]`` frame sides,
    ``|log_zoom| <= tol[1]``, ``|roll| <= tol[2]``."""
    dist = (camera[..., :2] - target[..., :2]).norm(dim=-1) / size
    return (dist <= tol[0]) & (camera[..., 2].abs() <= tol[1]) & (camera[..., 3].abs() <= tol[2])


def collisions(points: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
    """Whether look-at points (..., P, 2) enter any zone of ``zones`` (..., M, 3) (radius 0 rows pad): (..., P)."""
    gap = (points[..., :, None, :] - zones[..., None, :, :2]).norm(dim=-1) - zones[..., None, :, 2]
    return ((gap < 0) & (zones[..., None, :, 2] > 0)).any(-1)


def integrate_actions(pose: torch.Tensor, actions: torch.Tensor, size: int) -> torch.Tensor:
    """Poses (..., K, 5) after each of ``actions`` (..., K, 5) (normalised sub-steps) applied from ``pose`` (..., 5)."""
    kw = {"dtype": actions.dtype, "device": actions.device}
    scale = torch.tensor(ACTION_SCALE, **kw) * torch.tensor([size, size, 1, 1, 1], **kw)
    return pose[..., None, :] + (actions * scale).cumsum(-2)


def _proximity(camera: torch.Tensor, zones: torch.Tensor, size: int, canvas: int) -> torch.Tensor:
    """uint8 (T, 1, S, S) proximity maps (module docstring), 2x2 samples per pixel averaged."""
    u = (torch.arange(2 * size, dtype=torch.float64) + 0.5) / 2
    pixels = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1)
    world = _apply(camera_homographies(camera, size, canvas)[:, None, None], pixels) - canvas / 2  # (T, 2S, 2S, 2)
    clear = (world[..., None, :] - zones[:, :2]).norm(dim=-1) - zones[:, 2]
    near = (1 - clear.amin(-1) / (PROXIMITY_RANGE * size)).clamp(0, 1) * 255
    return F.avg_pool2d(near[:, None].float(), 2).round().to(torch.uint8)


def render_views(
    camera: torch.Tensor, target: torch.Tensor, zones: torch.Tensor, item: torch.Tensor, background: np.ndarray,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Frames uint8 (T, 2, S, S) (view, proximity) at poses ``camera`` (T, 5) and the target's pixel track (T, 2).

    ``target`` (5,), ``zones`` (M, 3) and ``item`` uint8 (1, h, w) as stored in :class:`CameraPathDataset`;
    ``background`` is the trajectory's canvas texture (:func:`trajectory_background`).
    """
    canvas, T = background.shape[0], len(camera)
    zones = zones[zones[:, 2] > 0].double()
    h = item.shape[-1]
    disk = _zone_texture(h)
    k = len(zones)
    cam = camera.double().numpy()  # tx, ty: offsets from the canvas centre, as the items' below
    target = target.double().numpy()
    centre = np.concatenate([target[None, :2], zones[:, :2].numpy()]) + canvas / 2
    clip = _Clip(
        camera=cam,
        index=np.array([0] + [1] * k),
        centre=centre,
        velocity=np.zeros((k + 1, 2)),
        side=np.concatenate([[target[2]], 2 * zones[:, 2].numpy() * h / (h - 1)]),
        angle=np.concatenate([[target[3]], np.zeros(k)]),
        mirror=np.concatenate([[target[4] > 0.5], np.zeros(k, bool)]),
        background=background,
    )
    recipe = _Recipe(T, size, canvas, k, ("static",), 0.0)
    frames, track = _render_clip(clip, torch.stack([item, disk]), recipe)
    return torch.cat([frames, _proximity(camera.double(), zones, size, canvas)], 1), track


def _zone_texture(h: int) -> torch.Tensor:
    """uint8 (1, h, h): a disk filling the square, bright rim and centre, mid-gray between (the no-fly sign)."""
    c = (torch.arange(h, dtype=torch.float64) + 0.5 - h / 2).abs()
    r = torch.hypot(c[:, None], c[None, :]) / (h / 2)
    tex = torch.where(r < 1, 110.0, 0.0)
    tex = torch.where((r < 1) & ((r > 0.75) | (r < 0.25)), 255.0, tex)
    return tex.to(torch.uint8)[None]


def trajectory_background(seed: int, split: str, i: int, size: int, canvas: int) -> np.ndarray:
    """The canvas texture (canvas, canvas) float of trajectory ``i`` (the first draws of its stream)."""
    return _background(np.random.default_rng([seed, _SPLIT_TAG[split], i, _STREAM]), size, canvas)


def _make_path(rng: np.random.Generator, frames: int, substeps: int, size: int, max_items: int) -> dict[str, Any]:
    """Draw layouts until the expert reaches the goal before the last frame without entering a zone."""
    for _ in range(_TRIES):
        layout = _draw_layout(rng, size, max_items)
        pose, poses, steps, route, stop = layout.start.copy(), [], [], [layout.start[:2].copy()], []
        for _t in range(frames):
            poses.append(pose.copy())
            done = bool(goal_reached(torch.from_numpy(pose), torch.from_numpy(layout.target), size))
            stop.append(float(done))
            frame_steps = []
            for _k in range(substeps):
                step = np.zeros(5) if done else _expert_step(pose, layout, size)
                pose = pose + step
                frame_steps.append(step / ACTION_SCALE / np.array([size, size, 1, 1, 1]))
                route.append(pose[:2].copy())
            steps.append(frame_steps)
        route_t, zones_t = torch.tensor(np.array(route)), torch.from_numpy(layout.zones)
        if stop[-2] and not bool(collisions(route_t, zones_t).any()):
            return {"camera": np.array(poses), "actions": np.array(steps), "stop": np.array(stop),
                    "route": np.array(route), "target": layout.target, "zones": layout.zones}  # fmt: skip
    raise RuntimeError(f"no layout in {_TRIES} draws let the expert reach the goal in {frames} frames")


def generate_camera_paths(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    *,
    frames: int = 16,
    size: int = 28,
    substeps: int = 4,
    canvas: int | None = None,
    max_items: int = 3,
    data_dir: str | Path | None = None,
    source: TensorImageDataset | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> CameraPathDataset:
    """Generate (or load from the cache) ``n`` expert trajectories of ``frames`` frames (module docstring).

    Args:
        split: ``"train"`` targets are train-split items, ``"test"`` test-split items (and other layouts).
        substeps: "dense" motion sub-steps per frame.
        canvas: canvas side in world px (default and least ``7 * size``: every view stays inside).
        max_items: most no-fly zones (1..8).
    """
    canvas = 7 * size if canvas is None else canvas
    for name, value, lo, hi in (("n", n, 1, 1_000_000), ("seed", seed, 0, 2**63 - 1), ("frames", frames, 8, 64),
                                ("size", size, 16, 128), ("substeps", substeps, 1, 16), ("max_items", max_items, 1, 8),
                                ("canvas", canvas, 7 * size, 4096)):  # fmt: skip
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
        _check_range(name, value, lo, hi)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    recipe = {"frames": frames, "size": size, "substeps": substeps, "canvas": canvas, "max_items": max_items}
    params = {"generator": "camera_paths", "version": GENERATOR_VERSION, "split": split, "n": n, "seed": seed,
              **recipe}  # fmt: skip

    def generate() -> CameraPathDataset:
        items = source if source is not None else load_fashion_mnist(data_dir, split=split)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small per-trajectory tensors (as camera_motion)
        try:
            rows = [_trajectory(items, split, seed, i, **recipe) for i in range(n)]
        finally:
            torch.set_num_threads(threads)
        data = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0] if k != "zones"}
        M = max(len(r["zones"]) for r in rows)
        zones = torch.zeros(n, M, 3, dtype=torch.float32)
        for i, r in enumerate(rows):
            zones[i, : len(r["zones"])] = torch.as_tensor(r["zones"])
        clips = data["clips"]
        x = clips.float() / 255
        mean, std = x.mean((0, 1, 3, 4)).tolist(), x.std((0, 1, 3, 4)).tolist()
        return CameraPathDataset(
            clips=clips, motion=torch.zeros(n, dtype=torch.int64), identity=data["identity"].long(),
            camera=data["camera"].float(), track=data["track"].float(), motion_classes=["expert_path"],
            identity_classes=list(items.classes), reverse_of=[-1], camera_params=list(CAMERA_PARAMS),
            mean=tuple(mean), std=tuple(std), name=f"camera_paths/{split}", params=params,
            state=data["state"].float(), actions=data["actions"].float(), stop=data["stop"].float(),
            route=data["route"].float(), target=data["target"].float(), zones=zones, items=data["items"],
        )  # fmt: skip

    key = {**params, "source": _source_key(split, data_dir, source)} if cache else None
    return load_or_generate("camera_paths", key, CameraPathDataset.load, generate, cache_dir)


@torch.inference_mode()
def _trajectory(items: TensorImageDataset, split: str, seed: int, i: int, **r: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _SPLIT_TAG[split], i, _STREAM])
    background = _background(rng, r["size"], r["canvas"])
    path = _make_path(rng, r["frames"], r["substeps"], r["size"], r["max_items"])
    row = int(rng.integers(0, len(items)))
    item = items.images[row]
    camera = torch.from_numpy(path["camera"])
    clips, track = render_views(
        camera, torch.from_numpy(path["target"]), torch.from_numpy(path["zones"]), item, background, r["size"]
    )
    state = camera.clone()
    state[:, :2] /= r["size"]
    return {**path, "clips": clips, "track": track, "state": state, "items": item, "identity": items.targets[row]}


def save_path_preview(data: CameraPathDataset, path: str | Path, count: int = 4) -> Path:
    """Write a PNG: per trajectory a row of views and a row of proximity maps (frames as columns), target track red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, T = min(count, len(data)), data.num_frames
    fig = Figure(figsize=(0.5 * T + 1, 1.0 * count + 0.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * count, T, squeeze=False)
    for i in range(count):
        for t in range(T):
            for c in range(2):
                ax = axes[2 * i + c, t]
                ax.imshow(data.clips[i, t, c].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                if c == 0:
                    ax.plot(*(data.track[i, t] - 0.5).tolist(), "o", ms=1.2, color="red")
                if data.stop[i, t] > 0:
                    ax.set_title("stop", fontsize=5, pad=1)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * i, 0].set_ylabel(f"#{i} view", fontsize=6)
        axes[2 * i + 1, 0].set_ylabel("proximity", fontsize=6)
    fig.suptitle(f"{data.name}: expert camera paths ({T} frames, {data.substeps} sub-steps each)", fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.94, bottom=0.01, wspace=0.05, hspace=0.15)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
