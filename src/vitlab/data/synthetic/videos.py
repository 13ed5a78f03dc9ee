"""Video clip data sets: uint8 clips (N, T, C, H, W) with a motion class, an appearance class and per-frame targets.

A clip is a dict ``{"image": uint8 (T, C, H, W), "motion": int64 (), "identity": int64 (), "camera": float32 (T, P),
"track": float32 (T, 2)}``; :meth:`VideoClipDataset.collate` stacks clips into (B, T, C, H, W) batches, which
:class:`vitlab.data.BatchLoader` normalises like image batches (its ``iter_batches``). ``reverse_of[c]`` is the class a
clip of class ``c`` becomes when played backwards (-1: none in the set); :meth:`VideoClipDataset.reverse` plays a
set backwards. Previews: :func:`save_clip_strip` (a PNG, clips as rows, frames as columns) and :func:`save_clip_gif`.
"""

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import subset_index
from ..errors import DataError
from ._cache import atomic_write

__all__ = ["VideoClipDataset", "save_clip_gif", "save_clip_strip"]

_FORMAT_VERSION = 1
_ARRAYS = ("clips", "motion", "identity", "camera", "track", "meta")


@dataclass(eq=False)
class VideoClipDataset:
    """Clips in memory: ``clips`` uint8 (N, T, C, H, W), ``motion`` and ``identity`` int64 (N,), ``camera`` float32
    (N, T, P) (columns ``camera_params``), ``track`` float32 (N, T, 2) (pixel x, y of the tracked item per frame)."""

    clips: torch.Tensor
    motion: torch.Tensor
    identity: torch.Tensor
    camera: torch.Tensor
    track: torch.Tensor
    motion_classes: list[str]
    identity_classes: list[str]
    reverse_of: list[int]
    camera_params: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the .npz this set was loaded from or saved to (make() copies it)

    def __post_init__(self) -> None:
        def check(ok: bool, what: str, t: Any) -> None:
            if not ok:
                got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
                raise DataError(f"clip set {self.name!r}: {what}, got {got}")

        clips = self.clips
        check(
            torch.is_tensor(clips) and clips.dtype == torch.uint8 and clips.ndim == 5,
            "clips must be uint8 (N, T, C, H, W)",
            clips,
        )
        N, T = clips.shape[:2]
        for key, dtype, shape in (
            ("motion", torch.int64, (N,)),
            ("identity", torch.int64, (N,)),
            ("camera", torch.float32, (N, T, len(self.camera_params))),
            ("track", torch.float32, (N, T, 2)),
        ):
            t = getattr(self, key)
            check(
                torch.is_tensor(t) and t.dtype == dtype and tuple(t.shape) == shape, f"{key} must be {dtype} {shape}", t
            )
        for key, classes in (("motion", self.motion_classes), ("identity", self.identity_classes)):
            t = getattr(self, key)
            if N and (int(t.min()) < 0 or int(t.max()) >= len(classes)):
                raise DataError(f"clip set {self.name!r}: {key} labels exceed its {len(classes)} classes")
        if len(self.reverse_of) != len(self.motion_classes) or any(
            not -1 <= r < len(self.motion_classes) for r in self.reverse_of
        ):
            raise DataError(f"clip set {self.name!r}: reverse_of must give a class index (or -1) per motion class")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise DataError(f"clip set {self.name!r}: mean/std need one value per channel ({self.in_chans})")

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def classes(self) -> list[str]:
        """The motion classes (the labels of ``motion``)."""
        return list(self.motion_classes)

    @property
    def in_chans(self) -> int:
        return self.clips.shape[2]

    @property
    def img_size(self) -> tuple[int, int]:
        return self.clips.shape[3], self.clips.shape[4]

    @property
    def num_frames(self) -> int:
        return self.clips.shape[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"clip index {i} is out of range for clip set {self.name!r} of {n} clips")
        return {
            "image": self.clips[i],
            "motion": self.motion[i],
            "identity": self.identity[i],
            "camera": self.camera[i],
            "track": self.track[i],
        }

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack clips: image (B, T, C, H, W), motion and identity (B,), camera (B, T, P), track (B, T, 2)."""
        if not items:
            raise ValueError("collate needs at least one clip; got an empty list")
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor, seed: int = 0) -> "VideoClipDataset":
        """``n`` clips drawn at random (fixed by ``seed``, kept in order), or the given indices."""
        index = subset_index(n_or_indices, len(self), seed, f"clip set {self.name!r}")
        arrays = {k: getattr(self, k)[index] for k in ("clips", "motion", "identity", "camera", "track")}
        return replace(self, **arrays, params=dict(self.params), path=None)

    def reverse(self) -> "VideoClipDataset":
        """The set played backwards: frames, camera and track reversed in time, motion labels by ``reverse_of``.

        Raises:
            ValueError: some clip's class has no reversed class in the set.
        """
        pair = torch.tensor(self.reverse_of, dtype=torch.int64)
        if bool((pair[self.motion] < 0).any()):
            missing = sorted({self.motion_classes[int(c)] for c in self.motion[pair[self.motion] < 0]})
            raise ValueError(f"clip set {self.name!r}: the reversal of {missing} is not among its motion classes")
        return replace(
            self,
            clips=self.clips.flip(1),
            motion=pair[self.motion],
            camera=self.camera.flip(1),
            track=self.track.flip(1),
            name=f"{self.name}/reversed",
            params={**self.params, "reversed": not self.params.get("reversed", False)},
            path=None,
        )

    def _meta(self, key: dict[str, Any] | None) -> dict[str, Any]:
        names = ("motion_classes", "identity_classes", "reverse_of", "camera_params", "mean", "std", "name", "params")
        return {"format_version": _FORMAT_VERSION, **{k: getattr(self, k) for k in names}, "key": key}

    def save(self, path: str | Path, key: dict[str, Any] | None = None) -> Path:
        """Write the set as one compressed ``.npz`` (atomically); ``key`` is stored to validate a cache entry."""
        arrays = {k: getattr(self, k).numpy() for k in _ARRAYS[:-1]}
        arrays["meta"] = np.frombuffer(json.dumps(self._meta(key)).encode(), dtype=np.uint8)
        self.path = atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return self.path

    @classmethod
    def load(cls, path: str | Path, key: dict[str, Any] | None = None) -> "VideoClipDataset":
        """Read a set written by :meth:`save`; with ``key``, the stored key must match it.

        Raises:
            DataError: the file is missing, unreadable, of another format, or (with ``key``) of other parameters.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _ARRAYS if k not in npz.files]
                if missing:
                    raise DataError(f"clip file {path} lacks arrays {missing}; expected {list(_ARRAYS)}")
                arrays = {k: npz[k] for k in _ARRAYS}
            meta = json.loads(arrays.pop("meta").tobytes().decode())
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read clip file {path}: {type(e).__name__}: {e}") from e
        if meta.get("format_version") != _FORMAT_VERSION:
            raise DataError(
                f"clip file {path} has format version {meta.get('format_version')}; expected {_FORMAT_VERSION}"
            )
        if key is not None and meta.get("key") != json.loads(json.dumps(key)):
            raise DataError(f"clip file {path} was generated with other parameters than asked for")
        fields = {
            k: meta[k] for k in ("motion_classes", "identity_classes", "reverse_of", "camera_params", "name", "params")
        }
        return cls(
            **{k: torch.from_numpy(v) for k, v in arrays.items()},
            **fields,
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            path=path,
        )


