"""FMNIST-Scenes-3D: Fashion-MNIST items as billboards standing on a ground plane, for monocular 3-D detection.

Each scene draws 1..``max_items`` items and stands each upright on the ground at a depth in ``depth_range``, in a
random image column, turned by a yaw within +-``max_yaw``. An item is as tall as its class typically is (a toy world of
person-sized garments, so that an item 20 m away still spans several pixels; +-``size_jitter``) and as wide as its
own aspect says; the billboard is the item's bright extent, so its bottom touches the ground. Rendering is exact
perspective: each pixel's ray meets the billboard's plane, and the item's texture is sampled there with
``F.grid_sample`` (first shrunk, with antialiasing, to about its projected size). A z-buffer decides what each pixel
shows, so nearer items occlude farther ones; items left (almost) hidden are dropped before the targets are made, and
instances are numbered in painter's order (farthest first). A light from the left shades each item by its yaw, which
tells +yaw from -yaw. The ground is a soft checkerboard in ground coordinates, low-passed by each pixel's footprint
so it fades toward the horizon instead of aliasing; above the horizon lies a plain sky. Monocular depth cues: the
ground's perspective, where an item meets it, and its size against its class's typical size.

The camera looks horizontally from ``camera_height`` with focal length ``focal * H`` px (jittered per scene by
+-``focal_jitter``), principal point ``(W / 2, horizon * H)``. Targets and conventions are those of
:class:`~.scenes3d.Scene3DDataset`. Scene ``i`` depends only on ``(seed, split, i)`` and the parameters.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import TensorImageDataset
from ..fashion_mnist import load_fashion_mnist
from ._cache import load_or_generate
from .fmnist_scenes import ITEM_THRESHOLD, SPLITS, _check_range, _mean_std, _source_key
from .scenes3d import Scene3DDataset, _plane_hits, pixel_rays

__all__ = ["GENERATOR_VERSION", "FMNISTScenes3D", "generate_fmnist_scenes_3d"]

# bump when a change alters the scenes of an existing parameter set: the cache key includes it
GENERATOR_VERSION = 1

CANVAS_RANGE = (32, 256)
MAX_ITEMS_RANGE = (1, 16)
# metres, in Fashion-MNIST's label order (T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, boot)
CLASS_HEIGHTS = (1.3, 1.8, 1.4, 1.7, 1.6, 0.7, 1.4, 0.6, 1.0, 0.9)
BILLBOARD_LENGTH = 0.1  # metres: the boxes' thickness (l), so that a box's yaw means something
CROP_THRESHOLD = 48  # an item's extent holds its pixels above this level; the fainter fringe is cut off
MIN_VISIBLE_FRACTION = 0.25  # an item keeps its place if at least this share of its own pixels stays visible ...
MIN_VISIBLE_PIXELS = 12  # ... and at least this many pixels
COLUMN_MARGIN = 0.1  # projected item centres lie in [margin, 1 - margin] of the canvas width
NEAR = 0.5  # metres: every box corner stays this far in front of the camera (limits the yaw of near wide items)
AMBIENT = 0.5  # item brightness: AMBIENT + (1 - AMBIENT) * max(0, facing normal . light direction)
_LIGHT = np.array([-0.6, -0.3, -0.75]) / np.linalg.norm([-0.6, -0.3, -0.75])  # left, above, behind the camera
_SPLIT_TAG = {"train": 0, "test": 1}


class FMNISTScenes3D(Scene3DDataset):
    """FMNIST-Scenes-3D: gray (1, H, W) scenes with 3-D targets; built by :func:`generate_fmnist_scenes_3d`."""


@dataclass(frozen=True)
class _Recipe:
    """The generator's parameters besides split, n and seed (cache key order)."""

    canvas: tuple[int, int]
    min_items: int
    max_items: int
    depth_range: tuple[float, float]
    max_yaw: float
    size_jitter: float
    focal: float
    focal_jitter: float
    camera_height: float
    horizon: float


