"""Quickstart recipe: accuracy and wall time of the README's first command, with a baseline.

Runs ``vitlab train`` exactly as a user does (the console script, so its allocator setting
applies), once per model with the same recipe, and writes ``benchmarks/results/quickstart.{csv,md}``.
The first model is the default; the others are baselines measured in the same run.

    .venv/bin/python benchmarks/quickstart.py                        # default vs plain ViT
    .venv/bin/python benchmarks/quickstart.py --models tiny_vit_1m_28
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitlab.bench import allocator_setting, describe_machine
from vitlab.cli import TUNED_MALLOC
from vitlab.engine import RunConfig

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_TOP1, TARGET_SECONDS = 91.0, 600.0


def run_one(model: str, out: Path, extra: list[str]) -> dict:
    vitlab = Path(sys.executable).parent / "vitlab"
    cmd = [str(vitlab), "train", "--model", model, "--out", str(out), "--name", model, *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / model / "summary.json").read_text())
    return dict(
        model=model,
        test_top1=summary["test_top1"],
        test_top5=summary["test_top5"],
        train_seconds=summary["train_seconds"],
        command_seconds=round(wall, 1),
        params_m=summary["params_m"],
        steps=summary["steps"],
        epochs=summary["epochs"],
        command="vitlab train " + " ".join(["--model", model, *extra]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[RunConfig().model.model, "vit_nano_patch4_28"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to vitlab train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_one(m, Path(tmp), args.extra) for m in args.models]
    base = rows[0]
    for r in rows:
        r["top1_minus_default"] = round(r["test_top1"] - base["test_top1"], 2)
        r["time_ratio_to_default"] = round(r["train_seconds"] / base["train_seconds"], 3)
        r["meets_target"] = r["test_top1"] >= TARGET_TOP1 and r["train_seconds"] <= TARGET_SECONDS
    machine = describe_machine()
    # the console script re-executes itself with the tuned allocator unless the user opted out
    child_env = dict(os.environ) if os.environ.get("VITLAB_NO_MALLOC_TUNING") else {**TUNED_MALLOC, **os.environ}
    machine["allocator"] = allocator_setting(child_env)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "quickstart.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*list(rows[0]), "machine", "allocator"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "machine": machine.get("cpu", ""), "allocator": machine.get("allocator", "")})
    lines = [
        "# Quickstart: Fashion-MNIST, default recipe",
        "",
        f"Target: >= {TARGET_TOP1}% test top-1 within {TARGET_SECONDS:.0f} s of training on a 2-core CPU.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, torch threads "
        f"{machine.get('torch_threads', '?')}; allocator: {machine.get('allocator', '?')}; "
        f"torch {machine.get('torch', '?')}, timm {machine.get('timm', '?')}, vitlab {machine.get('vitlab', '?')}.",
        f"Date: {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/quickstart.py`.",
        "",
        "| model | params (M) | epochs | test top-1 (%) | top-5 (%) | training (s) | whole command (s) "
        "| top-1 vs default | time vs default | meets target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['params_m']:.2f} | {r['epochs']:g} | {r['test_top1']:.2f} | {r['test_top5']:.2f} "
            f"| {r['train_seconds']:.0f} | {r['command_seconds']:.0f} | {r['top1_minus_default']:+.2f} "
            f"| {r['time_ratio_to_default']:.2f}x | {'yes' if r['meets_target'] else 'no'} |"
        )
    lines += [
        "",
        "Training time excludes the per-epoch test evaluations; the whole command includes start-up,",
        "data loading, evaluations and plots.",
    ]
    (RESULTS / "quickstart.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
