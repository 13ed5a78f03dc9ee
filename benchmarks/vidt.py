"""ViDT's ablation on FMNIST-Scenes detection: YOLOS-style full attention vs RAM vs RAM + encoder-free neck.

Three detectors on the same Swin ("Swin-nano/2": Swin-T's depths 2/2/6/2 and heads at embed 24, windows of 4, so
the 16 x 16 token grid of a 64 px scene splits into whole windows), the same 16 [DET] tokens, head width, data,
schedule and seeds, each trained through the ``vitlab`` console script as a user would
(``vitlab train --task vidt --task-args ...``), mirroring the official README's ablation:

1. YOLOS-style: [PATCH, DET] attend globally in every block, MLP heads on the [DET] tokens (no neck);
2. RAM: window attention for the patches, [DET] self-attention, [DET] x [PATCH, DET] in the last stage, no neck;
3. RAM + neck: the encoder-free deformable decoder (box refinement, auxiliary losses) on top of 2.

Reports COCO AP and AP50 (mean ± half the range over the seeds), parameters, GFLOPs of one forward (counted by
``torch.utils.flop_counter`` at 64 px and, to show how RAM and global attention scale, at 256 px; the deformable
sampling's ``grid_sample`` is not counted) and training time. Writes ``benchmarks/results/vidt.{csv,md}``; the
YOLOS-style row is the baseline of the differences.

    .venv/bin/python benchmarks/vidt.py            # 6 runs of 630 steps: about 25 minutes on 2 quiet cores
    .venv/bin/python benchmarks/vidt.py --epochs 1 --train-scenes 64 --test-scenes 32 --seeds 0   # a smoke run
    .venv/bin/python benchmarks/vidt.py --seeds 2 --merge-seeds 0 1 --threads 1   # add seed 2 to the table's 0, 1

``--merge-seeds`` reads the per-seed AP/AP50 of the committed table (as printed there, two decimals) and adds the new
seeds' to them; the training-time columns keep the earlier seeds' (the new seeds may run beside other jobs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitlab.bench import count_flops, describe_machine
from vitlab.tasks import create_task_model

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "swin_tiny_patch4_window7_224"
SWIN_NANO_HALF = {"embed_dim": 24, "window_size": 4}
COMMON = {"num_det_tokens": 16, "dim": 128, "ffn_dim": 512}  # FMNIST-Scenes holds at most 6 items
ROWS = {
    "YOLOS-style full attention": {"attention": "full", "neck": False},
    "RAM, no neck": {"neck": False},
    "RAM + encoder-free neck": {},
}


def gflops(task_args: dict, img_size: int) -> float:
    model = create_task_model("vidt", BACKBONE, img_size=img_size, backbone_kwargs=SWIN_NANO_HALF, **task_args)
    return count_flops(model, (1, img_size, img_size)) / 1e9


def run_one(label: str, task_args: dict, out: Path, recipe: list[str], seed: int) -> dict:
    vitlab = Path(sys.executable).parent / "vitlab"
    name = f"row{list(ROWS).index(label)}-s{seed}"
    cmd = [str(vitlab), "train", "--task", "vidt", "--backbone", BACKBONE, "--out", str(out), "--name", name]
    cmd += ["--seed", str(seed), "--task-args", json.dumps(task_args), "--backbone-args", json.dumps(SWIN_NANO_HALF)]
    cmd += recipe
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=os.environ | THREADS)
    wall = time.perf_counter() - t0
    summary = json.loads((out / name / "summary.json").read_text())
    return dict(
        row=label,
        params_m=summary["params_m"],
        test_ap=summary.get("test_map", 0.0),
        test_ap50=summary.get("test_map_50", 0.0),
        train_seconds=summary["train_seconds"],
        command_seconds=round(wall, 1),
        steps=summary["steps"],
        seed=seed,
        command="vitlab train " + " ".join(cmd[2:]).replace(str(out), "runs"),
    )


THREADS: dict[str, str] = {}  # OMP_NUM_THREADS for the training processes (--threads)


def _merge_table(rows: list[dict], old_seeds: list[int]) -> None:
    """Prepend the committed table's per-seed AP/AP50 (seeds ``old_seeds``) to ``rows``; keep its training time."""
    with open(RESULTS / "vidt.csv", newline="") as f:
        old = {r["row"]: r for r in csv.DictReader(f)}
    for row in rows:
        before = old[row["row"]]
        for key in ("test_ap", "test_ap50"):
            values = [float(v) for v in before[f"{key}_per_seed"].split()]
            if len(values) != len(old_seeds):
                raise ValueError(
                    f"vidt.csv holds {len(values)} seeds for {row['row']!r}, not --merge-seeds {old_seeds}"
                )
            values += [float(v) for v in row[f"{key}_per_seed"].split()]
            row[key] = statistics.fmean(values)
            row[f"{key}_spread"] = (max(values) - min(values)) / 2
            row[f"{key}_per_seed"] = " ".join(f"{v:.2f}" for v in values)
        row["new_seed_train_seconds"] = row["train_seconds"]
        row["train_seconds"] = float(before["train_seconds"])


