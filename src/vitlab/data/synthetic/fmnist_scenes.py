"""FMNIST-Scenes: Fashion-MNIST items pasted on a canvas, with instance, semantic and panoptic targets.

Each scene draws 1..``max_items`` Fashion-MNIST items (train scenes from the train split, test scenes from
the test split), scales, rotates and maybe mirrors each one, and pastes them in painter's order (later items
on top) on a plain or lightly textured, noisy background. An item's mask is its pixels above a small
threshold (Fashion-MNIST items lie on black). Targets describe what is visible after occlusion; items left
(almost) fully hidden are taken out of the scene before it is drawn, so every pixel shown is labelled.

Scene ``i`` depends only on ``(seed, split, i)`` and the generator parameters: its random numbers come from
a NumPy generator seeded with that tuple, never from global state. Items are resampled with PIL's affine
transform (bilinear; downscaled items are first resized with antialiasing).
"""

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..datasets import TensorImageDataset
from ..fashion_mnist import _SPLIT_FILES, _file_in, find_fashion_mnist, load_fashion_mnist
from ._cache import load_or_generate
from .scenes import SceneDataset

__all__ = ["GENERATOR_VERSION", "FMNISTScenes", "generate_fmnist_scenes"]

# bump when a change alters the scenes of an existing parameter set: the cache key includes it
GENERATOR_VERSION = 1

CANVAS_RANGE = (32, 256)
MAX_ITEMS_RANGE = (1, 16)  # panoptic maps are uint8; 16 keeps scenes readable
BACKGROUNDS = ("mixed", "plain", "textured")
SPLITS = ("train", "test")
ITEM_THRESHOLD = 16  # uint8 level above which a resampled item pixel belongs to the item
MIN_VISIBLE_FRACTION = 0.15  # an item keeps its place if at least this share of its own mask stays visible ...
MIN_VISIBLE_AREA = 0.004  # ... and at least this share of the canvas (16 px at 64 px)
CENTER_MARGIN = 0.15  # item centres lie in [margin, 1 - margin] of the canvas, so the top item is mostly inside
TEXTURE_GRID = 6  # the low-frequency texture is a 6x6 grid of random levels, upsampled bilinearly
_SPLIT_TAG = {"train": 0, "test": 1}


class FMNISTScenes(SceneDataset):
    """FMNIST-Scenes: gray (1, H, W) scenes of Fashion-MNIST items; built by :func:`generate_fmnist_scenes`."""


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range; expected {lo}..{hi}")


@dataclass(frozen=True)
class _Recipe:
    """What a scene is drawn from, besides its seed: the generator's parameters (cache key order)."""

    canvas: int
    min_items: int
    max_items: int
    scale: tuple[float, float]
    max_rotation: float
    background: str


def _validate(split: str, n: int, seed: int, recipe: _Recipe) -> None:
    canvas, min_items, max_items = recipe.canvas, recipe.min_items, recipe.max_items
    scale, max_rotation, background = recipe.scale, recipe.max_rotation, recipe.background
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {list(SPLITS)}")
    for name, value in (
        ("n", n),
        ("seed", seed),
        ("canvas", canvas),
        ("min_items", min_items),
        ("max_items", max_items),
    ):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be an integer")
    _check_range("n", n, 1, 10_000_000)
    _check_range("seed", seed, 0, 2**63 - 1)
    _check_range("canvas", canvas, *CANVAS_RANGE)
    _check_range("max_items", max_items, *MAX_ITEMS_RANGE)
    _check_range("min_items", min_items, 1, max_items)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale={tuple(scale)} is out of range; expected (lo, hi) with 0 < lo <= hi <= 1")
    _check_range("max_rotation", max_rotation, 0, 180)
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r} is unknown; expected one of {list(BACKGROUNDS)}")


