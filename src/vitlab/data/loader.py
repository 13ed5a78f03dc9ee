"""A deterministic, resumable batch iterator over vitlab datasets.

The order of epoch ``e`` and the augmentation of its batch ``b`` depend only on ``(seed, e)`` and
``(seed, e, b)``, never on what ran before. So ``iter_epoch(e, start_batch=b)`` yields exactly the batches a full
epoch yields from ``b`` on, which is what makes ``--resume`` exact.
"""

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .datasets import ImageFolderDataset, TensorImageDataset, _pair
from .errors import DataError
from .transforms import match_channels, match_channels_stats, normalize, random_crop_flip, resize_batch

__all__ = ["BatchLoader"]

_PRIME = 1_000_003
_MASK = (1 << 63) - 1


def _derive_seed(*parts: int) -> int:
    """Fold integers into one non-negative seed (stable across runs, unlike ``hash()``)."""
    seed = 0
    for p in parts:
        seed = (seed * _PRIME + p) & _MASK
    return seed


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(targets, dtype=torch.long)


class BatchLoader:
    """Yield ``(x float32 (B, in_chans, H, W), y int64 (B,))`` batches, reproducibly from ``seed`` and the epoch.

    Args:
        dataset: a :class:`TensorImageDataset` or :class:`ImageFolderDataset`.
        augment: apply :func:`random_crop_flip` (at the dataset's resolution, before resizing).
        img_size, in_chans: model input; default to the dataset's.
        mean, std: normalisation constants; default to the dataset's. Both are matched to ``in_chans``.
        num_workers: worker processes decoding an :class:`ImageFolderDataset` (ignored for in-memory data).
        device: where batches are made. On CUDA an in-memory dataset is copied to the GPU once (uint8), so
            indexing, augmentation and normalisation run there; decoded folder batches come in pinned memory.
            The batches are the same on every device (augmentation draws come from CPU generators).
    """

    def __init__(
        self,
        dataset: TensorImageDataset | ImageFolderDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        img_size: int | tuple[int, int] | None = None,
        in_chans: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if len(dataset) == 0:
            raise DataError(f"cannot batch an empty dataset ({getattr(dataset, 'name', '') or type(dataset).__name__})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.device = torch.device(device)
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # the in-memory set, copied once
        self.img_size = _pair(img_size if img_size is not None else dataset.img_size)
        self.in_chans = in_chans if in_chans is not None else dataset.in_chans
        self.mean, self.std = match_channels_stats(
            dataset.mean if mean is None else mean, dataset.std if std is None else std, self.in_chans
        )
        # fail here, not at the first batch, when the dataset's channels cannot be matched
        match_channels(torch.zeros(dataset.in_chans, 1, 1, dtype=torch.uint8), self.in_chans)

    def __len__(self) -> int:
        if hasattr(self.dataset, "group_batches"):  # batches of one task each (data.multitask)
            return self.dataset.num_batches(self.batch_size, self.drop_last)
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: a permutation seeded from ``(seed, epoch)``, or ``arange`` unshuffled."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(_derive_seed(self.seed, epoch)))

    def _batch_indices(self, epoch: int, start_batch: int) -> list[torch.Tensor]:
        order = self.epoch_order(epoch)
        B = self.batch_size
        if hasattr(self.dataset, "group_batches"):
            return self.dataset.group_batches(order, B, self.drop_last)[start_batch:]
        return [order[b * B : (b + 1) * B] for b in range(start_batch, len(self))]

    def _fetch(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield uint8 images and int64 targets for each index batch, in order."""
        dataset = self.dataset
        if isinstance(dataset, TensorImageDataset):
            if self.device.type == "cuda" and self._on_device is None:
                self._on_device = (dataset.images.to(self.device), dataset.targets.to(self.device))
            images, targets = self._on_device or (dataset.images, dataset.targets)
            for idx in batches:
                idx = idx.to(images.device)
                yield images[idx], targets[idx]
        elif self.num_workers > 0:
            # one DataLoader per epoch: workers start once, and batch_sampler keeps our order
            loader = DataLoader(
                dataset,
                batch_sampler=[idx.tolist() for idx in batches],
                num_workers=self.num_workers,
                collate_fn=getattr(dataset, "collate", _collate),
                pin_memory=self.device.type == "cuda",  # non-blocking copies to the GPU
            )
            yield from loader
        else:
            collate = getattr(dataset, "collate", _collate)  # dict datasets collate their own targets
            for idx in batches:
                yield collate([dataset[i] for i in idx.tolist()])

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of ``epoch`` from batch ``start_batch`` on (the same batches a full epoch yields)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is out of range for an epoch of {len(self)} batches")
        batches = self._batch_indices(epoch, start_batch)
        for b, (images, targets) in enumerate(self._fetch(batches), start=start_batch):
            if self.augment:
                generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, b, 1))
                images = random_crop_flip(images, generator)
            x = normalize(match_channels(images, self.in_chans), self.mean, self.std)
            yield resize_batch(x, self.img_size), targets

    def iter_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        """Dict batches of ``epoch`` from ``start_batch`` on: ``image`` normalised float (B, C, H, W) plus the
        targets, ``label`` for classification data or whatever a dict dataset's ``collate`` gives (masks, boxes).

        A dict dataset's ``augment(batch, generator)`` moves its targets with the image.
        """
        if not hasattr(self.dataset, "collate"):
            for x, y in self.iter_epoch(epoch, start_batch):
                yield {"image": x, "label": y}
            return
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is out of range for an epoch of {len(self)} batches")
        if tuple(self.img_size) != tuple(self.dataset.img_size):
            raise DataError(
                f"data set {getattr(self.dataset, 'name', '')!r} is {tuple(self.dataset.img_size)} px but the model "
                f"takes {tuple(self.img_size)}; dense targets are not resized: generate the data at the model's size"
            )
        batches = self._batch_indices(epoch, start_batch)
        for b, batch in enumerate(self._fetch(batches), start=start_batch):
            if self.augment and hasattr(self.dataset, "augment"):
                batch = self.dataset.augment(batch, torch.Generator().manual_seed(_derive_seed(self.seed, epoch, b, 1)))
            batch["image"] = normalize(match_channels(batch["image"], self.in_chans), self.mean, self.std)
            yield batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(0)