def _validate(split: str, n: int, seed: int, r: _Recipe) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    ints = (("n", n), ("seed", seed), ("canvas", r.canvas[0]), ("canvas", r.canvas[1]))
    for name, value in (*ints, ("min_items", r.min_items), ("max_items", r.max_items)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
    _check_range("n", n, 1, 10_000_000)
    _check_range("seed", seed, 0, 2**63 - 1)
    for side in r.canvas:
        _check_range("canvas", side, *CANVAS_RANGE)
    _check_range("max_items", r.max_items, *MAX_ITEMS_RANGE)
    _check_range("min_items", r.min_items, 1, r.max_items)
    lo, hi = r.depth_range
    if not 1 <= lo < hi <= 80:
        raise ValueError(
            f"depth_range={(lo, hi)} is out of range; expected (near, far) metres with 1 <= near < far <= 80"
        )
    _check_range("max_yaw", r.max_yaw, 0, 80)
    _check_range("size_jitter", r.size_jitter, 0, 0.5)
    _check_range("focal", r.focal, 0.3, 3)
    _check_range("focal_jitter", r.focal_jitter, 0, 0.5)
    _check_range("camera_height", r.camera_height, 0.2, 5)
    _check_range("horizon", r.horizon, 0, 0.9)


def _crop_boxes(pool: np.ndarray) -> np.ndarray:
    """Each item's extent (P, 4) ``x0, y0, x1, y1`` (exclusive ends): the box of its pixels above CROP_THRESHOLD."""
    bright = pool > CROP_THRESHOLD
    bright[~bright.any(axis=(1, 2))] = True  # an item without bright pixels keeps its whole image
    rows, cols = bright.any(axis=2), bright.any(axis=1)
    y0, y1 = rows.argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], axis=1)


