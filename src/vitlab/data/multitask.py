"""Heterogeneous multi-task data: several labelled sets as one, each item labelled for its own task only, and
batches that hold one task each (the modular MoE ViT's training, arXiv:2306.17165).

``fmnist_multitask`` (``vitlab train --task modular_moe --dataset fmnist_multitask``) joins, at one canvas size:

- ``fashion``: Fashion-MNIST classification (10 classes), items resized to the canvas;
- ``scenes``: FMNIST-Scenes semantic segmentation (background + 10 classes; ``data.synthetic``);
- ``count``: how many items an FMNIST-Scenes scene holds (0..6, as 7 classes), on scenes of another seed;
- ``largest`` (not in the default set; the held-out task for adaptation): the class of a scene's largest item.

Item ``i``: ``{"image": uint8 (C, H, W), task: target}``, the target int64 ``()`` for classification or
``(H, W)`` (255 = ignore) for segmentation. ``group_batches`` cuts each task's part of an epoch's order into
batches and interleaves them in the order's sequence, so every batch holds one task and the tasks mix in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .datasets import subset_index
from .errors import DataError
from .fashion_mnist import load_fashion_mnist

__all__ = ["MULTITASK_TASKS", "MultiTaskDataset", "TaskPart", "make_fmnist_multitask"]

# name -> the model-side spec ("name:kind:classes") of the tasks make_fmnist_multitask can build
MULTITASK_TASKS = {
    "fashion": "fashion:classify:10",
    "scenes": "scenes:segment:11",
    "count": "count:classify:7",
    "largest": "largest:classify:10",
}


@dataclass
class TaskPart:
    """One task's items: uint8 ``images`` (N, C, H, W) and int64 ``targets`` (N,) or (N, H, W)."""

    name: str
    spec: str
    images: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"task {self.name!r}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")  # fmt: skip
        if len(self.targets) != len(self.images) or self.targets.dtype != torch.int64:
            raise DataError(f"task {self.name!r}: targets must be int64 with one per image ({len(self.images)}), "
                            f"got {self.targets.dtype} {tuple(self.targets.shape)}")  # fmt: skip


class MultiTaskDataset:
    """Task parts of equal image size as one set; batches hold one task (``group_batches``)."""

    def __init__(self, parts: Sequence[TaskPart], mean: Sequence[float], std: Sequence[float], name: str = "") -> None:
        if not parts:
            raise DataError("a multi-task data set needs at least one task part")
        shapes = {tuple(p.images.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise DataError(f"task parts must share one image shape (C, H, W), got {sorted(shapes)}")
        if len({p.name for p in parts}) != len(parts):
            raise DataError(f"task names must be unique, got {[p.name for p in parts]}")
        self.parts, self.name = list(parts), name
        self.mean, self.std = tuple(mean), tuple(std)
        sizes = torch.tensor([len(p.images) for p in parts])
        self.offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])

    @property
    def tasks(self) -> list[str]:
        """The parts' task specs, ``"name:kind:classes"`` (what ``ModularMoE(tasks=...)`` takes)."""
        return [p.spec for p in self.parts]

    @property
    def classes(self) -> list[str]:
        """What a run records as its classes: the task specs (each names its own classes' count)."""
        return self.tasks

    @property
    def in_chans(self) -> int:
        return self.parts[0].images.shape[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.parts[0].images.shape[2:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def task_of(self, index: torch.Tensor) -> torch.Tensor:
        """The part (task position) of each global index."""
        return torch.bucketize(index, self.offsets[1:], right=True)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} is out of range for {self.name!r} of {len(self)} items")
        t = int(self.task_of(torch.tensor(i)))
        part, j = self.parts[t], i - int(self.offsets[t])
        return {"image": part.images[j], part.name: part.targets[j]}

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("collate needs at least one item")
        keys = set(items[0])
        if any(set(item) != keys for item in items):
            raise ValueError(f"a batch must hold one task; got items keyed {sorted({tuple(sorted(i)) for i in items})}")
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def group_batches(self, order: torch.Tensor, batch_size: int, drop_last: bool = False) -> list[torch.Tensor]:
        """Cut ``order`` into batches of one task each, in the order where each batch's first item appears."""
        task = self.task_of(order)
        batches, starts = [], []
        for t in range(len(self.parts)):
            pos = (task == t).nonzero().flatten()
            for b in range(0, len(pos), batch_size):
                chunk = pos[b : b + batch_size]
                if drop_last and len(chunk) < batch_size:
                    continue
                batches.append(order[chunk])
                starts.append(int(chunk[0]))
        return [batches[i] for i in sorted(range(len(batches)), key=starts.__getitem__)]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        sizes = (self.offsets[1:] - self.offsets[:-1]).tolist()
        return sum(n // batch_size if drop_last else -(-n // batch_size) for n in sizes)


def _resize(images: torch.Tensor, canvas: int) -> torch.Tensor:
    if images.shape[-1] == canvas:
        return images
    x = F.interpolate(images.float(), size=(canvas, canvas), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def _scene_part(name: str, split: str, n: int, seed: int, canvas: int, data_dir: Any) -> TaskPart:
    from .synthetic import make_dataset

    scenes = make_dataset("fmnist_scenes", split=split, n=n, seed=seed, canvas=canvas, data_dir=data_dir)
    counts = scenes.num_instances().long()
    if name == "scenes":
        targets = torch.stack([scenes[i]["semantic"] for i in range(len(scenes))])
    elif name == "count":
        targets = counts
    else:  # largest: the class of the item with the most visible pixels
        targets = torch.empty(len(scenes), dtype=torch.long)
        for i in range(len(scenes)):
            item = scenes[i]
            targets[i] = item["labels"][item["masks"].sum((1, 2)).argmax()] if len(item["labels"]) else 0
    return TaskPart(name, MULTITASK_TASKS[name], scenes.images, targets)


def make_fmnist_multitask(
    split: str = "train",
    n: int = 3000,
    seed: int = 0,
    canvas: int = 32,
    tasks: Sequence[str] = ("fashion", "scenes", "count"),
    data_dir: str | Path | None = None,
) -> MultiTaskDataset:
    """``n`` items per task of ``tasks`` (names of ``MULTITASK_TASKS``) at ``canvas`` px, from ``split``.

    Scene-based tasks use scenes of different seeds, so no image carries two tasks' labels.
    """
    unknown = [t for t in tasks if t not in MULTITASK_TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must name some of {sorted(MULTITASK_TASKS)}, got {list(tasks)}")
    parts = []
    for t in tasks:
        if t == "fashion":
            fm = load_fashion_mnist(data_dir, split=split)
            fm = fm.subset(subset_index(min(n, len(fm)), len(fm), seed, "Fashion-MNIST"))
            parts.append(TaskPart(t, MULTITASK_TASKS[t], _resize(fm.images, canvas), fm.targets))
        else:
            offset = {"scenes": 0, "count": 1, "largest": 2}[t]
            parts.append(_scene_part(t, split, n, seed * 10 + offset, canvas, data_dir))
    pixels = torch.cat([p.images.flatten() for p in parts]).float() / 255
    return MultiTaskDataset(parts, [float(pixels.mean())], [float(pixels.std())], name=f"fmnist_multitask/{split}")
