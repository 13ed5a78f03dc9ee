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

Video generators (``VIDEO_GENERATORS``, kept apart from the scene sets of ``GENERATORS``):

- ``camera_motion_videos``: clips (T, 1, H, W) of a canvas of Fashion-MNIST items filmed by a camera that pans, zooms,
  rolls or tilts (or stays still) while items may drift; labels: the motion class (``static`` plus five time-reversed
  pairs, which a frame-averaging model cannot tell apart), the centre item's class, per-frame camera parameters and
  the centre item's track (:mod:`.camera_motion`; the set is a :class:`VideoClipDataset`, :mod:`.videos`).
  ``make_dataset("camera_motion_videos", n=1000, frames=8, size=32)``, or::

    vitlab data make camera_motion_videos --out DIR [--n 1000] [--frames 8] [--size 32] [--canvas 96] [--max-items N]

  writes ``DIR/clips.npz`` (``VideoClipDataset.load``), ``DIR/preview.png`` (a frame strip: one clip per motion
  class as a row, frames as columns), ``DIR/preview.gif`` and ``DIR/info.json``. Clips batch through
  :class:`vitlab.data.BatchLoader` ``iter_batches`` as normalised float (B, T, C, H, W).

Multi-view generators (``MULTIVIEW_GENERATORS``):

