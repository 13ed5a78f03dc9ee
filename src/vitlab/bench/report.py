"""``run_bench``: what ``vitlab bench`` calls: measure, print the markdown table, write CSV + markdown."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from .machine import describe_machine, matmul_peak_gflops
from .runner import BenchRow, bench_models
from .tables import format_markdown, write_tables

__all__ = ["run_bench"]


def run_bench(
    models: list[str],
    img_size: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    amp: bool = False,
    compile: bool = False,
    channels_last: bool = False,
    baseline: str | None = None,
    out: str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    min_seconds: float = 2.0,
    build: Callable[[str], nn.Module] | None = None,
) -> list[BenchRow]:
    """Benchmark ``models``, print the markdown table, and write ``<out>.csv`` / ``<out>.md`` if ``out`` is given.

    ``out`` is a path prefix; an existing folder means ``<out>/bench``. Progress goes to stderr.
    See :func:`bench_models` for the other arguments.
    """
    rows = bench_models(
        models,
        img_size,
        batch_size,
        device,
        amp,
        compile,
        channels_last,
        baseline,
        warmup=warmup,
        repeats=repeats,
        min_seconds=min_seconds,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        build=build,
    )
    machine = describe_machine()
    machine["matmul_peak_gflops"] = matmul_peak_gflops(device=device)
    print(format_markdown(rows, machine["matmul_peak_gflops"]))
    if out is not None:
        prefix = Path(out) / "bench" if Path(out).is_dir() else Path(out)
        for path in write_tables(rows, prefix, machine):
            print(f"wrote {path}", file=sys.stderr)
    return rows