def _place_items(
    rng: np.random.Generator, pool_labels: np.ndarray, crops: np.ndarray, r: _Recipe
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw a scene's camera and items: intrinsics (3, 3), boxes (k, 7) float32, pool indices (k,), mirror flags (k,).

    Items come in painter's order (farthest first).
    """
    H, W = r.canvas
    k = int(rng.integers(r.min_items, r.max_items + 1))
    index = rng.integers(0, len(pool_labels), size=k)
    z = rng.uniform(*r.depth_range, size=k)
    u = rng.uniform(COLUMN_MARGIN, 1 - COLUMN_MARGIN, size=k) * W
    yaw = rng.uniform(-1, 1, size=k) * math.radians(r.max_yaw)
    scale = rng.uniform(1 - r.size_jitter, 1 + r.size_jitter, size=k)
    mirror = rng.random(k) < 0.5
    f = r.focal * H * rng.uniform(1 - r.focal_jitter, 1 + r.focal_jitter)
    K = np.array([[f, 0, W / 2], [0, f, r.horizon * H], [0, 0, 1]], np.float32)

    x0, y0, x1, y1 = crops[index].T
    h = np.asarray(CLASS_HEIGHTS)[pool_labels[index]] * scale
    w = h * (x1 - x0) / (y1 - y0)
    # the near end of a turned billboard must stay in front of the camera
    limit = np.arcsin(np.clip((z - NEAR - BILLBOARD_LENGTH / 2) / (w / 2), 0, 1))
    yaw = np.clip(yaw, -limit, limit)
    x = (u - K[0, 2]) * z / K[0, 0]
    y = r.camera_height - h / 2  # standing on the ground, y = camera_height
    boxes = np.stack([x, y, z, w, h, np.full(k, BILLBOARD_LENGTH), yaw], axis=1).astype(np.float32)
    order = np.argsort(-boxes[:, 2], kind="stable")
    return K, boxes[order], index[order], mirror[order]


def _item_textures(
    pool: np.ndarray,
    crops: np.ndarray,
    index: np.ndarray,
    mirror: np.ndarray,
    boxes: np.ndarray,
    yaw_cos_sin: tuple[np.ndarray, np.ndarray],
    f: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaded item textures (k, 1, h, w), each its crop at the top left, shrunk to about its projected size.

    Returns them and each texture's used size (k, 2) as (columns, rows).
    """
    k = len(index)
    textures = torch.zeros(k, 1, *pool.shape[1:])
    sizes = torch.empty(k, 2)
    c, s = yaw_cos_sin
    shade = AMBIENT + (1 - AMBIENT) * np.maximum(0, -(s * _LIGHT[0] + c * _LIGHT[2]))  # facing normal -(s, 0, c)
    for j in range(k):
        x0, y0, x1, y1 = crops[index[j]]
        crop = torch.from_numpy(pool[index[j], y0:y1, x0:x1]).float()
        crop = crop.flip(-1) if mirror[j] else crop
        _, _, z, w, h, _, _ = boxes[j].tolist()
        rows = min(y1 - y0, max(2, math.ceil(f * h / z)))
        cols = min(x1 - x0, max(2, math.ceil(f * w * abs(c[j]) / z)))
        if (rows, cols) != tuple(crop.shape):  # only ever shrinks: the antialiased resize is the mip level
            crop = F.interpolate(crop[None, None], (rows, cols), mode="bilinear", antialias=True, align_corners=False)
        textures[j, 0, :rows, :cols] = crop.view(rows, cols) * float(shade[j])
        sizes[j] = torch.tensor([cols, rows])
    return textures, sizes


def _background(rng: np.random.Generator, rays: torch.Tensor, f: float, camera_height: float) -> torch.Tensor:
    """Ground and sky levels (H, W) in 0..255: a soft checkerboard on the ground, a plain sky, pixel noise."""
    level, amplitude, period = rng.uniform(0.1, 0.3), rng.uniform(0.04, 0.1), rng.uniform(0.8, 2.0)
    phase_x, phase_z = rng.uniform(0, period, size=2)
    sky, sigma = rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.02)
    noise = torch.from_numpy(rng.standard_normal(rays.shape[:2]).astype(np.float32))
    dx, dy = rays[..., 0], rays[..., 1]
    Z = camera_height / dy.clamp(min=1e-6)
    X = Z * dx
    k = 2 * math.pi / period
    # a Gaussian low-pass with sigma = half a pixel's footprint (Z / f across, Z^2 / (f h) along the ground) scales a
    # cosine of frequency k by exp(-k^2 sigma^2 / 2)
    footprint2 = (Z / f) ** 2 + (Z * Z / (f * camera_height)) ** 2
    pattern = torch.cos(k * (X + phase_x)) * torch.cos(k * (Z + phase_z)) * torch.exp(-(k**2) * footprint2 / 8)
    value = torch.where(dy > 0, level + amplitude * pattern, torch.tensor(sky, dtype=torch.float32))
    return (value + sigma * noise) * 255


