"""Semantic segmentation on FMNIST-Scenes: mIoU and training time of three backbones trained the same way.

One plain ViT, one hierarchical backbone and one of vitlab's own mixers, each under the same task model
(``vitlab train --task segmentation``: backbone by name + feature pyramid + light head), the same data, seed,
schedule and batch; run one after another on a quiet machine, each through the ``vitlab`` console script as a
user would. Writes ``benchmarks/results/segmentation.{csv,md}``; the first backbone is the baseline of the ratios.

    .venv/bin/python benchmarks/segmentation.py
    .venv/bin/python benchmarks/segmentation.py --backbones vit_micro_patch4_28 tiny_vit_1m_28 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitlab.bench import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"
# plain ViT (isotropic, timm), hierarchical (timm TinyViT inside vitlab's 28 px variant), vitlab's retention mixer
BACKBONES = {
    "vit_micro_patch4_28": "plain ViT (timm)",
    "tiny_vit_1m_28": "hierarchical (TinyViT)",
    "vir_nano_patch4_28": "vitlab mixer (retention)",
}


def run_one(backbone: str, out: Path, recipe: list[str], seed: int) -> dict:
    vitlab = Path(sys.executable).parent / "vitlab"
    cmd = [str(vitlab), "train", "--task", "segmentation", "--backbone", backbone, "--out", str(out)]
    cmd += ["--name", f"{backbone}-s{seed}", "--seed", str(seed), *recipe]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    run = out / f"{backbone}-s{seed}"
    summary = json.loads((run / "summary.json").read_text())
    scores = json.loads((run / "eval" / "eval.json").read_text())
    return dict(
        backbone=backbone,
        kind=BACKBONES.get(backbone, ""),
        params_m=summary["params_m"],
        test_miou=round(summary["test_miou"], 2),
        test_pixel_acc=round(summary["test_pixel_acc"], 2),
        iou_per_class=" ".join("-" if v is None else f"{v:.1f}" for v in scores["iou_per_class"]),
        train_seconds=summary["train_seconds"],
        command_seconds=round(wall, 1),
        steps=summary["steps"],
        seed=seed,
        command="vitlab train " + " ".join(cmd[2:]).replace(str(out), "runs"),
    )


def _merge(runs: list[dict]) -> dict:
    """One row per backbone: means over seeds, the mIoU spread as half the range."""
    mious = [r["test_miou"] for r in runs]
    row = dict(runs[0])
    row["test_miou"] = round(sum(mious) / len(mious), 2)
    row["miou_spread"] = round((max(mious) - min(mious)) / 2, 2)
    row["miou_per_seed"] = " ".join(f"{m:.2f}" for m in mious)
    for key in ("test_pixel_acc", "train_seconds", "command_seconds"):
        row[key] = round(sum(r[key] for r in runs) / len(runs), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--test-scenes", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    seed_list = ", ".join(map(str, args.seeds))
    recipe = ["--dataset", "fmnist_scenes", "--img-size", str(args.img_size), "--epochs", str(args.epochs)]
    recipe += ["--train-subset", str(args.train_scenes), "--test-subset", str(args.test_scenes)]
    recipe += ["--batch-size", str(args.batch_size), "--lr", "2e-3", "--log-every", "50"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_merge([run_one(b, Path(tmp), recipe, seed) for seed in args.seeds]) for b in args.backbones]
    base = rows[0]
    for r in rows:
        r["miou_minus_baseline"] = round(r["test_miou"] - base["test_miou"], 2)
        r["time_ratio"] = round(r["train_seconds"] / base["train_seconds"], 3)
    machine = describe_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "segmentation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "machine", "torch"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "machine": machine.get("cpu", ""), "torch": machine.get("torch", "")})
    lines = [
        "# Semantic segmentation on FMNIST-Scenes, three backbones trained the same way",
        "",
        f"Data: {args.train_scenes} training / {args.test_scenes} test scenes of FMNIST-Scenes at {args.img_size} px "
        "(1-6 Fashion-MNIST items, rotated, scaled, occluding; 11 classes with background).",
        f"Recipe: {args.epochs:g} epochs, batch {args.batch_size}, AdamW lr 2e-3, warmup + cosine; "
        "task model `segmentation` (simple feature pyramid for isotropic backbones, FPN for hierarchical ones).",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; torch {machine.get('torch', '?')}, "
        f"timm {machine.get('timm', '?')}. Date: {time.strftime('%Y-%m-%d')}. Produced by "
        f"`python benchmarks/segmentation.py`; seeds {seed_list}: mIoU is the mean ± half the range over the "
        "seeds (each seed draws its own scenes and initialisation); times are means.",
        "",
        "| backbone | kind | params (M) | test mIoU (%) | per seed | pixel acc (%) | training (s) "
        "| mIoU vs first | time vs first |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['backbone']}` | {r['kind']} | {r['params_m']:.2f} | {r['test_miou']:.2f} ± {r['miou_spread']:.2f} "
            f"| {r['miou_per_seed']} | {r['test_pixel_acc']:.2f} | {r['train_seconds']:.0f} "
            f"| {r['miou_minus_baseline']:+.2f} "
            f"| {r['time_ratio']:.2f}x |"
        )
    lines += ["", "Per-class IoU of the first seed (background first):", ""]
    lines += [f"- `{r['backbone']}`: {r['iou_per_class']}" for r in rows]
    lines += ["", "Training time excludes the per-epoch evaluations. Command:", "", f"    {rows[0]['command']}"]
    (RESULTS / "segmentation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
