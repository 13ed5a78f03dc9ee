"""Fast paths: faster implementations of readable forwards, behind one dispatch and one switch.

Each module or function that has one keeps a single readable forward whose first line asks
``fast_forward(self, *inputs)``; that walks the ``FastPath`` entries registered for the class (or function)
in order and runs the first whose ``applies`` holds, else returns None and the readable code runs. The
entries live beside this file: ``onednn.py`` (fused oneDNN convs and matmuls for S2AFormer, PPMA and
``ConvFfn``), ``scan.py`` (MSVMamba's scan as the compiled op ``vitlab::scan_d1`` and as chunked eager
steps), ``mamba.py`` (mamba_ssm's CUDA scan, checked against the PyTorch one on first use); importing
``vitlab.layers`` registers them. Anchors: transformers' ``ALL_ATTENTION_FUNCTIONS``, timm's ``use_fused_attn()``.

The switch: ``set_fast_paths(False)``, the context manager ``fast_paths(False)``, or ``VITLAB_FAST_PATHS=0``
in the environment (read at import; ``VITLAB_NO_CPU_KERNELS=1`` is its deprecated alias) turn every entry off.
Tests compare every entry with the readable forward (``tests/layers/test_fast_paths.py``); what each one
gains is measured in ``benchmarks/results/`` (``zoo.md``, ``scaling.md``), not claimed here.

Entries name the class they serve by its import path, so ``layers/`` registers paths for model classes
without importing ``models/``; only that exact class dispatches (a subclass may change the forward).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from ..tracing import is_fx_tracing

__all__ = [
    "FAST_PATHS",
    "FastPath",
    "fast_forward",
    "fast_paths",
    "fast_paths_enabled",
    "fast_paths_taken",
    "plain_cpu_inference",
    "register_fast_path",
    "set_fast_paths",
]


@dataclass(eq=False)
class FastPath:
    """One fast implementation of a readable forward.

    Args:
        name: the registry key, e.g. ``"s2aformer_block"``.
        serves: import path of the class (or function) whose forward it replaces, e.g.
            ``"vitlab.models.s2aformer.HybridPerceptionBlock"``.
        applies: ``applies(owner, *inputs) -> bool``: may it run here (mode, dtype, device, tracing, build)?
        run: ``run(owner, *inputs)``: the readable forward's result, computed faster.
        summary: one line on what it does differently.
    """

    name: str
    serves: str
    applies: Callable[..., bool]
    run: Callable[..., Any]
    summary: str = ""


FAST_PATHS: dict[str, FastPath] = {}
_BY_TARGET: dict[str, list[FastPath]] = {}  # serves -> entries in registration order (the priority)
_TAKEN: list[Counter[str]] = []  # open fast_paths_taken() records


def _env_enabled() -> bool:
    if os.environ.get("VITLAB_NO_CPU_KERNELS"):
        warnings.warn(
            "VITLAB_NO_CPU_KERNELS is deprecated and will be removed in 0.3: use VITLAB_FAST_PATHS=0, which turns "
            "off every fast path",
            FutureWarning,
            stacklevel=2,
        )
        return False
    return os.environ.get("VITLAB_FAST_PATHS", "1").strip().lower() not in ("0", "false", "no", "off")


_enabled = _env_enabled()


def register_fast_path(path: FastPath) -> FastPath:
    """Add ``path`` to ``FAST_PATHS``; entries serving one class are tried in registration order."""
    if path.name in FAST_PATHS:
        raise ValueError(f"a fast path named {path.name!r} is already registered")
    FAST_PATHS[path.name] = path
    _BY_TARGET.setdefault(path.serves, []).append(path)
    return path


def set_fast_paths(enabled: bool) -> None:
    """Turn every fast path on or off (the readable forwards run when off)."""
    global _enabled
    _enabled = bool(enabled)


def fast_paths_enabled() -> bool:
    """Whether fast paths may run (``set_fast_paths``, ``fast_paths``, ``VITLAB_FAST_PATHS``)."""
    return _enabled


@contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Within the block, fast paths are on (or off); the previous setting comes back after it."""
    before = _enabled
    set_fast_paths(enabled)
    try:
        yield
    finally:
        set_fast_paths(before)


@contextmanager
def fast_paths_taken() -> Iterator[Counter[str]]:
    """Count, by name, the fast paths that run within the block: ``with fast_paths_taken() as taken: model(x)``."""
    taken: Counter[str] = Counter()
    _TAKEN.append(taken)
    try:
        yield taken
    finally:
        _TAKEN.remove(taken)


def _target(owner: Any) -> str:
    """The import path entries name ``owner`` by: a function's own, a module's class's."""
    kind = owner if inspect.isfunction(owner) else type(owner)
    return f"{kind.__module__}.{kind.__qualname__}"


def fast_forward(owner: Any, *inputs: Any) -> Any:
    """The first applicable fast path's result for ``owner(*inputs)``, or None (run the readable forward).

    ``owner`` is the module (its exact class selects the entries) or, for a plain function, the function.
    """
    if not _enabled or is_fx_tracing():  # FX proxies cannot answer the entries' questions: the readable code
        return None
    for path in _BY_TARGET.get(_target(owner), ()):
        if path.applies(owner, *inputs):
            for taken in _TAKEN:
                taken[path.name] += 1
            return path.run(owner, *inputs)
    return None


def plain_cpu_inference(*tensors: torch.Tensor) -> bool:
    """Whether eager CPU float32 inference runs on ``tensors``, so that kernels unknown to autograd, autocast,
    functorch (vmap), tracers, compilers and dispatch modes (FLOP counter, fake tensors) may replace the plain ops;
    a dispatch mode that declares ``watches_only`` (the memory meter: it runs every op as it is) is no obstacle."""
    return (
        not torch.is_grad_enabled()
        and all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not _autocast_cpu()
        and not torch._C._are_functorch_transforms_active()
        and all(getattr(mode, "watches_only", False) for mode in _get_current_dispatch_mode_stack())
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _autocast_cpu() -> bool:
    """Whether CPU autocast is on (ops then run in a lower precision than their float32 inputs)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch < 2.4 spells it differently
        return torch.is_autocast_cpu_enabled()
