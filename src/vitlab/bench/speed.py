"""Throughput, latency and peak memory of one model, measured by the rules of STYLE.md B.11.

Warm up first, synchronise CUDA around every timed region, fix the batch size, take the
median of repeats (min and max are kept to show the spread), and record the flags.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._checks import check_device, check_input_size, check_positive_int
from .memory import peak_forward_bytes

__all__ = [
    "Timing",
    "amp_dtype",
    "measure_latency",
    "measure_throughput",
    "peak_memory_mb",
    "prepare_forward",
    "time_interleaved",
]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed forward of one batch (warm-up calls excluded)."""

    batch_size: int
    seconds: tuple[float, ...]
    warmup: int
    compiled: bool = False

    @property
    def img_per_s(self) -> float:
        """Median images per second."""
        return self.batch_size / statistics.median(self.seconds)

    @property
    def img_per_s_min(self) -> float:
        """Images per second of the slowest repeat."""
        return self.batch_size / max(self.seconds)

    @property
    def img_per_s_max(self) -> float:
        """Images per second of the fastest repeat."""
        return self.batch_size / min(self.seconds)

    @property
    def latency_ms(self) -> float:
        """Median milliseconds per forward of the whole batch."""
        return 1e3 * statistics.median(self.seconds)

    @property
    def latency_ms_min(self) -> float:
        """Milliseconds of the fastest repeat."""
        return 1e3 * min(self.seconds)

    @property
    def latency_ms_max(self) -> float:
        """Milliseconds of the slowest repeat."""
        return 1e3 * max(self.seconds)


def amp_dtype(device: str | torch.device) -> torch.dtype:
    """The autocast dtype used for ``amp=True``: bfloat16 on CPU and on GPUs that have it, else float16."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_forward(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
) -> tuple[Callable[[], float], bool]:
    """Move ``model`` (in place) to ``device`` in eval mode and return a timed-forward callable.

    Returns:
        ``(step, compiled)``: ``step()`` runs one inference forward of a random batch and returns
        its wall-clock seconds (CUDA synchronised before and after); ``compiled`` is False when
        ``compile=True`` was asked but ``torch.compile`` failed and eager mode is used instead.
    """
    input_size = check_input_size(input_size)
    check_positive_int("batch_size", batch_size)
    dev = check_device(device)
    model = model.to(dev).eval()
    x = torch.randn(batch_size, *input_size, device=dev)
    if channels_last and x.ndim != 4:
        raise ValueError(f"channels_last applies to image batches (B, C, H, W), not input of shape {tuple(x.shape)}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def make_step(fn: nn.Module | Callable[..., torch.Tensor]) -> Callable[[], float]:
        def step() -> float:
            autocast = torch.autocast(dev.type, dtype=amp_dtype(dev)) if amp else contextlib.nullcontext()
            _sync(dev)
            start = time.perf_counter()
            with torch.inference_mode(), autocast:
                fn(x)
            _sync(dev)
            return time.perf_counter() - start

        return step

    if not compile:
        return make_step(model), False
    try:
        step = make_step(torch.compile(model))
        step()  # compilation happens on the first call; failing here is what we fall back from
        return step, True
    except Exception as err:  # torch.compile raises many error types (backend, dynamo, inductor)
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); timing eager mode instead", stacklevel=2)
        return make_step(model), False


def time_interleaved(
    steps: Sequence[Callable[[], float]], warmup: int = 2, repeats: int = 5, min_seconds: float = 0.0
) -> list[tuple[float, ...]]:
    """Time several prepared steps in alternation so that drift (heat, other jobs) hits all alike.

    Each step runs ``warmup`` untimed calls, then rounds of one call per step repeat until there are
    ``repeats`` rounds and ``min_seconds`` of wall-clock time have passed.
    """
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    check_positive_int("repeats", repeats)
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    start = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - start < min_seconds:
        for i, step in enumerate(steps):
            times[i].append(step())
    return [tuple(t) for t in times]


def measure_throughput(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    min_seconds: float = 0.0,
) -> Timing:
    """Inference throughput of ``model`` at a fixed batch size (``Timing.img_per_s`` is the median).

    The defaults take about ``7 x`` one batch-32 forward: a few seconds for ViT-S on 2 CPU cores.
    Raise ``repeats`` or ``min_seconds`` for tighter numbers on fast devices.
    """
    step, compiled = prepare_forward(model, input_size, batch_size, device, amp, channels_last, compile)
    (seconds,) = time_interleaved([step], warmup, repeats, min_seconds)
    return Timing(batch_size, seconds, warmup, compiled)


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, ...],
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 10,
    min_seconds: float = 0.0,
) -> Timing:
    """Batch-1 inference latency of ``model`` (``Timing.latency_ms`` is the median)."""
    return measure_throughput(model, input_size, 1, device, amp, channels_last, compile, warmup, repeats, min_seconds)


def peak_memory_mb(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    channels_last: bool = False,
) -> float | None:
    """Peak memory (MiB) of one inference forward, weights and input included.

    CUDA: ``max_memory_allocated``. CPU: weights + input + the most bytes of tensors the forward holds at
    once (``bench.memory``), which does not depend on the allocator.
    """
    dev = check_device(device)
    step, _ = prepare_forward(model, input_size, batch_size, dev, amp, channels_last)
    if dev.type != "cuda":
        held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        held += batch_size * math.prod(input_size) * 4
        return (held + peak_forward_bytes(step)) / 2**20
    step()
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    return torch.cuda.max_memory_allocated(dev) / 2**20