- ``render3d``: textured boxes on a textured ground inside four walls, ray-cast into V calibrated views (varied focal
  length, optional roll and lens distortion): RGB, z-depth, pointmaps (world and camera frame), normals, rays and
  object ids per view, with ``K`` and ``cam_to_world`` (:mod:`.render3d`, :mod:`.render3d_sets`; the camera
  convention is :mod:`vitlab.layers.camera`'s). ``make_dataset("render3d", n=1000, views=2, size=64)``, or::

    vitlab data make render3d --out DIR [--n 1000] [--views 2] [--size 64] [--max-items 4]

  writes ``DIR/render3d.npz`` (``Render3DDataset.load``), ``DIR/preview.png`` (rows RGB / depth / normals) and
  ``DIR/info.json``.
- ``stick_humans``: 1..N stick-figure humans (15-joint kinematic tree, capsule limbs) in a room, seen by V calibrated
  views (FoV 40-90 deg): RGB, depth, person ids, 2-D/3-D joints, visibility, person-centre heatmaps, cameras
  (:mod:`.humans`, :mod:`.humans_sets`). ``vitlab data make stick_humans --out DIR [--n] [--views 1] [--size 64]
  [--max-items 3]`` (``--max-items``: most people) writes ``DIR/stick_humans.npz`` (``HumansDataset.load``),
  ``DIR/preview.png`` (skeletons over the views) and ``DIR/info.json``.
- ``driving``: ego views of a small driving world (road, lane lines, obstacle boxes, a red/green light) from a
  left/front/right camera rig, with depth, semantic classes, measurements and a scripted expert's waypoints
  (:mod:`.driving`, :mod:`.driving_sets`; closed-loop roll-outs in :func:`.driving.rollout`). ``vitlab data make
  driving --out DIR [--n] [--views 3] [--size 32] [--max-items 3]`` (``--max-items``: most obstacles) writes
  ``DIR/driving.npz``, ``DIR/preview.png`` and ``DIR/info.json``.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ._cache import atomic_write, cache_root
from .camera_motion import MOTION_PAIRS, MOTIONS, generate_camera_motion_videos
from .camera_paths import generate_camera_paths
from .driving_sets import DrivingDataset, generate_driving, make_driving
from .fmnist_scenes import GENERATOR_VERSION, FMNISTScenes, generate_fmnist_scenes
from .fmnist_scenes_3d import FMNISTScenes3D, generate_fmnist_scenes_3d
from .humans_sets import HumansDataset, generate_stick_humans, make_stick_humans
from .preview import save_preview
from .render3d_sets import Render3DDataset, generate_render3d, make_render3d
from .scenes import SceneDataset, masks_to_boxes
from .scenes3d import Scene3DDataset, save_preview_3d
from .videos import VideoClipDataset, save_clip_gif, save_clip_strip

__all__ = [
    "GENERATORS",
    "GENERATOR_VERSION",
    "MOTIONS",
    "MOTION_PAIRS",
    "MULTIVIEW_GENERATORS",
    "VIDEO_GENERATORS",
    "DrivingDataset",
    "FMNISTScenes",
    "FMNISTScenes3D",
    "HumansDataset",
    "Render3DDataset",
    "Scene3DDataset",
    "SceneDataset",
    "VideoClipDataset",
    "cache_root",
    "generate_camera_motion_videos",
    "generate_driving",
    "generate_fmnist_scenes",
    "generate_fmnist_scenes_3d",
    "generate_render3d",
    "generate_stick_humans",
    "make",
    "make_dataset",
    "masks_to_boxes",
    "save_clip_gif",
    "save_clip_strip",
    "save_preview",
    "save_preview_3d",
]

GENERATORS: dict[str, Callable[..., SceneDataset]] = {
    "fmnist_scenes": generate_fmnist_scenes,
    "fmnist_scenes_3d": generate_fmnist_scenes_3d,
}
# clip sets: not in GENERATORS, whose users (engine.setup) build image scenes with canvas = the model's image size
VIDEO_GENERATORS: dict[str, Callable[..., VideoClipDataset]] = {
    "camera_motion_videos": generate_camera_motion_videos,
    "camera_paths": generate_camera_paths,  # expert camera paths, 2-channel clips (view, proximity map)
}

# multi-view sets of calibrated views (dicts with `views` (V, 3, H, W), depth, pointmaps, cameras; .render3d_sets)
MULTIVIEW_GENERATORS: dict[str, Callable[..., Any]] = {
    "render3d": generate_render3d,
    "driving": generate_driving,  # ego views of a driving world with an expert plan (.driving_sets)
    "stick_humans": generate_stick_humans,  # stick-figure humans (.humans_sets)
}


def make_dataset(
    name: str, split: str = "train", n: int = 1000, seed: int = 0, **kwargs: Any
) -> SceneDataset | VideoClipDataset | Render3DDataset | HumansDataset:
    """Build (or load from the cache) ``n`` scenes (or clips) of generator ``name``; ``kwargs`` go to the generator.

    Raises:
        ValueError: ``name`` is unknown (the message lists the known ones) or an argument is out of range.
    """
    generators = {**GENERATORS, **VIDEO_GENERATORS, **MULTIVIEW_GENERATORS}
    if name not in generators:
        raise ValueError(f"name={name!r} is not a synthetic data generator; expected one of {sorted(generators)}")
    return generators[name](split=split, n=n, seed=seed, **kwargs)


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
    frames: int | None = None,
    size: int | None = None,
    views: int | None = None,
) -> Path:
    """Write a synthetic set into folder ``out``: ``scenes.npz``, ``preview.png`` and ``info.json``; return ``out``.

    This is ``vitlab data make NAME --out OUT``. The set comes from :func:`make_dataset` (so from the cache when it
    was made before); ``canvas`` and ``max_items`` left at None take the generator's defaults; ``preview`` is the
    number of scenes the picture shows. A video generator (``frames``, ``size``: its clip length and frame side)
    writes ``clips.npz``, ``preview.png``, ``preview.gif`` and ``info.json`` instead (:func:`_make_videos`).

    Raises:
        ValueError: an unknown generator or an argument out of range (checked before anything is written).
    """
    if name in MULTIVIEW_GENERATORS:  # render3d: --size, --views, --max-items (boxes); writes render3d.npz
        if canvas is not None or frames is not None:
            raise ValueError(f"canvas and frames do not apply to {name!r}; it takes size, views and max_items")
        given = {"size": size, "views": views, "max_boxes": max_items, "data_dir": data_dir, "cache_dir": cache_dir}
        kw = {k: v for k, v in given.items() if v is not None}
        if name == "driving":  # --max-items: most obstacles per world (0-3); writes driving.npz
            kw["max_obstacles"] = kw.pop("max_boxes", 3)
            return make_driving(out, preview=max(1, min(preview, 4)), split=split, n=n, seed=seed, **kw)
        if name == "stick_humans":  # --max-items: most people per scene; writes stick_humans.npz
            kw["max_people"] = kw.pop("max_boxes", 3)
            return make_stick_humans(out, preview=max(1, min(preview, 4)), split=split, n=n, seed=seed, **kw)
        return make_render3d(out, preview=max(1, min(preview, 4)), split=split, n=n, seed=seed, **kw)
    if views is not None:
        raise ValueError(f"views applies to the multi-view generators {sorted(MULTIVIEW_GENERATORS)}, not {name!r}")
    sizes = {k: v for k, v in (("canvas", canvas), ("max_items", max_items)) if v is not None}
    video = {k: v for k, v in (("frames", frames), ("size", size)) if v is not None}
    if name in VIDEO_GENERATORS:
        clips = make_dataset(
            name, split=split, n=n, seed=seed, data_dir=data_dir, cache_dir=cache_dir, **sizes, **video
        )
        return _make_videos(name, clips, Path(out), preview)
    if video:
        raise ValueError(
            f"{' and '.join(video)} apply to the video generators {sorted(VIDEO_GENERATORS)}, not {name!r}"
        )
    scenes = make_dataset(name, split=split, n=n, seed=seed, data_dir=data_dir, cache_dir=cache_dir, **sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "scenes.npz"
    _copy_or_save(scenes, data_path)
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


def _copy_or_save(data: SceneDataset | VideoClipDataset, path: Path) -> None:
    """Copy the set's cached ``.npz`` to ``path`` (no second compression), or save it there."""
    if data.path is not None and data.path.is_file():
        cached = data.path

        def copy(f: IO[bytes]) -> None:
            with cached.open("rb") as src:
                shutil.copyfileobj(src, f)

        atomic_write(path, copy)
    else:
        data.save(path)


def _make_videos(name: str, clips: VideoClipDataset, out: Path, preview: int) -> Path:
    """:func:`make` for clip sets: ``clips.npz``, ``preview.png`` (frame strip), ``preview.gif``, ``info.json``."""
    out.mkdir(parents=True, exist_ok=True)
    _copy_or_save(clips, out / "clips.npz")
    rows = max(1, min(preview, len(clips.motion_classes)))  # one clip per motion class
    save_clip_strip(clips, out / "preview.png", count=rows)
    save_clip_gif(clips, out / "preview.gif", count=rows)
    per_motion = clips.motion.bincount(minlength=len(clips.motion_classes)).tolist()
    per_identity = clips.identity.bincount(minlength=len(clips.identity_classes)).tolist()
    info = {
        "generator": name,
        "params": clips.params,
        "name": clips.name,
        "num_clips": len(clips),
        "num_frames": clips.num_frames,
        "clips_per_motion": dict(zip(clips.motion_classes, per_motion, strict=True)),
        "clips_per_identity": dict(zip(clips.identity_classes, per_identity, strict=True)),
        "classes": clips.classes,
        "identity_classes": clips.identity_classes,
        "reverse_of": {
            c: clips.motion_classes[r] if r >= 0 else None
            for c, r in zip(clips.motion_classes, clips.reverse_of, strict=True)
        },
        "camera_params": clips.camera_params,
        "img_size": list(clips.img_size),
        "in_chans": clips.in_chans,
        "mean": list(clips.mean),
        "std": list(clips.std),
        "files": {"data": "clips.npz", "preview": "preview.png", "animation": "preview.gif"},
    }
    atomic_write(out / "info.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return out
