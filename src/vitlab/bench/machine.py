"""What a benchmark ran on: CPU/GPU, threads, library versions, and the memory allocator setting.

The allocator is recorded because on CPU it changes ViT throughput by up to 2x (DESIGN.md,
"Speed on CPU"): glibc's defaults page-fault on every large temporary of a batch forward.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from ._checks import check_device, check_positive_int

__all__ = ["allocator_setting", "describe_machine", "matmul_peak_gflops"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bytes(text: str) -> str:
    try:
        value = int(text)
    except ValueError:
        return text
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} B"


def allocator_setting(environ: Mapping[str, str] | None = None) -> str:
    """A short description of the process's malloc: "jemalloc", "tcmalloc", "glibc tuned (...)" or "glibc default".

    Reads ``LD_PRELOAD`` and glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` from
    ``environ`` (default: this process's environment, which is what was in place at its start).
    """
    env = os.environ if environ is None else environ
    preload = env.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc"):
        if name in preload:
            return name
    tuned = [
        f"{label} {_bytes(env[key])}"
        for label, key in (("mmap", "MALLOC_MMAP_THRESHOLD_"), ("trim", "MALLOC_TRIM_THRESHOLD_"))
        if env.get(key)
    ]
    return f"glibc tuned ({', '.join(tuned)})" if tuned else "glibc default"


def describe_machine() -> dict[str, Any]:
    """The machine and software a benchmark runs on, as a flat dict of short values."""
    import timm

    import vitlab

    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count() or 1
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "cuda": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vitlab": vitlab.__version__,
    }


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """Median GFLOP/s of a float32 ``n x n x n`` matmul: the practical peak to compare models with.

    On our 2-core CPU machines a 2048 matmul reaches about 370 GFLOP/s (DESIGN.md).
    """
    check_positive_int("n", n)
    check_positive_int("repeats", repeats)
    dev = check_device(device)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    seconds = []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9