def _merge(runs: list[dict]) -> dict:
    """One row per model: means over seeds; the spreads as half the range."""
    row = dict(runs[0])
    for key in ("test_ap", "test_ap50"):
        values = [r[key] for r in runs]
        row[key] = statistics.fmean(values)
        row[f"{key}_spread"] = (max(values) - min(values)) / 2
        row[f"{key}_per_seed"] = " ".join(f"{v:.2f}" for v in values)
    row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--test-scenes", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--merge-seeds", type=int, nargs="*", default=[], help="seeds the committed table holds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per training process (0: its default)")
    args = parser.parse_args()
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
    recipe = ["--dataset", "fmnist_scenes", "--img-size", str(args.img_size), "--epochs", str(args.epochs)]
    recipe += ["--train-subset", str(args.train_scenes), "--test-subset", str(args.test_scenes)]
    recipe += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--weight-decay", "1e-4"]
    recipe += ["--clip-grad", "0.1", "--log-every", "50"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            _merge([run_one(label, {**COMMON, **extra}, Path(tmp), recipe, s) for s in args.seeds])
            for label, extra in ROWS.items()
        ]
    if args.merge_seeds:
        _merge_table(rows, args.merge_seeds)
    for row, extra in zip(rows, ROWS.values(), strict=True):
        row["gflops"] = gflops({**COMMON, **extra}, args.img_size)
        row["gflops_256"] = gflops({**COMMON, **extra}, 256)
    base = rows[0]
    machine = describe_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "vidt.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "machine", "torch"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "machine": machine.get("cpu", ""), "torch": machine.get("torch", "")})
    seeds = ", ".join(map(str, [*args.merge_seeds, *args.seeds]))
    timing = (
        f" Training times are those of seeds {', '.join(map(str, args.merge_seeds))} (2 quiet cores); seeds "
        f"{', '.join(map(str, args.seeds))} ran later with {args.threads or 'default'} thread(s) beside other jobs."
        if args.merge_seeds
        else ""
    )
    lines = [
        "# ViDT ablation on FMNIST-Scenes (object detection)",
        "",
        f"Data: {args.train_scenes} training / {args.test_scenes} test scenes of FMNIST-Scenes at {args.img_size} px "
        "(1-6 Fashion-MNIST items, 10 classes). Backbone `swin_tiny_patch4_window7_224` with "
        f"`{json.dumps(SWIN_NANO_HALF)}` (Swin-nano at half width, windows of 4), trained from scratch; task "
        f"arguments `{json.dumps(COMMON)}` for every row (the neck: 6 decoder layers, 8 heads, 4 points, box "
        "refinement, auxiliary losses).",
        f"Recipe: {args.epochs:g} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} (weight decay 1e-4, gradient "
        f"clip 0.1, as the official code), warmup + cosine; seeds {seeds} (each seed draws its own scenes and "
        "initialisation): AP and AP50 (COCO, percent) are means ± half the range over the seeds." + timing,
        "GFLOPs: one image's forward by `torch.utils.flop_counter` (2 per multiply-accumulate; deformable sampling "
        "not counted), at the training size and at 256 px.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; torch {machine.get('torch', '?')}. "
        f"Date: {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/vidt.py`.",
        "",
        "| model | params (M) | GFLOPs | GFLOPs @256 | AP | AP50 | AP50 per seed | AP50 vs YOLOS | training (s) "
        "| time vs YOLOS |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['params_m']:.2f} | {r['gflops']:.3f} | {r['gflops_256']:.2f} "
            f"| {r['test_ap']:.2f} ± {r['test_ap_spread']:.2f} | {r['test_ap50']:.2f} ± {r['test_ap50_spread']:.2f} "
            f"| {r['test_ap50_per_seed']} | {r['test_ap50'] - base['test_ap50']:+.2f} | {r['train_seconds']:.0f} "
            f"| {r['train_seconds'] / base['train_seconds']:.2f}x |"
        )
    lines += ["", "Training time excludes the per-epoch evaluations. Command of the last row:", ""]
    lines += [f"    {rows[-1]['command']}"]
    (RESULTS / "vidt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
