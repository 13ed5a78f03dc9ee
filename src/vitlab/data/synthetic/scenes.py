"""Scene data sets: images with instance, semantic and panoptic targets, stored compactly as panoptic maps.

A scene stores its image, one panoptic map (0 background, 1..M its instances) and the instances' class
labels; masks, boxes and the semantic map are derived from those on access, so they always agree. Boxes
are xyxy in pixels and cover whole pixels: a mask spanning columns ``a..b`` has ``x1 = a``, ``x2 = b + 1``
(the convention under which a horizontal flip maps ``x`` to ``W - x`` exactly).
"""

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..datasets import subset_index
from ..errors import DataError
from ._cache import atomic_write

__all__ = ["SceneDataset", "masks_to_boxes"]

_FORMAT_VERSION = 1
_ARRAYS = ("images", "panoptic", "labels", "offsets", "meta")


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (M, 4) float32, xyxy in pixels with exclusive ends, of bool masks (M, H, W); empty masks give zeros."""
    _, H, W = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (M, H), (M, W)
    # argmax finds the first True; on the flipped axis it finds the last one
    x1 = cols.to(torch.uint8).argmax(dim=1)
    x2 = W - cols.flip(1).to(torch.uint8).argmax(dim=1)
    y1 = rows.to(torch.uint8).argmax(dim=1)
    y2 = H - rows.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return boxes * cols.any(dim=1, keepdim=True)


@dataclass(eq=False)
class SceneDataset:
    """Scenes in memory: ``images`` uint8 (N, C, H, W), ``panoptic`` uint8 (N, H, W), ``labels`` int64 (T,).

    Scene ``i`` owns the instances ``labels[offsets[i]:offsets[i + 1]]``; instance ``j`` (0-based) of the scene is
    the pixels where ``panoptic[i] == j + 1``. ``labels`` index ``thing_classes``; the semantic classes are
    ``["background", *thing_classes]``, so the semantic id of an instance pixel is its label + 1.
    """

    images: torch.Tensor
    panoptic: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    thing_classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # the .npz this set was loaded from or saved to, if any (make() copies it rather than compressing again)
    path: Path | None = None

    FIXED_KEYS: ClassVar[tuple[str, ...]] = ("image", "semantic", "panoptic")
    LIST_KEYS: ClassVar[tuple[str, ...]] = ("boxes", "labels", "masks")
    # a subclass's own tensor fields, indexed by scene (first dim N) or by instance (first dim T): subset, save and
    # load carry them, so a subclass adds targets without restating those methods
    SCENE_ARRAYS: ClassVar[tuple[str, ...]] = ()
    INSTANCE_ARRAYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        def bad(what: str, t: Any) -> str:
            got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            return f"scene set {self.name!r}: {what}, got {got}"

        images, panoptic, labels, offsets = self.images, self.panoptic, self.labels, self.offsets
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(bad("images must be a uint8 tensor (N, C, H, W)", images))
        N, _, H, W = images.shape
        if not torch.is_tensor(panoptic) or panoptic.dtype != torch.uint8 or panoptic.shape != (N, H, W):
            raise DataError(bad(f"panoptic must be a uint8 tensor {(N, H, W)}", panoptic))
        if not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.ndim != 1:
            raise DataError(bad("labels must be an int64 tensor (T,)", labels))
        if not torch.is_tensor(offsets) or offsets.dtype != torch.int64 or offsets.shape != (N + 1,):
            raise DataError(bad(f"offsets must be an int64 tensor ({N + 1},)", offsets))
        counts = offsets.diff()
        if int(offsets[0]) != 0 or int(offsets[-1]) != len(labels) or bool((counts < 0).any()):
            raise DataError(
                f"scene set {self.name!r}: offsets must rise from 0 to the number of labels ({len(labels)})"
            )
        if N and bool((panoptic.flatten(1).amax(dim=1).long() > counts).any()):
            raise DataError(f"scene set {self.name!r}: a panoptic map holds an id above its scene's instance count")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.thing_classes)):
            raise DataError(
                f"scene set {self.name!r}: labels span {int(labels.min())}..{int(labels.max())}; "
                f"expected 0..{len(self.thing_classes) - 1} for {len(self.thing_classes)} thing classes"
            )
        self.thing_classes = list(self.thing_classes)
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise DataError(
                f"scene set {self.name!r}: mean/std have {len(self.mean)}/{len(self.std)} values for "
                f"{self.in_chans} channel images; expected one per channel"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def classes(self) -> list[str]:
        """The semantic classes: ``"background"`` then the thing classes."""
        return ["background", *self.thing_classes]

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]

    def num_instances(self) -> torch.Tensor:
        """Instances per scene, int64 (N,)."""
        return self.offsets.diff()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Scene ``i`` as a dict of tensors.

        Keys: image uint8 (C, H, W), semantic and panoptic int64 (H, W), boxes float32 (M, 4), labels int64 (M,),
        masks bool (M, H, W).
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"scene index {i} is out of range for scene set {self.name!r} of {n} scenes")
        i %= n
        labels = self.labels[int(self.offsets[i]) : int(self.offsets[i + 1])].clone()
        panoptic = self.panoptic[i].long()
        masks = panoptic == torch.arange(1, len(labels) + 1).view(-1, 1, 1)  # (M, H, W)
        semantic = torch.cat([labels.new_zeros(1), labels + 1])[panoptic]
        return {
            "image": self.images[i],
            "semantic": semantic,
            "panoptic": panoptic,
            "boxes": masks_to_boxes(masks),
            "labels": labels,
            "masks": masks,
        }

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch scenes: image (B, C, H, W), semantic and panoptic (B, H, W) stacked; boxes, labels, masks as lists."""
        if not items:
            raise ValueError("collate needs at least one scene; got an empty list")
        batch: dict[str, Any] = {k: torch.stack([item[k] for item in items]) for k in self.FIXED_KEYS}
        batch.update({k: [item[k] for item in items] for k in self.LIST_KEYS})
        return batch

    def augment(self, batch: dict[str, Any], generator: torch.Generator, p: float = 0.5) -> dict[str, Any]:
        """Flip each scene of a collated batch horizontally with probability ``p``, targets with the image.

        The decisions come from ``generator`` only; :meth:`hflip` applies them.
        """
        return self.hflip(batch, torch.rand(len(batch["image"]), generator=generator) < p)

    def hflip(self, batch: dict[str, Any], flip: torch.Tensor) -> dict[str, Any]:
        """Flip the scenes of a collated batch where ``flip`` (B,) bool is true, targets with the image.

        The flips are torchvision ``transforms.v2`` functional ops on ``tv_tensors`` (Image, Mask, BoundingBoxes),
        so boxes move as boxes. Returns a new dict of plain tensors; keys it does not know pass through unchanged.
        """
        # imported here: transforms.v2 is heavy and only augmentation needs it
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        image = batch["image"]
        out = dict(batch)
        if not bool(flip.any()):
            return out

        H, W = image.shape[-2:]

        def flipped(x: torch.Tensor, wrap: type) -> torch.Tensor:
            if wrap is tv_tensors.BoundingBoxes:
                x = tv_tensors.BoundingBoxes(x, format="XYXY", canvas_size=(H, W))
            else:
                x = wrap(x)
            return TF.horizontal_flip(x).as_subclass(torch.Tensor)

        out["image"] = image.clone()
        out["image"][flip] = flipped(image[flip], tv_tensors.Image)
        for key in ("semantic", "panoptic"):
            if key in batch:
                out[key] = batch[key].clone()
                out[key][flip] = flipped(batch[key][flip], tv_tensors.Mask)
        decisions = flip.tolist()
        for key, wrap in (("masks", tv_tensors.Mask), ("boxes", tv_tensors.BoundingBoxes)):
            if key in batch:
                out[key] = [flipped(x, wrap) if f else x for x, f in zip(batch[key], decisions, strict=True)]
        return out

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor, seed: int = 0) -> "SceneDataset":
        """Return ``n`` scenes drawn at random (fixed by ``seed``, kept in dataset order), or the given indices."""
        index = subset_index(n_or_indices, len(self), seed, f"scene set {self.name!r}")
        counts = self.offsets.diff()[index]
        starts = self.offsets[:-1][index]
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # label rows of the chosen scenes: each scene's start, plus 0..count-1 within it
        within = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(counts)
        rows = starts.repeat_interleave(counts) + within
        return replace(
            self,
            images=self.images[index],
            panoptic=self.panoptic[index],
            labels=self.labels[rows],
            offsets=offsets,
            params=dict(self.params),
            path=None,
            **{k: getattr(self, k)[index] for k in self.SCENE_ARRAYS},
            **{k: getattr(self, k)[rows] for k in self.INSTANCE_ARRAYS},
        )

    def save(self, path: str | Path, key: dict[str, Any] | None = None) -> Path:
        """Write the set as one compressed ``.npz`` (atomically); ``key`` is stored to validate a cache entry."""
        meta = {
            "format_version": _FORMAT_VERSION,
            "name": self.name,
            "thing_classes": self.thing_classes,
            "mean": self.mean,
            "std": self.std,
            "params": self.params,
            "key": key,
        }
        arrays = {
            "images": self.images.numpy(),
            "panoptic": self.panoptic.numpy(),
            "labels": self.labels.numpy().astype(np.int16),
            "offsets": self.offsets.numpy(),
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            **{k: getattr(self, k).numpy() for k in (*self.SCENE_ARRAYS, *self.INSTANCE_ARRAYS)},
        }
        self.path = atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return self.path

    @classmethod
    def load(cls, path: str | Path, key: dict[str, Any] | None = None) -> "SceneDataset":
        """Read a set written by :meth:`save`; with ``key``, the stored key must match it.

        A subclass also reads its own arrays; a file with more arrays than ``cls`` knows (a 3-D set read as a
        plain :class:`SceneDataset`) loads without them.

        Raises:
            DataError: the file is missing, unreadable, of another format, or (with ``key``) of other parameters.
        """
        path = Path(path)
        names = (*_ARRAYS, *cls.SCENE_ARRAYS, *cls.INSTANCE_ARRAYS)
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in names if k not in npz.files]
                if missing:
                    raise DataError(f"scene file {path} lacks arrays {missing}; expected {list(names)}")
                arrays = {k: npz[k] for k in names}
            meta = json.loads(arrays["meta"].tobytes().decode())
        # a truncated or foreign file fails in zipfile, in numpy's header parser or in the JSON decoder
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read scene file {path}: {type(e).__name__}: {e}") from e
        if meta.get("format_version") != _FORMAT_VERSION:
            raise DataError(
                f"scene file {path} has format version {meta.get('format_version')}; expected {_FORMAT_VERSION}"
            )
        if key is not None and meta.get("key") != json.loads(json.dumps(key)):
            raise DataError(f"scene file {path} was generated with other parameters than asked for")
        return cls(
            images=torch.from_numpy(arrays["images"]),
            panoptic=torch.from_numpy(arrays["panoptic"]),
            labels=torch.from_numpy(arrays["labels"].astype(np.int64)),
            offsets=torch.from_numpy(arrays["offsets"].astype(np.int64)),
            thing_classes=meta["thing_classes"],
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            name=meta.get("name", ""),
            params=meta.get("params") or {},
            path=path,
            **{k: torch.from_numpy(arrays[k]) for k in (*cls.SCENE_ARRAYS, *cls.INSTANCE_ARRAYS)},
        )
