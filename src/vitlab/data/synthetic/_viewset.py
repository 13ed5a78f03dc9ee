"""What the cached multi-view sets (render3d, stick_humans, driving) share: shape checks, collation, subsets and the
``.npz`` round trip. A set is a dataclass of stacked tensors (``views`` uint8 ``(N, V, 3, H, W)`` first) plus
``mean``, ``std``, ``name``, ``params`` and ``path``; it names its stored fields in ``ARRAYS``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..datasets import subset_index
from ..errors import DataError
from ._cache import load_npz_set, save_npz_set

__all__ = ["ViewSet"]


class ViewSet:
    """Mixin of the multi-view set dataclasses. ``KIND`` names the set in messages and files, ``ARRAYS`` its stored
    tensors, ``FORMAT_VERSION`` its file format, ``EXTRA_META`` further scalar fields saved with the metadata."""

    KIND: ClassVar[str] = ""
    ARRAYS: ClassVar[tuple[str, ...]] = ()
    FORMAT_VERSION: ClassVar[int] = 1
    EXTRA_META: ClassVar[tuple[str, ...]] = ()

    views: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    params: dict[str, Any]
    path: Path | None

    def check_arrays(self, specs: Callable[[int, int, int, int], Sequence[tuple[str, torch.dtype, tuple]]]) -> None:
        """Raise ``DataError`` unless ``views`` is uint8 ``(N, V, 3, H, W)`` and each ``(field, dtype, shape)`` of
        ``specs(N, V, H, W)`` holds; ``mean`` and ``std`` become tuples of floats."""
        v = self.views
        if not (torch.is_tensor(v) and v.dtype == torch.uint8 and v.ndim == 5 and v.shape[2] == 3):
            got = getattr(v, "shape", v)
            raise DataError(f"{self.KIND} set {self.name!r}: views must be uint8 (N, V, 3, H, W), got {got}")
        N, V, _, H, W = v.shape
        for key, dtype, shape in specs(N, V, H, W):
            t = getattr(self, key)
            if not (torch.is_tensor(t) and t.dtype == dtype and tuple(t.shape) == tuple(shape)):
                got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
                raise DataError(f"{self.KIND} set {self.name!r}: {key} must be {dtype} {tuple(shape)}, got {got}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

    def __len__(self) -> int:
        return len(self.views)

    def check_index(self, i: int) -> None:
        if not -len(self) <= i < len(self):
            raise IndexError(
                f"sample index {i} is out of range for {self.KIND} set {self.name!r} of {len(self)} samples"
            )

    @property
    def num_views(self) -> int:
        return self.views.shape[1]

    @property
    def img_size(self) -> tuple[int, int]:
        return self.views.shape[3], self.views.shape[4]

    @property
    def in_chans(self) -> int:
        return 3

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack samples: every field gains a leading batch dim, e.g. ``views`` (B, V, 3, H, W)."""
        if not items:
            raise ValueError("collate needs at least one sample; got an empty list")
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor, seed: int = 0) -> Any:
        """``n`` samples drawn at random (fixed by ``seed``, kept in order), or the given indices."""
        index = subset_index(n_or_indices, len(self), seed, f"{self.KIND} set {self.name!r}")
        arrays = {k: getattr(self, k)[index] for k in self.ARRAYS}
        return replace(self, **arrays, params=dict(self.params), path=None)  # type: ignore[type-var]

    def save(self, path: str | Path, key: dict[str, Any] | None = None) -> Path:
        """Write the set as one compressed ``.npz`` (atomically); ``key`` is stored to validate a cache entry."""
        meta = {"mean": self.mean, "std": self.std, "name": self.name, "params": self.params, "key": key}
        meta |= {k: getattr(self, k) for k in self.EXTRA_META}
        self.path = save_npz_set(path, {k: getattr(self, k) for k in self.ARRAYS}, meta, self.FORMAT_VERSION)
        return self.path

    @classmethod
    def load(cls, path: str | Path, key: dict[str, Any] | None = None) -> Any:
        """Read a set written by :meth:`save`; with ``key``, the stored key must match it (else ``DataError``)."""
        arrays, meta = load_npz_set(path, cls.ARRAYS, cls.KIND, cls.FORMAT_VERSION, key)
        kw = {"mean": tuple(meta["mean"]), "std": tuple(meta["std"]), "name": meta["name"], "params": meta["params"]}
        return cls(**arrays, **kw, **{k: meta[k] for k in cls.EXTRA_META}, path=Path(path))  # type: ignore[call-arg]
