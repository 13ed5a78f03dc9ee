"""Datasets: in-memory uint8 tensors, class-per-folder images, and a learnable synthetic set.

Every dataset yields ``(uint8 image (C, H, W), int label)`` and carries ``classes``, ``mean`` and ``std``, so
:class:`vitlab.data.BatchLoader` can batch, augment and normalise any of them the same way.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ChannelMismatchError, DataError, DatasetNotFoundError, ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "TensorImageDataset", "load_image", "make_synthetic"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _check_in_chans(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ChannelMismatchError(f"in_chans={in_chans} is not supported for images; expected 1 (gray) or 3 (RGB)")


@dataclass
class TensorImageDataset:
    """Images held in memory: ``images`` uint8 (N, C, H, W), ``targets`` int64 (N,)."""

    images: torch.Tensor
    targets: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            got = f"{self.images.dtype} {tuple(self.images.shape)}" if torch.is_tensor(self.images) else "non-tensor"
            raise DataError(f"dataset {self.name!r}: images must be a uint8 tensor (N, C, H, W), got {got}")
        if not isinstance(self.targets, torch.Tensor) or self.targets.dtype != torch.int64 or self.targets.ndim != 1:
            got = f"{self.targets.dtype} {tuple(self.targets.shape)}" if torch.is_tensor(self.targets) else "non-tensor"
            raise DataError(f"dataset {self.name!r}: targets must be an int64 tensor (N,), got {got}")
        if len(self.images) != len(self.targets):
            raise DataError(f"dataset {self.name!r}: {len(self.images)} images but {len(self.targets)} targets")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ChannelMismatchError(
                f"dataset {self.name!r}: mean/std have {len(self.mean)}/{len(self.std)} values for "
                f"{self.in_chans} channel images; expected one per channel"
            )
        if len(self.targets) and (int(self.targets.min()) < 0 or int(self.targets.max()) >= len(self.classes)):
            raise DataError(
                f"dataset {self.name!r}: targets span {int(self.targets.min())}..{int(self.targets.max())}; "
                f"expected 0..{len(self.classes) - 1} for {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor, seed: int = 0) -> "TensorImageDataset":
        """Return ``n`` items drawn at random (fixed by ``seed``, kept in dataset order), or the given indices."""
        index = subset_index(n_or_indices, len(self), seed, f"dataset {self.name!r}")
        return replace(self, images=self.images[index], targets=self.targets[index], classes=list(self.classes))


def subset_index(n_or_indices: int | Sequence[int] | torch.Tensor, size: int, seed: int, what: str) -> torch.Tensor:
    """Indices of a subset of ``size`` items: ``n`` drawn at random (fixed by ``seed``, in order), or those given
    (negative ones count from the end). ``what`` names the data set in errors."""
    if isinstance(n_or_indices, (int, np.integer)):
        n = int(n_or_indices)
        if not 0 <= n <= size:
            raise ValueError(f"subset size {n} is out of range for {what} of {size} items")
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    index = torch.as_tensor(np.asarray(n_or_indices, dtype=np.int64).reshape(-1))
    if len(index) and (int(index.min()) < -size or int(index.max()) >= size):
        raise IndexError(f"subset indices out of range for {what} of {size} items")
    return index % max(size, 1)


def make_synthetic(
    n: int = 512, num_classes: int = 10, img_size: int | tuple[int, int] = 28, in_chans: int = 1, seed: int = 0
) -> TensorImageDataset:
    """A deterministic, learnable toy set.

    Each class has its own stripe orientation, blob position and brightness; samples add contrast jitter and noise.
    """
    H, W = _pair(img_size)
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, H).view(H, 1)
    xs = torch.linspace(-1, 1, W).view(1, W)
    k = torch.arange(num_classes, dtype=torch.float32).view(-1, 1, 1)
    theta = math.pi * k / num_classes
    stripes = 0.5 + 0.5 * torch.cos(3 * math.pi * (xs * torch.cos(theta) + ys * torch.sin(theta)))
    phi = 2 * math.pi * k / num_classes
    blob = torch.exp(-((xs - 0.5 * torch.cos(phi)) ** 2 + (ys - 0.5 * torch.sin(phi)) ** 2) / (2 * 0.25**2))
    # a class-specific brightness gives a global cue that even a randomly initialised ViT picks up in a few steps
    patterns = 0.7 * (0.4 * stripes + 0.6 * blob) + 0.3 * k / num_classes  # (num_classes, H, W) in [0, 1]

    targets = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    contrast = 0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    noise = 0.15 * torch.randn(n, in_chans, H, W, generator=g)
    x = (patterns[targets].unsqueeze(1) * contrast + noise).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8)
    scaled = images.float() / 255
    return TensorImageDataset(
        images=images,
        targets=targets,
        classes=[f"class_{i}" for i in range(num_classes)],
        mean=tuple(scaled.mean(dim=(0, 2, 3)).tolist()),
        std=tuple(scaled.std(dim=(0, 2, 3)).tolist()),
        name=f"synthetic/{seed}",
    )


def load_image(path: str | Path, in_chans: int, img_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Read one image file as uint8 (C, H, W): ``L`` for 1 channel, ``RGB`` for 3, bilinear resize if asked."""
    _check_in_chans(in_chans)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if in_chans == 1 else "RGB")
            if img_size is not None:
                H, W = _pair(img_size)
                if im.size != (W, H):
                    im = im.resize((W, H), Image.Resampling.BILINEAR)
            array = np.array(im, dtype=np.uint8)
    # PIL reports bad files as OSError (incl. UnidentifiedImageError), ValueError or SyntaxError by format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}; expected a readable image") from e
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolderDataset:
    """Images in ``root/<class>/<image>`` (classes sorted by name, images found recursively in each class)."""

    def __init__(
        self,
        root: str | Path,
        img_size: int | tuple[int, int],
        in_chans: int = 3,
        classes: list[str] | None = None,
    ) -> None:
        _check_in_chans(in_chans)
        self.root = Path(root)
        self.img_size = _pair(img_size)
        self.in_chans = in_chans
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)
        layout = "expected root/<class_name>/<image> with one subfolder per class"
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist; {layout}")
        if classes is None:
            classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not classes:
                raise DataError(f"image folder {self.root} has no class subfolders; {layout}")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        for target, name in enumerate(self.classes):
            class_dir = self.root / name
            if not class_dir.is_dir():
                raise DataError(f"image folder {self.root} has no subfolder for class {name!r}; {layout}")
            files = [
                Path(dirpath) / f
                for dirpath, _, filenames in os.walk(class_dir, followlinks=True)
                for f in filenames
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
            self.samples.extend((p, target) for p in sorted(files))
        if not self.samples:
            raise DataError(
                f"image folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                f"subfolders {self.classes}; {layout}"
            )
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return load_image(path, self.in_chans, self.img_size), target

    def to_tensor_dataset(self) -> TensorImageDataset:
        """Decode every image into memory (for small folders)."""
        images = torch.stack([self[i][0] for i in range(len(self))])
        return TensorImageDataset(
            images=images,
            targets=torch.tensor(self.targets, dtype=torch.long),
            classes=list(self.classes),
            mean=self.mean,
            std=self.std,
            name=str(self.root),
        )