def _render_scene(
    rng: np.random.Generator, pool: np.ndarray, pool_labels: np.ndarray, crops: np.ndarray, r: _Recipe
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene: image uint8 (H, W), panoptic uint8 (H, W), labels (M,), boxes (M, 7), intrinsics (3, 3)."""
    H, W = r.canvas
    K, boxes, index, mirror = _place_items(rng, pool_labels, crops, r)
    f = float(K[0, 0])
    # per-item cos/sin from NumPy once: a torch op over a batch of items may round an item's value by where it sits
    cos, sin = np.cos(boxes[:, 6].astype(np.float64)), np.sin(boxes[:, 6].astype(np.float64))
    textures, sizes = _item_textures(pool, crops, index, mirror, boxes, (cos, sin), f)
    rays = pixel_rays(torch.from_numpy(K), H, W)
    background = _background(rng, rays, f, r.camera_height)

    b = torch.from_numpy(boxes)
    cos_t, sin_t = torch.from_numpy(cos.astype(np.float32)), torch.from_numpy(sin.astype(np.float32))
    depth, place = _plane_hits(b[:, :3], b[:, 3:5], cos_t, sin_t, rays.unsqueeze(0))  # (k, H, W), (k, H, W, 2)
    inside = (place.abs() <= 0.5).all(dim=-1) & depth.isfinite()
    size = sizes.view(-1, 1, 1, 2)
    # texel coordinates, clamped to the crop's outer texel centres so sampling never mixes in pixels beyond it
    texel = torch.minimum(((place + 0.5) * size).clamp(min=0.5), size - 0.5)
    texel = torch.where(inside.unsqueeze(-1), texel, torch.tensor(0.5))
    grid = texel * torch.tensor([2 / pool.shape[2], 2 / pool.shape[1]]) - 1
    values = F.grid_sample(textures, grid, mode="bilinear", align_corners=False)[:, 0].round()
    opaque = inside & (values > ITEM_THRESHOLD)
    zbuf = torch.where(opaque, depth, torch.inf)

    nearest, slot = zbuf.min(dim=0)
    seen = nearest.isfinite()
    visible = torch.bincount(slot[seen], minlength=len(boxes))
    own = opaque.sum(dim=(1, 2))
    keep = visible >= torch.clamp(MIN_VISIBLE_FRACTION * own, min=MIN_VISIBLE_PIXELS)
    if not bool(keep.any()) and bool(visible.any()):  # never leave a scene empty while something shows
        keep[visible.argmax()] = True
    if not bool(keep.all()):
        # dropping hidden items only uncovers pixels of kept ones (or background)
        zbuf[~keep] = torch.inf
        nearest, slot = zbuf.min(dim=0)
        seen = nearest.isfinite()
    ids = torch.cumsum(keep, 0).to(torch.uint8)  # slot -> panoptic id, painter's order kept
    panoptic = torch.where(seen, ids[slot], 0).to(torch.uint8)
    image = torch.where(seen, values.gather(0, slot.unsqueeze(0))[0], background.round())
    image = image.clamp(0, 255).to(torch.uint8)
    kept = keep.numpy()
    return image.numpy(), panoptic.numpy(), pool_labels[index[kept]].astype(np.int64), boxes[kept], K


def _generate(
    pool: np.ndarray, pool_labels: np.ndarray, split: str, n: int, seed: int, r: _Recipe
) -> dict[str, torch.Tensor]:
    H, W = r.canvas
    images = np.empty((n, 1, H, W), np.uint8)
    panoptic = np.empty((n, H, W), np.uint8)
    intrinsics = np.empty((n, 3, 3), np.float32)
    labels, boxes, counts = [], [], np.empty(n, np.int64)
    crops = _crop_boxes(pool)
    for i in range(n):
        # a per-scene stream: scene i is the same whatever n is and whichever scenes come before it
        rng = np.random.default_rng([seed, _SPLIT_TAG[split], i])
        images[i, 0], panoptic[i], scene_labels, scene_boxes, intrinsics[i] = _render_scene(
            rng, pool, pool_labels, crops, r
        )
        labels.append(scene_labels)
        boxes.append(scene_boxes)
        counts[i] = len(scene_labels)
    return {
        "images": torch.from_numpy(images),
        "panoptic": torch.from_numpy(panoptic),
        "labels": torch.from_numpy(np.concatenate(labels)),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])),
        "boxes3d": torch.from_numpy(np.concatenate(boxes).reshape(-1, 7)),
        "intrinsics": torch.from_numpy(intrinsics),
        "camera_height": torch.full((n,), r.camera_height, dtype=torch.float32),
    }


def generate_fmnist_scenes_3d(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    *,
    canvas: int | tuple[int, int] = 96,
    min_items: int = 1,
    max_items: int = 4,
    depth_range: tuple[float, float] = (2.0, 20.0),
    max_yaw: float = 60.0,
    size_jitter: float = 0.15,
    focal: float = 1.0,
    focal_jitter: float = 0.1,
    camera_height: float = 1.3,
    horizon: float = 0.3,
    data_dir: str | Path | None = None,
    source: TensorImageDataset | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> FMNISTScenes3D:
    """Generate (or load from the cache) ``n`` FMNIST-Scenes-3D.

    Args:
        split: ``"train"`` scenes use train-split items, ``"test"`` scenes test-split items.
        canvas: image side in pixels, or (H, W); each 32..256.
        min_items: fewest items drawn per scene (items hidden by others are dropped afterwards).
        max_items: most items drawn per scene (1..16).
        depth_range: item depths (z of the box centre) are uniform in this range, metres (1 <= near < far <= 80).
        max_yaw: yaws are uniform in +-max_yaw degrees (0..80); near, wide items may get less.
        size_jitter: an item's height is its class's typical height times a factor uniform in 1 +- size_jitter.
        focal: focal length as a multiple of the canvas height (0.3..3; 1 is a vertical field of view of 53 degrees).
        focal_jitter: per scene, the focal length is scaled by a factor uniform in 1 +- focal_jitter.
        camera_height: metres above the ground (0.2..5).
        horizon: the horizon's row (the principal point's cy) as a share of the canvas height (0..0.9).
        data_dir: where Fashion-MNIST lies (see :func:`vitlab.data.find_fashion_mnist`); unused with ``source``.
        source: items instead of Fashion-MNIST's ``split`` (uint8 (N, 1, h, w) on black, Fashion-MNIST's 10 classes).
        cache: read and write the cache, keyed by every parameter, the item source and :data:`GENERATOR_VERSION`.

    Raises:
        ValueError: an argument is out of range; the message names it and the range.
    """
    side = (canvas, canvas) if isinstance(canvas, (int, np.integer)) else tuple(canvas)
    if len(side) != 2:
        raise ValueError(f"canvas={canvas!r} must be one side or (H, W)")
    pair = (float(depth_range[0]), float(depth_range[1])) if len(depth_range) == 2 else tuple(depth_range)
    if len(pair) != 2:
        raise ValueError(f"depth_range={tuple(depth_range)} must be (near, far) in metres")
    r = _Recipe(
        canvas=(side[0], side[1]),
        min_items=min_items,
        max_items=max_items,
        depth_range=(pair[0], pair[1]),
        max_yaw=float(max_yaw),
        size_jitter=float(size_jitter),
        focal=float(focal),
        focal_jitter=float(focal_jitter),
        camera_height=float(camera_height),
        horizon=float(horizon),
    )
    _validate(split, n, seed, r)
    if source is not None and (source.in_chans != 1 or len(source) == 0):
        raise ValueError(f"source must hold gray (N, 1, h, w) items, got {len(source)} of {source.in_chans} channels")
    if source is not None and len(source.classes) != len(CLASS_HEIGHTS):
        raise ValueError(f"source has {len(source.classes)} classes; expected Fashion-MNIST's {len(CLASS_HEIGHTS)}")
    params: dict[str, Any] = {
        "generator": "fmnist_scenes_3d",
        "version": GENERATOR_VERSION,
        "split": split,
        "n": int(n),
        "seed": int(seed),
        "canvas": [int(s) for s in r.canvas],
        "min_items": int(min_items),
        "max_items": int(max_items),
        "depth_range": list(r.depth_range),
        **{k: getattr(r, k) for k in ("max_yaw", "size_jitter", "focal", "focal_jitter", "camera_height", "horizon")},
    }

    def generate() -> FMNISTScenes3D:
        items = source if source is not None else load_fashion_mnist(data_dir, split=split)
        arrays = _generate(items.images[:, 0].numpy(), items.targets.numpy(), split, n, seed, r)
        mean, std = _mean_std(arrays["images"])
        return FMNISTScenes3D(
            **arrays,
            thing_classes=list(items.classes),
            mean=mean,
            std=std,
            name=f"fmnist_scenes_3d/{split}",
            params=params,
        )

    key = {**params, "source": _source_key(split, data_dir, source)} if cache else None
    return load_or_generate("fmnist_scenes_3d", key, FMNISTScenes3D.load, generate, cache_dir)