def _interp_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) weights that upsample ``grid`` samples to ``size`` bilinearly (pixel centres aligned)."""
    pos = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, grid - 1)
    frac = pos - lo
    m = np.zeros((size, grid))
    np.add.at(m, (np.arange(size), lo), 1 - frac)
    np.add.at(m, (np.arange(size), hi), frac)
    return m


def _render_item(
    src: np.ndarray, side: float, angle: float, mirror: bool, cx: float, cy: float
) -> tuple[np.ndarray, int, int]:
    """Resample one 28x28 item to ``side`` px, rotated by ``angle`` degrees about its centre placed at (cx, cy).

    Returns the uint8 patch and its top-left canvas pixel (x0, y0); the patch just holds the rotated item.
    """
    im = Image.fromarray(src)
    if side < src.shape[1]:
        # PIL's resize antialiases, its affine transform does not: shrink first, then rotate at about 1:1
        s = max(2, round(side))
        im = im.resize((s, s), Image.Resampling.BILINEAR)
    S = im.size[0]
    c, s_ = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    half = 0.5 * side * (abs(c) + abs(s_)) + 1
    x0, y0 = math.floor(cx - half), math.floor(cy - half)
    w, h = math.ceil(cx + half) - x0, math.ceil(cy + half) - y0
    # source point q = A (p - centre) + S/2 for canvas point p = (x0 + x, y0 + y); A = S/side * mirror * R(-angle)
    k = S / side
    a00, a01, a10, a11 = k * c, k * s_, -k * s_, k * c
    if mirror:
        a00, a01 = -a00, -a01
    tx, ty = x0 - cx, y0 - cy
    coeffs = (a00, a01, a00 * tx + a01 * ty + S / 2, a10, a11, a10 * tx + a11 * ty + S / 2)
    patch = im.transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(patch), x0, y0


def _render_scene(
    rng: np.random.Generator,
    pool: np.ndarray,
    pool_labels: np.ndarray,
    recipe: _Recipe,
    interp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene: image uint8 (H, W), panoptic uint8 (H, W), labels int64 (M,) in painter's order."""
    canvas, min_items, max_items = recipe.canvas, recipe.min_items, recipe.max_items
    scale, max_rotation, background = recipe.scale, recipe.max_rotation, recipe.background
    H = W = canvas
    k = int(rng.integers(min_items, max_items + 1))
    index = rng.integers(0, len(pool), size=k)
    sides = canvas * np.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]), size=k))
    angles = rng.uniform(-max_rotation, max_rotation, size=k)
    centres = rng.uniform(CENTER_MARGIN, 1 - CENTER_MARGIN, size=(k, 2)) * canvas
    mirrors = rng.random(k) < 0.5
    coin = rng.random()  # drawn whatever ``background`` is, so that it changes the background alone
    textured = coin < 0.5 if background == "mixed" else background == "textured"
    level, amplitude, sigma = rng.uniform(0, 0.2), rng.uniform(0.02, 0.08), rng.uniform(0.0, 0.03)
    grid = rng.uniform(-1, 1, size=(TEXTURE_GRID, TEXTURE_GRID))
    bg = np.full((H, W), level)
    if textured:  # the noise is drawn last: skipping it moves no other random number
        bg = bg + amplitude * (interp @ grid @ interp.T) + sigma * rng.standard_normal((H, W))
    image = np.clip(np.rint(bg * 255), 0, 255).astype(np.uint8)

    # item masks clipped to the canvas: (slice of canvas rows, slice of canvas cols, patch values, patch mask)
    pieces = []
    for j in range(k):
        patch, x0, y0 = _render_item(pool[index[j]], sides[j], angles[j], mirrors[j], *centres[j])
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + patch.shape[1], W), min(y0 + patch.shape[0], H)
        values = patch[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        pieces.append((slice(cy0, cy1), slice(cx0, cx1), values, values > ITEM_THRESHOLD))

    def paint(keep: Sequence[int]) -> np.ndarray:
        ids = np.zeros((H, W), np.uint8)
        for new_id, j in enumerate(keep, start=1):
            rows, cols, _, mask = pieces[j]
            ids[rows, cols][mask] = new_id
        return ids

    ids = paint(range(k))
    visible = np.bincount(ids.ravel(), minlength=k + 1)[1:]
    own = np.array([p[3].sum() for p in pieces])
    threshold = np.maximum(MIN_VISIBLE_FRACTION * own, MIN_VISIBLE_AREA * H * W)
    keep = [j for j in range(k) if visible[j] > 0 and visible[j] >= threshold[j]]
    if not keep and visible.any():  # never leave a scene empty: its top visible item is unoccluded
        keep = [int(np.flatnonzero(visible)[-1])]
    if len(keep) < k:
        # taking hidden items out only uncovers pixels of the kept ones, so they stay above the threshold
        ids = paint(keep)
    for new_id, j in enumerate(keep, start=1):
        rows, cols, values, _ = pieces[j]
        region = image[rows, cols]
        shown = ids[rows, cols] == new_id
        region[shown] = values[shown]
    return image, ids, pool_labels[index[keep]].astype(np.int64)


def _source_key(split: str, data_dir: str | Path | None, source: TensorImageDataset | None) -> dict[str, Any]:
    """What identifies the item source in the cache key: a content hash, or the files' paths, sizes and times."""
    if source is not None:
        digest = hashlib.sha256(source.images.numpy().tobytes())
        digest.update(source.targets.numpy().tobytes())
        return {"kind": "tensor", "sha256": digest.hexdigest()}
    folder = find_fashion_mnist(data_dir)
    files = []
    for name in _SPLIT_FILES[split]:
        path = _file_in(folder, name)
        st = os.stat(path)
        files.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return {"kind": "files", "files": files}


def _generate(
    pool: np.ndarray,
    pool_labels: np.ndarray,
    split: str,
    n: int,
    seed: int,
    recipe: _Recipe,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    canvas = recipe.canvas
    images = np.empty((n, 1, canvas, canvas), np.uint8)
    panoptic = np.empty((n, canvas, canvas), np.uint8)
    labels, counts = [], np.empty(n, np.int64)
    interp = _interp_matrix(canvas, TEXTURE_GRID)
    for i in range(n):
        # a per-scene stream: scene i is the same whatever n is and whichever scenes come before it
        rng = np.random.default_rng([seed, _SPLIT_TAG[split], i])
        image, ids, scene_labels = _render_scene(rng, pool, pool_labels, recipe, interp)
        images[i, 0], panoptic[i] = image, ids
        labels.append(scene_labels)
        counts[i] = len(scene_labels)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return (
        torch.from_numpy(images),
        torch.from_numpy(panoptic),
        torch.from_numpy(np.concatenate(labels)),
        torch.from_numpy(offsets),
    )


def _mean_std(images: torch.Tensor, channel_dim: int = -3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of 0-1 scaled uint8 images (channels at ``channel_dim``), from exact integer sums."""
    x = images.movedim(channel_dim, 0).reshape(images.shape[channel_dim], -1)
    total = torch.zeros(x.shape[0], dtype=torch.int64)
    squares = torch.zeros(x.shape[0], dtype=torch.int64)
    for chunk in x.split(1 << 22, dim=1):
        c = chunk.to(torch.int64)
        total += c.sum(1)
        squares += (c * c).sum(1)
    count = x.shape[1]
    mean = [int(t) / count / 255 for t in total]
    std = [math.sqrt(max(int(q) / count / 255**2 - m * m, 0.0)) for q, m in zip(squares, mean, strict=True)]
    return tuple(mean), tuple(std)


def generate_fmnist_scenes(
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    *,
    canvas: int = 64,
    min_items: int = 1,
    max_items: int = 6,
    scale: tuple[float, float] = (0.3, 0.6),
    max_rotation: float = 30.0,
    background: str = "mixed",
    data_dir: str | Path | None = None,
    source: TensorImageDataset | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> FMNISTScenes:
    """Generate (or load from the cache) ``n`` FMNIST-Scenes of ``canvas`` x ``canvas`` pixels.

    Args:
        split: ``"train"`` scenes use train-split items, ``"test"`` scenes test-split items.
        canvas: side of the square scenes in pixels (32..256).
        min_items: fewest items drawn per scene (items hidden by others are dropped afterwards).
        max_items: most items drawn per scene (1..16).
        scale: range of an item's side as a share of the canvas side, drawn log-uniformly.
        max_rotation: items rotate by an angle drawn uniformly in +-max_rotation degrees.
        background: ``"plain"`` (one gray level), ``"textured"`` (low-frequency texture plus noise) or
            ``"mixed"`` (either, half and half).
        data_dir: where Fashion-MNIST lies (see :func:`vitlab.data.find_fashion_mnist`); unused with ``source``.
        source: items to paste instead of Fashion-MNIST's ``split`` (uint8 (N, 1, h, w) on black; for tests).
        cache: read and write the cache (``cache_dir``, else ``$VITLAB_CACHE/synthetic``, else
            ``~/.cache/vitlab/synthetic``), keyed by every parameter, the item source and
            :data:`GENERATOR_VERSION`.

    Raises:
        ValueError: an argument is out of range; the message names it and the range.
    """
    scale = (float(scale[0]), float(scale[1])) if len(scale) == 2 else tuple(scale)
    recipe = _Recipe(canvas, min_items, max_items, scale, max_rotation, background)
    _validate(split, n, seed, recipe)
    if source is not None and (source.in_chans != 1 or len(source) == 0):
        raise ValueError(f"source must hold gray (N, 1, h, w) items, got {len(source)} of {source.in_chans} channels")
    params = {
        "generator": "fmnist_scenes",
        "version": GENERATOR_VERSION,
        "split": split,
        "n": int(n),
        "seed": int(seed),
        **asdict(recipe),  # then JSON-plain values, in the same places
        **{k: int(getattr(recipe, k)) for k in ("canvas", "min_items", "max_items")},
        "scale": list(scale),
        "max_rotation": float(max_rotation),
    }

    def generate() -> FMNISTScenes:
        items = source if source is not None else load_fashion_mnist(data_dir, split=split)
        pool, pool_labels = items.images[:, 0].numpy(), items.targets.numpy()
        images, panoptic, labels, offsets = _generate(pool, pool_labels, split, n, seed, recipe)
        mean, std = _mean_std(images)
        return FMNISTScenes(
            images=images,
            panoptic=panoptic,
            labels=labels,
            offsets=offsets,
            thing_classes=list(items.classes),
            mean=mean,
            std=std,
            name=f"fmnist_scenes/{split}",
            params=params,
        )

    key = {**params, "source": _source_key(split, data_dir, source)} if cache else None
    return load_or_generate("fmnist_scenes", key, FMNISTScenes.load, generate, cache_dir)