def _examples(clips: VideoClipDataset, count: int) -> list[int]:
    """The first clip of each motion class, then the next ones, up to ``count`` clips in class order."""
    firsts = [
        int(torch.nonzero(clips.motion == c)[0]) for c in range(len(clips.motion_classes)) if (clips.motion == c).any()
    ]
    rest = [i for i in range(len(clips)) if i not in firsts]
    return (firsts + rest)[: max(1, count)]


def save_clip_strip(clips: VideoClipDataset, path: str | Path, count: int = 11) -> Path:
    """Write a PNG frame strip: ``count`` clips (one per motion class first) as rows, frames as columns.

    A row is labelled with its motion and identity class; a red dot marks the tracked item's centre per frame.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _examples(clips, count)
    T, (H, W) = clips.num_frames, clips.img_size
    fig = Figure(figsize=(1.6 + 0.55 * T, 0.6 * len(rows) + 0.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), T, squeeze=False)
    for r, i in enumerate(rows):
        for t in range(T):
            ax = axes[r, t]
            ax.imshow(clips.clips[i, t].float().mean(0).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            x, y = clips.track[i, t].tolist()
            if 0 <= x < W and 0 <= y < H:  # imshow puts pixel j at [j - 0.5, j + 0.5]
                ax.plot([x - 0.5], [y - 0.5], "o", ms=1.5, color="red")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}", fontsize=6)
        label = f"{clips.motion_classes[int(clips.motion[i])]}\n{clips.identity_classes[int(clips.identity[i])]}"
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    height = fig.get_figheight()
    title = f"{clips.name}: {len(clips)} clips of {T} frames, {W}x{H} px (row: motion, centre item)"
    fig.suptitle(title, fontsize=8, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(left=1.4 / fig.get_figwidth(), right=0.99, top=1 - 0.5 / height, bottom=0.02)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_clip_gif(clips: VideoClipDataset, path: str | Path, count: int = 12, columns: int = 4, scale: int = 3) -> Path:
    """Write an animated GIF of ``count`` clips in a grid (one per motion class first), each labelled by motion."""
    from PIL import Image, ImageDraw

    index = _examples(clips, count)
    T, (H, W) = clips.num_frames, clips.img_size
    rows, cell_h, cell_w = -(-len(index) // columns), H * scale + 12, W * scale + 2
    pictures = []
    for t in range(T):
        canvas = Image.new("L", (columns * cell_w, rows * cell_h), 0)
        draw = ImageDraw.Draw(canvas)
        for k, i in enumerate(index):
            frame = clips.clips[i, t].float().mean(0).round().to(torch.uint8).numpy()
            tile = Image.fromarray(frame).resize((W * scale, H * scale), Image.Resampling.NEAREST)
            x, y = (k % columns) * cell_w, (k // columns) * cell_h
            canvas.paste(tile, (x, y + 11))
            draw.text((x + 1, y), clips.motion_classes[int(clips.motion[i])], fill=255)
        pictures.append(canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=150, loop=0)
    return path
