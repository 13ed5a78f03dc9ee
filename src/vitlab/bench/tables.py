"""Result tables: CSV for tools, markdown for people, both stamped with the machine and the command."""

from __future__ import annotations

import csv
import datetime
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .runner import BenchRow

__all__ = ["CSV_COLUMNS", "MACHINE_COLUMNS", "format_markdown", "write_tables"]

# machine facts repeated on every CSV row, so that tables from different machines can be concatenated
MACHINE_COLUMNS = ("date", "cpu", "cuda", "torch_threads", "allocator", "torch", "timm", "vitlab")
CSV_COLUMNS = tuple(f.name for f in fields(BenchRow)) + MACHINE_COLUMNS


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def format_markdown(rows: list[BenchRow], peak_gflops: float | None = None) -> str:
    """The rows as a markdown table; with ``peak_gflops`` also each model's share of the matmul peak."""
    head = ["model", "input", "batch", "device", "flags", "params (M)", "GMACs", "img/s", "img/s min-max"]
    head += ["latency (ms)", "peak mem (MB)"]
    head += ["% matmul peak"] if peak_gflops else []
    head += ["timm img/s", "ratio", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [f"`{r.model}`", f"{r.in_chans}x{r.img_size}x{r.img_size}", str(r.batch_size), r.device, r.flags]
        cells += [_num(r.params_m, 2), _num(r.gmacs, 2), _num(r.img_per_s)]
        cells.append(f"{_num(r.img_per_s_min)}-{_num(r.img_per_s_max)}")
        cells += [_num(r.latency_ms), _num(r.peak_mem_mb, 0)]
        if peak_gflops:
            cells.append(_num(100 * r.gflops * r.img_per_s / peak_gflops, 0))
        missing = "n/a" if r.baseline else ""
        cells += [_num(r.baseline_img_per_s) or missing, _num(r.ratio, 2) or missing, r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(machine: dict[str, Any], date: str, command: str) -> str:
    device = machine.get("cuda") or f"{machine.get('cpu')} ({machine.get('cores')} cores)"
    lines = [
        "# vitlab bench",
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        f"- device: {device}; torch threads: {machine.get('torch_threads')}",
        f"- allocator: {machine.get('allocator')}",
        f"- software: python {machine.get('python')}, torch {machine.get('torch')}, timm {machine.get('timm')}, "
        f"vitlab {machine.get('vitlab')}",
    ]
    if machine.get("matmul_peak_gflops"):
        lines.append(f"- matmul peak: {machine['matmul_peak_gflops']:.0f} GFLOP/s (float32 2048^3)")
    lines += [
        "- img/s: median over repeats after warm-up at a fixed batch; GMACs = paper 'FLOPs' (torch FLOPs / 2); "
        "ratio = ours / timm's implementation, timed interleaved in the same run.",
        "",
    ]
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def write_tables(
    rows: list[BenchRow], path_prefix: str | Path, machine: dict[str, Any], command: str | None = None
) -> tuple[Path, Path]:
    """Write ``<prefix>.csv`` and ``<prefix>.md``; returns their paths.

    Args:
        rows: results of :func:`vitlab.bench.bench_models`.
        path_prefix: path without suffix; parent folders are created.
        machine: :func:`vitlab.bench.describe_machine` (optionally with ``matmul_peak_gflops``).
        command: the command line to record (default: this process's ``sys.argv``).
    """
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if command is None:
        prog = Path(sys.argv[0]).name
        # the console script re-executes as `python -m vitlab`, whose argv[0] is vitlab/__main__.py
        prog = "vitlab" if prog == "__main__.py" else prog
        command = shlex.join([prog, *sys.argv[1:]])
    csv_path, md_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".md")
    stamp = {"date": date, **{k: machine.get(k) for k in MACHINE_COLUMNS if k != "date"}}
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in {**asdict(row), **stamp}.items()})
    table = format_markdown(rows, machine.get("matmul_peak_gflops"))
    md_path.write_text(_header(machine, date, command) + table, encoding="utf-8")
    return csv_path, md_path
