"""ViT-CoMer's ablation on FMNIST-Scenes: which of its components buys the mIoU, overall and by object size.

Five models on the same plain ViT (``vit_nano_patch4_28``, 6 blocks 128 wide, at patch 8, so the ViT alone sees
8 x 8 tokens of a 64 px scene), the same UperNet head (64 wide), data, schedule and seeds, each trained through
the ``vitlab`` console script as a user would (``vitlab train --task vit_comer --task-args ...``):

1. plain ViT: the four block groups' outputs resampled to strides 2, 4, 8, 16 (no CNN branch);
2. + CNN branch: its maps added to those outputs at the end (no interaction);
3. + MRFP on the CNN pyramid;
4. + CTI to ViT (the pyramid feeds the ViT tokens through deformable attention);
5. full ViT-CoMer: + CTI to CNN (the ViT tokens feed the pyramid back).

Besides mIoU, each trained run is scored by object size: an instance's recall is the share of its visible
pixels predicted as its class; instances are binned by visible area (small < 150 px, medium < 400 px, large).
Writes ``benchmarks/results/vit_comer.{csv,md}``; the plain ViT is the baseline of the differences.

    .venv/bin/python benchmarks/vit_comer.py
    .venv/bin/python benchmarks/vit_comer.py --epochs 1 --train-scenes 500 --test-scenes 200 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab.bench import describe_machine
from vitlab.data.synthetic import make_dataset
from vitlab.engine.inference import load_trained

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "vit_nano_patch4_28"
# ViT-CoMer-T's design at this CPU's scale: a 32-wide CNN branch, one extra CTI layer and MRFP's hidden layer
# twice the width, instead of 64, 4 and 6 times
SCALE = {"conv_width": 32, "extra_cti": 1, "mrfp_ratio": 2.0}
OFF = {"cnn_branch": False, "mrfp": False, "cti_to_vit": False, "cti_to_cnn": False}
ROWS = {
    "plain ViT + UperNet": OFF,
    "+ CNN branch": {"mrfp": False, "cti_to_vit": False, "cti_to_cnn": False},
    "+ MRFP": {"cti_to_vit": False, "cti_to_cnn": False},
    "+ CTI to ViT": {"cti_to_cnn": False},
    "+ CTI to CNN (full ViT-CoMer)": {},
}
SIZE_BINS = (("small", 0, 150), ("medium", 150, 400), ("large", 400, 1 << 30))


@torch.no_grad()
def recall_by_size(run: Path, n: int, seed: int, canvas: int) -> dict[str, float]:
    """Mean per-instance pixel recall (%) in each size bin, on the run's own test scenes."""
    model, meta, _ = load_trained(run)
    scenes = make_dataset("fmnist_scenes", split="test", n=n, seed=seed, canvas=canvas)
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    hits: dict[str, list[float]] = {name: [] for name, _, _ in SIZE_BINS}
    for start in range(0, len(scenes), 64):
        items = [scenes[i] for i in range(start, min(start + 64, len(scenes)))]
        image = torch.stack([it["image"] for it in items]).float().div(255)
        pred = model((image - mean) / std).argmax(1)
        for p, it in zip(pred, items, strict=True):
            for mask, label in zip(it["masks"], it["labels"], strict=True):
                area = int(mask.sum())
                recall = float((p[mask] == label + 1).float().mean()) if area else 0.0
                name = next(b for b, lo, hi in SIZE_BINS if lo <= area < hi)
                hits[name].append(100.0 * recall)
    return {name: statistics.fmean(v) if v else float("nan") for name, v in hits.items()}


def run_one(label: str, task_args: dict, out: Path, recipe: list[str], seed: int, args: argparse.Namespace) -> dict:
    vitlab = Path(sys.executable).parent / "vitlab"
    name = f"row{list(ROWS).index(label)}-s{seed}"
    cmd = [str(vitlab), "train", "--task", "vit_comer", "--backbone", BACKBONE, "--out", str(out), "--name", name]
    cmd += ["--seed", str(seed), "--task-args", json.dumps({**SCALE, **task_args})]
    cmd += ["--backbone-args", '{"patch_size": 8}']
    cmd += recipe
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / name / "summary.json").read_text())
    sizes = recall_by_size(out / name, args.test_scenes, seed, args.img_size)
    return dict(
        row=label,
        params_m=summary["params_m"],
        test_miou=summary["test_miou"],
        **{f"recall_{k}": v for k, v in sizes.items()},
        train_seconds=summary["train_seconds"],
        command_seconds=round(wall, 1),
        seed=seed,
        command="vitlab train " + " ".join(cmd[2:]).replace(str(out), "runs"),
    )


