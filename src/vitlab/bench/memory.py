"""Peak memory of a forward on any device, CPU included: the most tensor bytes alive at once.

CUDA has ``max_memory_allocated``; the CPU allocator keeps no such statistic and RSS depends on the
allocator setting (the tuned glibc never returns freed pages). So a dispatch mode watches every tensor
an operator creates, counts its storage once while any tensor on it is alive, and records the maximum.
Tensors that existed before (inputs, weights) are not counted: the figure is what the forward adds.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes", "peak_forward_bytes"]


class LiveTensorBytes(TorchDispatchMode):
    """Within the mode, ``live`` is the bytes of storages created inside it that are still referenced."""

    watches_only = True  # runs every op as it is: fast paths (layers/fast/) may run under it

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage address -> tracked tensors alive on it
        self._sizes: dict[int, int] = {}
        self._external: set[int] = set()

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._sizes.pop(key)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._external or storage.nbytes() == 0:
            return
        if key not in self._refs:
            self._refs[key], self._sizes[key] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for a in tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                key = a.untyped_storage().data_ptr()
                if key not in self._refs:
                    self._external.add(key)  # made before the mode: weights, inputs, their views
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_forward_bytes(fn: Callable[[], Any]) -> int:
    """Most bytes of tensors alive at once while ``fn()`` runs, beyond those that existed before it."""
    with torch.no_grad(), LiveTensorBytes() as mode:
        out = fn()
        del out
    return mode.peak
