"""Synthetic data for tasks whose data our machines cannot download: generated, seeded, cached, previewed.

Generators (``GENERATORS``):

- ``fmnist_scenes``: Fashion-MNIST items pasted and occluding one another on a 64 px canvas, with boxes, class
  labels, instance masks, a semantic and a panoptic map per scene (:mod:`.fmnist_scenes`).
- ``fmnist_scenes_3d``: Fashion-MNIST items as billboards standing on a ground plane under a pinhole camera (96 px),
  with the 2-D targets plus depth maps, 7-DoF boxes, projected centres and intrinsics (:mod:`.fmnist_scenes_3d`,
  conventions in :mod:`.scenes3d`).

In Python, ``make_dataset("fmnist_scenes", split="train", n=1000, seed=0)`` returns the set (generated once, then
read from ``$VITLAB_CACHE/synthetic``, default ``~/.cache/vitlab/synthetic``). From the shell::

    vitlab data make fmnist_scenes --out DIR [--n 1000] [--split train] [--seed 0] [--canvas 64] [--max-items 6]
    vitlab data make fmnist_scenes_3d --out DIR [--canvas 96] [--max-items 4] ...

writes ``DIR/scenes.npz`` (read it back with ``SceneDataset.load``, or ``Scene3DDataset.load`` for a 3-D set),
``DIR/preview.png`` (16 scenes: plain and with semantic colours and boxes; for a 3-D set plain, with projected 3-D
boxes, and depth) and ``DIR/info.json`` (parameters, counts, class names); it calls :func:`make`.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ._cache import atomic_write, cache_root
from .fmnist_scenes import GENERATOR_VERSION, FMNISTScenes, generate_fmnist_scenes
from .fmnist_scenes_3d import FMNISTScenes3D, generate_fmnist_scenes_3d
from .preview import save_preview
from .scenes import SceneDataset, masks_to_boxes
from .scenes3d import Scene3DDataset, save_preview_3d

__all__ = [
    "GENERATORS",
    "GENERATOR_VERSION",
    "FMNISTScenes",
    "FMNISTScenes3D",
    "Scene3DDataset",
    "SceneDataset",
    "cache_root",
    "generate_fmnist_scenes",
    "generate_fmnist_scenes_3d",
    "make",
    "make_dataset",
    "masks_to_boxes",
    "save_preview",
    "save_preview_3d",
]

GENERATORS: dict[str, Callable[..., SceneDataset]] = {
    "fmnist_scenes": generate_fmnist_scenes,
    "fmnist_scenes_3d": generate_fmnist_scenes_3d,
}


def make_dataset(name: str, split: str = "train", n: int = 1000, seed: int = 0, **kwargs: Any) -> SceneDataset:
    """Build (or load from the cache) ``n`` scenes of generator ``name``; ``kwargs`` go to the generator.

    Raises:
        ValueError: ``name`` is unknown (the message lists the known ones) or an argument is out of range.
    """
    if name not in GENERATORS:
        raise ValueError(f"name={name!r} is not a synthetic data generator; expected one of {sorted(GENERATORS)}")
    return GENERATORS[name](split=split, n=n, seed=seed, **kwargs)


def make(
    name: str,
    out: str | Path,
    *,
    n: int = 1000,
    split: str = "train",
    seed: int = 0,
    canvas: int | None = None,
    max_items: int | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    preview: int = 16,
) -> Path:
    """Write a synthetic set into folder ``out``: ``scenes.npz``, ``preview.png`` and ``info.json``; return ``out``.

    This is ``vitlab data make NAME --out OUT``. The set comes from :func:`make_dataset` (so from the cache when it
    was made before); ``canvas`` and ``max_items`` left at None take the generator's defaults; ``preview`` is the
    number of scenes the picture shows.

    Raises:
        ValueError: an unknown generator or an argument out of range (checked before anything is written).
    """
    sizes = {k: v for k, v in (("canvas", canvas), ("max_items", max_items)) if v is not None}
    scenes = make_dataset(name, split=split, n=n, seed=seed, data_dir=data_dir, cache_dir=cache_dir, **sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "scenes.npz"
    if scenes.path is not None and scenes.path.is_file():
        cached = scenes.path

        def copy(f: IO[bytes]) -> None:
            with cached.open("rb") as src:
                shutil.copyfileobj(src, f)

        atomic_write(data_path, copy)
    else:
        scenes.save(data_path)
    preview_fn = save_preview_3d if isinstance(scenes, Scene3DDataset) else save_preview
    preview_fn(scenes, out / "preview.png", count=max(1, preview))
    counts = scenes.num_instances()
    per_class = scenes.labels.bincount(minlength=len(scenes.thing_classes)).tolist()
    info = {
        "generator": name,
        "params": scenes.params,
        "name": scenes.name,
        "num_scenes": len(scenes),
        "num_instances": len(scenes.labels),
        "instances_per_scene": {
            "min": int(counts.min()),
            "max": int(counts.max()),
            "mean": round(float(counts.float().mean()), 3),
        },
        "instances_per_class": dict(zip(scenes.thing_classes, per_class, strict=True)),
        "classes": scenes.classes,
        "thing_classes": scenes.thing_classes,
        "img_size": list(scenes.img_size),
        "in_chans": scenes.in_chans,
        "mean": list(scenes.mean),
        "std": list(scenes.std),
        "files": {"data": data_path.name, "preview": "preview.png"},
    }
    atomic_write(out / "info.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return out
