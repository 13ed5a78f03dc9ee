"""Camera-motion videos: Fashion-MNIST items on a large canvas, filmed by a camera that pans, zooms, rolls and tilts.

The world is a flat canvas of ``canvas`` x ``canvas`` world pixels: a textured background, up to ``max_items`` items
scattered over it, and one *centre item* placed at the camera's look-at point of the middle frame (drawn last, on
top). Each clip is filmed by a pinhole camera with one motion class; items may drift on their own.

Camera (per frame, ``camera[t] = (tx, ty, log_zoom, roll, tilt)``, radians for the angles): the camera looks at the
canvas point ``L = (canvas / 2 + tx, canvas / 2 + ty)`` from distance ``D = size`` (world px), with focal length
``size * exp(log_zoom)`` px, so at zoom 1 one image pixel at the centre spans one world pixel. Its rotation is
``R = R_x(tilt) R_z(roll)`` (OpenCV axes: x right, y down, z forward); it sits at ``L - D R e_z``, so ``tilt``
orbits the camera about the horizontal axis through ``L`` (a pure perspective change: the look-at point stays in
the centre and, for a growing tilt, the image top recedes) and ``roll`` turns it about its optical axis (a positive
roll turns the camera clockwise on screen, so the picture turns counter-clockwise). Frame ``t`` shows the world
through the homography ``H_t = M R K^-1`` (pixel -> plane, :func:`camera_homographies`); the frame is sampled
with ``F.grid_sample`` at 2x2 samples per pixel and averaged (antialiasing), items composited with premultiplied
alpha. Pixel (row r, column c) covers [c, c + 1) x [r, r + 1), as in the scene sets.

Motion classes (:data:`MOTIONS`): ``static`` and five time-reversed pairs (``pan_left``/``pan_right``,
``pan_up``/``pan_down``, ``zoom_in``/``zoom_out``, ``roll_cw``/``roll_ccw``, ``tilt_up``/``tilt_down``), named by what
the camera does. A clip's parameters move linearly, symmetric about the middle frame, by a total drawn from
:data:`MOTION_RANGE` (pans as a share of the frame side); every clip also gets a random base pose. The random
numbers of a clip do not depend on its class, and the item drift flips its sign with the motion's direction, so
**clip i of class c played backwards is exactly clip i of the paired class** (same seed, split and parameters): a
model that averages frames cannot tell the pair apart.

Labels per clip: ``motion`` (index into the ``motions`` asked for), ``identity`` (the class of the centre item),
``camera`` (T, 5) and ``track`` (T, 2), the centre item's centre in pixels per frame. Clip ``i`` depends only on
``(seed, split, i)`` and the parameters; the set is cached like the scene sets (:mod:`._cache`).
Deviation from the research note: warps are built here from torch ops (kornia is not a dependency).
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import TensorImageDataset
from ..fashion_mnist import load_fashion_mnist
from ._cache import load_or_generate
from .fmnist_scenes import _SPLIT_TAG, ITEM_THRESHOLD, SPLITS, _check_range, _mean_std, _source_key
from .videos import VideoClipDataset

__all__ = [
    "CAMERA_PARAMS",
    "GENERATOR_VERSION",
    "MOTIONS",
    "MOTION_PAIRS",
    "camera_homographies",
    "generate_camera_motion_videos",
]

GENERATOR_VERSION = 1
CAMERA_PARAMS = ("tx", "ty", "log_zoom", "roll", "tilt")
# name -> (camera parameter index, direction); static moves nothing
_MOTION_AXES = {
    "static": (0, 0),
    "pan_left": (0, -1),
    "pan_right": (0, 1),
    "pan_up": (1, -1),
    "pan_down": (1, 1),
    "zoom_in": (2, 1),
    "zoom_out": (2, -1),
    "roll_cw": (3, 1),
    "roll_ccw": (3, -1),
    "tilt_up": (4, 1),
    "tilt_down": (4, -1),
}
MOTIONS = tuple(_MOTION_AXES)
# each motion's time reversal: the same axis, the other direction
MOTION_PAIRS = {
    m: next(o for o, (a, d) in _MOTION_AXES.items() if a == axis and d == -sign)
    for m, (axis, sign) in _MOTION_AXES.items()
}
# total change over a clip, drawn uniformly per clip: pans in frame sides, log-zoom, roll and tilt in radians
MOTION_RANGE = {0: (0.25, 0.5), 1: (0.25, 0.5), 2: (0.3, 0.6), 3: (0.35, 0.8), 4: (0.4, 0.7)}
# half-widths of the per-clip base pose: tx, ty (frame sides), log-zoom, roll, tilt (radians)
BASE_JITTER = (0.25, 0.25, 0.1, 0.17, 0.08)
FRAMES_RANGE = (2, 64)
SIZE_RANGE = (16, 128)
MIN_CANVAS = 3  # canvas >= 3 * size keeps every frame of every clip inside the canvas (worst case 2.5; tested)
MAX_ITEMS_RANGE = (0, 128)
CENTRE_SIDE = (0.35, 0.55)  # centre item side as a share of the frame side
ITEM_SIDE = (0.25, 0.55)  # other items
MAX_ROTATION = math.radians(30)
SUPERSAMPLE = 2
_STREAM = 0x43414D  # keeps the clip streams apart from the scene generators' for the same seed


@dataclass(frozen=True)
class _Recipe:
    """Everything a clip depends on besides its seed (cache key order)."""

    frames: int
    size: int
    canvas: int
    max_items: int
    motions: tuple[str, ...]
    object_motion: float


def _validate(split: str, n: int, seed: int, r: _Recipe) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    for name in ("n", "seed", "frames", "size", "canvas", "max_items"):
        value = {"n": n, "seed": seed, **asdict(r)}[name]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
    _check_range("n", n, 1, 10_000_000)
    _check_range("seed", seed, 0, 2**63 - 1)
    _check_range("frames", r.frames, *FRAMES_RANGE)
    _check_range("size", r.size, *SIZE_RANGE)
    _check_range("canvas", r.canvas, MIN_CANVAS * r.size, 4096)
    _check_range("max_items", r.max_items, *MAX_ITEMS_RANGE)
    _check_range("object_motion", r.object_motion, 0.0, 1.0)
    unknown = [m for m in r.motions if m not in _MOTION_AXES]
    if not r.motions or unknown or len(set(r.motions)) != len(r.motions):
        raise ValueError(
            f"motions={list(r.motions)!r}: expected distinct names from {list(MOTIONS)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )


def camera_homographies(camera: torch.Tensor, size: int, canvas: int) -> torch.Tensor:
    """Homographies (..., 3, 3) mapping homogeneous pixels (u, v, 1) of a ``size`` px frame to canvas points.

    ``camera`` (..., 5) holds ``(tx, ty, log_zoom, roll, tilt)`` as in the module docstring.
    """
    tx, ty, log_zoom, roll, tilt = camera.to(torch.float64).unbind(-1)
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    f = size * log_zoom.exp()
    c = size / 2
    k_inv = torch.stack([1 / f, zero, -c / f, zero, 1 / f, -c / f, zero, zero, one], -1).unflatten(-1, (3, 3))
    cr, sr, ct, st = roll.cos(), roll.sin(), tilt.cos(), tilt.sin()
    r_z = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    r_x = torch.stack([one, zero, zero, zero, ct, -st, zero, st, ct], -1).unflatten(-1, (3, 3))
    R = r_x @ r_z
    look_at = torch.stack([canvas / 2 + tx, canvas / 2 + ty, zero], -1)
    C = look_at - size * R[..., :, 2]  # camera centre, D = size world px behind the look-at point
    # the ray C + lambda d meets z = 0 at ((Cx dz - Cz dx) / dz, (Cy dz - Cz dy) / dz): M d in homogeneous form
    M = torch.stack([-C[..., 2], zero, C[..., 0], zero, -C[..., 2], C[..., 1], zero, zero, one], -1).unflatten(
        -1, (3, 3)
    )
    return M @ R @ k_inv


def _apply(H: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Points (..., 2) through homographies H (..., 3, 3), broadcast."""
    p = points[..., :1] * H[..., :, 0] + points[..., 1:] * H[..., :, 1] + H[..., :, 2]  # elementwise: no tiny matmuls
    return p[..., :2] / p[..., 2:]