def _merge(runs: list[dict]) -> dict:
    """One row per model: means over seeds; the mIoU spread as half the range."""
    row = dict(runs[0])
    mious = [r["test_miou"] for r in runs]
    row["miou_spread"] = (max(mious) - min(mious)) / 2
    row["miou_per_seed"] = " ".join(f"{m:.2f}" for m in mious)
    for key in ("test_miou", "recall_small", "recall_medium", "recall_large", "train_seconds"):
        row[key] = statistics.fmean(r[key] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-scenes", type=int, default=1000)
    parser.add_argument("--test-scenes", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. what else ran meanwhile)")
    parser.add_argument("--times", action=argparse.BooleanOptionalAction, default=True, help="training-time columns")
    args = parser.parse_args()
    recipe = ["--dataset", "fmnist_scenes", "--img-size", str(args.img_size), "--epochs", str(args.epochs)]
    recipe += ["--train-subset", str(args.train_scenes), "--test-subset", str(args.test_scenes)]
    recipe += ["--batch-size", str(args.batch_size), "--lr", "2e-3", "--log-every", "50"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, task_args in ROWS.items():
            rows.append(_merge([run_one(label, task_args, Path(tmp), recipe, s, args) for s in args.seeds]))
            write_tables(rows, args)


def write_tables(rows: list[dict], args: argparse.Namespace) -> None:
    base = rows[0]
    machine = describe_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "vit_comer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "machine", "torch"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "machine": machine.get("cpu", ""), "torch": machine.get("torch", "")})
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# ViT-CoMer ablation on FMNIST-Scenes (semantic segmentation)",
        "",
        f"Data: {args.train_scenes} training / {args.test_scenes} test scenes of FMNIST-Scenes at {args.img_size} px. "
        f"Backbone `{BACKBONE}` at patch 8 (8 x 8 tokens), UperNet head 64 wide, the same for every row; "
        f"ViT-CoMer's parts at this scale: {json.dumps(SCALE)} (ViT-CoMer-T: 64, 4 and 6), "
        "4 interactions, deformable attention with 4 heads and 4 points.",
        f"Recipe: {args.epochs:g} epochs, batch {args.batch_size}, AdamW lr 2e-3, warmup + cosine; seeds {seeds} "
        "(each seed draws its own scenes and initialisation): mIoU is the mean ± half the range over the seeds.",
        "Recall by size: mean share of an instance's visible pixels predicted as its class, instances binned by "
        "visible area (small < 150 px, medium 150-400 px, large >= 400 px).",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; torch {machine.get('torch', '?')}. "
        f"Date: {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/vit_comer.py"
        + ("`." if args.times else " --no-times`."),
        *([args.note] if args.note else []),
        "",
        "| model | params (M) | test mIoU (%) | per seed | vs plain | recall small | medium | large |"
        + (" training (s) | time vs plain |" if args.times else ""),
        "|---|---:|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if args.times else ""),
    ]
    for r in rows:
        line = (
            f"| {r['row']} | {r['params_m']:.2f} | {r['test_miou']:.2f} ± {r['miou_spread']:.2f} "
            f"| {r['miou_per_seed']} | {r['test_miou'] - base['test_miou']:+.2f} | {r['recall_small']:.1f} "
            f"| {r['recall_medium']:.1f} | {r['recall_large']:.1f} |"
        )
        if args.times:
            line += f" {r['train_seconds']:.0f} | {r['train_seconds'] / base['train_seconds']:.2f}x |"
        lines.append(line)
    if args.times:
        lines += ["", "Training time excludes the per-epoch evaluations."]
    lines += ["", "Command of the last row:", ""]
    lines += [f"    {rows[-1]['command']}"]
    if len(rows) < len(ROWS):
        lines += ["", f"Partial: {len(rows)} of {len(ROWS)} rows measured so far."]
    (RESULTS / "vit_comer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