@dataclass
class _Clip:
    """One clip's draws: the camera path and the items (row 0 the centre item), world px and radians."""

    camera: np.ndarray  # (T, 5)
    index: np.ndarray  # (K,) pool rows
    centre: np.ndarray  # (K, 2) at the middle frame
    velocity: np.ndarray  # (K, 2) per frame
    side: np.ndarray  # (K,)
    angle: np.ndarray  # (K,)
    mirror: np.ndarray  # (K,) bool
    background: np.ndarray  # (canvas, canvas) float, 0..255


def _draw_clip(rng: np.random.Generator, motion: str, pool_size: int, r: _Recipe) -> _Clip:
    """Draw clip parameters; the draws are the same whatever ``motion`` is (it only picks an axis and a sign)."""
    T, S, canvas = r.frames, r.size, r.canvas
    base = rng.uniform(-1, 1, 5) * BASE_JITTER * np.array([S, S, 1, 1, 1])
    totals = [rng.uniform(*MOTION_RANGE[a]) * (S if a < 2 else 1) for a in range(5)]
    axis, sign = _MOTION_AXES[motion]
    step = np.zeros(5)
    step[axis] = sign * totals[axis] / (T - 1) if sign else 0.0
    t = np.arange(T) - (T - 1) / 2  # symmetric about the middle frame: reversing time negates t
    camera = base + t[:, None] * step
    k = 1 + int(rng.integers(0, r.max_items + 1))
    index = rng.integers(0, pool_size, k)
    side = S * np.concatenate([rng.uniform(*CENTRE_SIDE, 1), np.exp(rng.uniform(*np.log(ITEM_SIDE), k - 1))])
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, k)
    mirror = rng.random(k) < 0.5
    centre = rng.uniform(0, canvas, (k, 2))
    centre[0] = canvas / 2 + base[:2] + rng.uniform(-0.05, 0.05, 2) * S  # under the middle frame's look-at point
    heading, speed = rng.uniform(0, 2 * np.pi, k), rng.uniform(0, r.object_motion * S / (T - 1), k)
    # the drift turns with the motion's direction, so a reversed clip is its pair's clip from the same draws
    velocity = (sign or 1) * speed[:, None] * np.stack([np.cos(heading), np.sin(heading)], 1)
    level, low_amp, mid_amp = rng.uniform(0.05, 0.25), rng.uniform(0.03, 0.1), rng.uniform(0.03, 0.08)
    low, mid = rng.uniform(-1, 1, (6, 6)), rng.uniform(-1, 1, (max(2, canvas * 6 // S),) * 2)
    up = [F.interpolate(torch.from_numpy(g)[None, None], size=(canvas, canvas), mode="bilinear") for g in (low, mid)]
    background = 255 * (level + low_amp * up[0][0, 0].numpy() + mid_amp * up[1][0, 0].numpy())
    return _Clip(camera, index, centre, velocity, side, angle, mirror, background)


def _render_clip(clip: _Clip, pool: torch.Tensor, r: _Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames uint8 (T, 1, S, S) and the centre item's track float32 (T, 2) in pixels; ``pool`` uint8 (N, 1, h, w)."""
    T, S, canvas, ss = r.frames, r.size, r.canvas, SUPERSAMPLE
    H = camera_homographies(torch.from_numpy(clip.camera), S, canvas)  # (T, 3, 3) float64
    u = (torch.arange(S * ss, dtype=torch.float64) + 0.5) / ss
    pixels = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1)  # (S*ss, S*ss, 2) as (x, y)
    world = _apply(H[:, None, None], pixels).float()  # (T, S*ss, S*ss, 2); float32 from here on (speed)
    t = torch.arange(T, dtype=torch.float64) - (T - 1) / 2
    centres = torch.from_numpy(clip.centre)[:, None] + t[:, None] * torch.from_numpy(clip.velocity)[:, None]  # (K,T,2)

    # draw only the items whose path comes near what the clip sees (the centre item always)
    corners = torch.tensor([[0.0, 0.0], [S, 0.0], [0.0, S], [S, S]], dtype=torch.float64)
    seen = _apply(H[:, None], corners).flatten(0, 1)  # (4T, 2) float64
    lo, hi = seen.amin(0), seen.amax(0)
    reach = torch.from_numpy(clip.side)[:, None] * 0.75  # > half-diagonal of a rotated square item
    near = ((centres.amax(1) + reach >= lo) & (centres.amin(1) - reach <= hi)).all(1)
    near[0] = True
    order = torch.cat([torch.nonzero(near[1:]).flatten() + 1, torch.zeros(1, dtype=torch.long)])  # centre item last

    bg = torch.from_numpy(clip.background).float()[None, None].expand(T, 1, canvas, canvas)
    out = F.grid_sample(bg, world * (2 / canvas) - 1, mode="bilinear", padding_mode="border", align_corners=False)
    h, w = pool.shape[-2:]
    ang, side = torch.from_numpy(clip.angle[order.numpy()]), torch.from_numpy(clip.side[order.numpy()])
    c, s = ang.cos(), ang.sin()
    # item coordinates q = A (p - centre) + (w/2, h/2), A = (item px per world px) * mirror * R(-angle)
    A = torch.stack([c, s, -s, c], -1).view(-1, 2, 2) * (w / side)[:, None, None]
    A[:, 0] *= torch.from_numpy(np.where(clip.mirror[order.numpy()], -1.0, 1.0))[:, None]
    # grid = (A (p - centre) + (w/2, h/2)) * (2/w, 2/h) - 1 = A' p + b, A' = A scaled per row, b = -A' centre
    A = A * torch.tensor([2 / w, 2 / h], dtype=torch.float64)[:, None]
    b = -torch.einsum("kij,ktj->kti", A, centres[order])  # (K, T, 2); the +(w/2, h/2) and -1 cancel
    grid = torch.einsum("kij,thwj->kthwi", A.float(), world) + b.float()[:, :, None, None]
    grid = grid.flatten(1, 2)  # (K, T*S*ss, S*ss, 2)
    tex = F.grid_sample(_textures(pool[clip.index[order.numpy()]]), grid, mode="bilinear", align_corners=False)
    tex = tex.unflatten(2, (T, S * ss)).transpose(1, 2)  # (K, T, 2, S*ss, S*ss)
    for k in range(len(order)):  # painter's order, premultiplied alpha
        out = out * (1 - tex[k, :, 1:]) + tex[k, :, :1]
    frames = F.avg_pool2d(out, ss).round_().clamp_(0, 255).to(torch.uint8)
    track = _apply(torch.linalg.inv(H), centres[0]).float()
    return frames, track


def _textures(images: torch.Tensor) -> torch.Tensor:
    """(N, 2, h, w) float: item values where above :data:`ITEM_THRESHOLD` (premultiplied) and their alpha."""
    alpha = (images[:, :1] > ITEM_THRESHOLD).float()
    return torch.cat([images[:, :1].float() * alpha, alpha], 1)


@torch.inference_mode()
def _render_all(
    clips: torch.Tensor,
    camera: torch.Tensor,
    track: torch.Tensor,
    identity: torch.Tensor,
    pool: torch.Tensor,
    labels: torch.Tensor,
    split: str,
    seed: int,
    r: _Recipe,
) -> None:
    """Fill the clip arrays in place, clip by clip."""
    for i in range(len(clips)):
        # a per-clip stream: clip i is the same whatever n is and whichever clips come before it
        rng = np.random.default_rng([seed, _SPLIT_TAG[split], i, _STREAM])
        clip = _draw_clip(rng, r.motions[i % len(r.motions)], len(pool), r)
        clips[i], track[i] = _render_clip(clip, pool, r)
        camera[i] = torch.from_numpy(clip.camera)
        identity[i] = labels[clip.index[0]]


def generate_camera_motion_videos(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    *,
    frames: int = 8,
    size: int = 32,
    canvas: int | None = None,
    max_items: int | None = None,
    motions: tuple[str, ...] | list[str] = MOTIONS,
    object_motion: float = 0.15,
    data_dir: str | Path | None = None,
    source: TensorImageDataset | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> VideoClipDataset:
    """Generate (or load from the cache) ``n`` camera-motion clips of ``frames`` gray ``size`` x ``size`` frames.

    Args:
        split: ``"train"`` clips use train-split items, ``"test"`` clips test-split items.
        frames: frames per clip (2..64).
        size: frame side in pixels (16..128).
        canvas: side of the world canvas in world pixels (default and least ``3 * size``).
        max_items: most items on the canvas besides the centre item, drawn uniformly from 0..max_items per clip
            (default ``2 * (canvas // size) ** 2``, about one per frame area on average).
        motions: the motion classes to draw, in label order; clip ``i`` gets ``motions[i % len(motions)]``.
        object_motion: items drift in a random direction by up to this share of the frame side over the clip
            (0: still items; 0..1).
        data_dir: where Fashion-MNIST lies (see :func:`vitlab.data.find_fashion_mnist`); unused with ``source``.
        source: items to use instead of Fashion-MNIST's ``split`` (uint8 (N, 1, h, w) on black; for tests).
        cache: read and write the cache (``cache_dir``, else ``$VITLAB_CACHE/synthetic``), keyed by every
            parameter, the item source and :data:`GENERATOR_VERSION`.

    Raises:
        ValueError: an argument is out of range or unknown; the message names it.
    """
    canvas = MIN_CANVAS * size if canvas is None and isinstance(size, int) else canvas
    if max_items is None and isinstance(canvas, int) and isinstance(size, int) and size > 0:
        max_items = 2 * (canvas // size) ** 2
    if isinstance(motions, str):
        motions = (motions,)
    recipe = _Recipe(frames, size, canvas, max_items, tuple(motions), float(object_motion))
    _validate(split, n, seed, recipe)
    if source is not None and (source.in_chans != 1 or len(source) == 0):
        raise ValueError(f"source must hold gray (N, 1, h, w) items, got {len(source)} of {source.in_chans} channels")
    params = {
        "generator": "camera_motion_videos",
        "version": GENERATOR_VERSION,
        "split": split,
        "n": int(n),
        "seed": int(seed),
        **{k: int(v) for k, v in asdict(recipe).items() if k not in ("motions", "object_motion")},
        "motions": list(recipe.motions),
        "object_motion": recipe.object_motion,
    }

    def generate() -> VideoClipDataset:
        items = source if source is not None else load_fashion_mnist(data_dir, split=split)
        pool, labels = items.images, items.targets
        clips = torch.empty(n, frames, 1, size, size, dtype=torch.uint8)
        camera = torch.empty(n, frames, len(CAMERA_PARAMS), dtype=torch.float32)
        track = torch.empty(n, frames, 2, dtype=torch.float32)
        identity = torch.empty(n, dtype=torch.int64)
        threads = torch.get_num_threads()
        # one thread: the per-clip tensors are small, and intra-op threads cost more than they save (10x on 2 busy
        # cores); restored below
        torch.set_num_threads(1)
        try:
            _render_all(clips, camera, track, identity, pool, labels, split, seed, recipe)
        finally:
            torch.set_num_threads(threads)
        mean, std = _mean_std(clips)
        pair = [recipe.motions.index(MOTION_PAIRS[m]) if MOTION_PAIRS[m] in recipe.motions else -1 for m in motions]
        return VideoClipDataset(
            clips=clips,
            motion=torch.arange(n) % len(recipe.motions),
            identity=identity,
            camera=camera,
            track=track,
            motion_classes=list(recipe.motions),
            identity_classes=list(items.classes),
            reverse_of=pair,
            camera_params=list(CAMERA_PARAMS),
            mean=mean,
            std=std,
            name=f"camera_motion_videos/{split}",
            params=params,
        )

    key = {**params, "source": _source_key(split, data_dir, source)} if cache else None
    return load_or_generate("camera_motion_videos", key, VideoClipDataset.load, generate, cache_dir)
