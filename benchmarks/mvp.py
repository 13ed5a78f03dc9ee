"""MvP (paper 36) on stick-figure humans: projective vs dense cross-attention at equal steps, with 2, 3 and 4 views.

Scenes of 1-3 stick figures (``stick_humans``, 15 joints, metres) seen by 4 calibrated room cameras at ``--size``
px; a row with V views uses the first V cameras of every scene (the same scenes for every row). Rows: the task model
``mvp`` with ``attention="projective"`` (the paper: deformable sampling around each joint query's 3-D point projected
into every view, views fused by concatenation) or ``attention="dense"`` (plain cross-attention to every token of every
view), both with RayConv, the same backbone, decoder size, steps, batches and learning rate. Metrics (MvP /
VoxelPose protocol): AP at MPJPE thresholds 25..150 mm (and 250, 500: the paper's thresholds are far below what
64 px views allow), recall at 500 mm and MPJPE of the true positives at 500 mm; train time per step relative to
dense. Writes ``benchmarks/results/mvp.{csv,md,png}``.

    .venv/bin/python benchmarks/mvp.py --threads 1                                   # the table
    .venv/bin/python benchmarks/mvp.py --views 3 --w-heatmap 1 --append              # + rows with 2-D heatmaps
    .venv/bin/python benchmarks/mvp.py --reference-only                              # + trivial predictors
    .venv/bin/python benchmarks/mvp.py --n 32 --test-n 16 --steps 3 --views 2 --out /tmp/mvp   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from multihmr import Batches  # shuffled slices of one pre-built batch dict (this directory is on sys.path)
from task_fit import cell, train, write_csv
from vitlab.data.synthetic.humans_sets import generate_stick_humans
from vitlab.tasks import create_task_model
from vitlab.tasks.pose3d import batch_from_humans_views

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "vit_micro_patch4_28"
BACKBONE_KW = {"depth": 4, "embed_dim": 64, "num_heads": 2}
METRICS = ("ap25", "ap50", "ap100", "ap150", "ap250", "ap500", "recall", "mpjpe")
ATTENTIONS = ("dense", "projective")


def load(split: str, n: int, size: int, seed: int) -> dict:
    data = generate_stick_humans(split, n=n, seed=seed, views=4, size=size, max_people=3)
    return batch_from_humans_views(data.collate([data[i] for i in range(len(data))]), data.mean, data.std)


def take_views(data: dict, views: int) -> dict:
    return {k: v[:, :views] if k in ("image", "K", "cam_to_world") else v for k, v in data.items()}


@torch.no_grad()
def evaluate(model, data: dict) -> dict[str, float]:
    model.eval()
    metrics = model.build_metrics()
    for b in Batches(data, 32, 0, shuffle=False).iter_batches(0):
        model.update_metrics(metrics, model(b["image"], K=b["K"], cam_to_world=b["cam_to_world"]), b)
    return model.summarize_metrics(metrics)


def write(args, rows: dict, started: str, command: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "mvp.csv", rows, ("train_s", "s_per_step", *METRICS), keys=("attention", "views"))
    alloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    lines = [
        "# MvP on stick-figure humans: projective vs dense attention, 2 / 3 / 4 views",
        "",
        f"`{command}` · started {started} · torch {torch.__version__} · {args.threads} thread(s) on a shared 2-core "
        f"machine (other jobs running; times are indicative) · malloc mmap threshold: {alloc} · backbone "
        f"`{BACKBONE}` {BACKBONE_KW} patch {args.patch} at {args.size} px, shared by the views · decoder "
        f"{args.depth} layers, width {args.dim}, 6 person x 15 joint queries · train {args.n} scenes, "
        f"{args.steps} steps of {args.batch}, AdamW lr {args.lr} · test {args.test_n} scenes · seeds {args.seeds} "
        "(mean ± half the range) · 1-3 people per "
        "scene in a 5 x 5 m room, metres (so AP thresholds are real millimetres, not rescaled).",
        "",
        "AP at MPJPE thresholds (%), recall at 500 mm (%), MPJPE of the true positives at 500 mm (mm, 1e4: none). "
        "step ratio: train seconds per step relative to dense with the same views."
        + (
            " Rows named '+ 2-D heatmaps' add the optional 2-D joint-heatmap loss on the view features (w_heatmap="
            f"{args.w_heatmap}; not in the paper, a stand-in for MvP's 2-D-pose-pretrained backbone; their step ratio "
            "compares with dense + 2-D heatmaps)."
            if any("heatmaps" in a for a, _ in rows)
            else ""
        ),
        "",
        "| attention | views | AP25 | AP50 | AP100 | AP150 | AP250 | AP500 | recall@500 | MPJPE ↓ | s/step | step "
        "ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (att, views), runs in rows.items():
        vals = [cell([r[k] for r in runs], 1) for k in METRICS]
        dense = rows.get((att.replace("projective", "dense"), views))
        ratio = "-"
        if dense:
            mean = [sum(r["s_per_step"] for r in rs) / len(rs) for rs in (runs, dense)]
            ratio = f"{mean[0] / mean[1]:.2f}"
        sps = cell([r["s_per_step"] for r in runs], 3)
        lines.append(f"| {att} | {views} | {' | '.join(vals)} | {sps} | {ratio} |")
    (out / "mvp.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "mvp.png")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for att in dict.fromkeys(a for a, _ in rows):
        pts = sorted((v, runs) for (a, v), runs in rows.items() if a == att)
        if not pts:
            continue
        xs = [v for v, _ in pts]
        for ax, key in zip(axes, ("recall", "ap500"), strict=True):
            ax.plot(xs, [sum(r[key] for r in runs) / len(runs) for _, runs in pts], "o-", label=att)
    for ax, title in zip(axes, ("recall @500 mm (%) ↑", "AP@500 mm (%) ↑"), strict=True):
        ax.set_xlabel("views")
        ax.set_xticks([2, 3, 4])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def reference(train: dict, test: dict, size: int) -> list[str]:
    """Markdown lines of two trivial predictors scored with the same protocol: 6 copies of the training people's
    mean (world) pose, and the true pelvis of every person plus the mean root-relative pose (an oracle root)."""
    model = create_task_model("mvp", BACKBONE, img_size=size, num_views=1, num_people=1, backbone_kwargs=BACKBONE_KW)
    people = train["joints_3d"][train["person_mask"]]
    B = test["joints_3d"].shape[0]
    mask = test["person_mask"]
    rel = (people - people[:, :1]).mean(0)
    cases = {
        "mean pose at the mean place (6 copies)": (people.mean(0).expand(B, 6, 15, 3), torch.zeros(B, 6)),
        "oracle pelvis + mean root-relative pose": (rel + test["joints_3d"][:, :, :1], torch.where(mask, 1.0, -1.0)),
    }
    lines = ["", "Reference (trivial predictors, same test scenes and protocol):", "",
             "| predictor | AP150 | AP250 | AP500 | recall@500 | MPJPE |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, (joints, logits) in cases.items():
        metrics = model.build_metrics()
        model.update_metrics(metrics, {"joints": joints.contiguous(), "logits": logits}, test)
        r = model.summarize_metrics(metrics)
        values = " | ".join(f"{r[k]:.1f}" for k in ("ap150", "ap250", "ap500", "recall", "mpjpe"))
        lines.append(f"| {name} | {values} |")
    return lines


def read_csv(path: Path) -> dict:
    """The rows of an earlier run's CSV (``write_csv``'s layout), numbers as floats."""
    rows: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = (r.pop("attention"), int(r.pop("views")))
            r["seed"] = int(float(r["seed"]))
            rows.setdefault(key, []).append({k: float(v) if v and k != "seed" else v for k, v in r.items()})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--test-n", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patch", type=int, default=8, help="the backbone's patch size (feature-map stride)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--views", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--w-heatmap", type=float, default=0.0, help="> 0: rows with the 2-D joint-heatmap loss")
    p.add_argument("--append", action="store_true", help="keep the rows of the CSV already in --out")
    p.add_argument("--reference-only", action="store_true", help="append the trivial predictors to the markdown")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/mvp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    train_set, test_set = load("train", args.n, args.size, 0), load("test", args.test_n, args.size, 1)
    if args.reference_only:
        md = Path(args.out) / "mvp.md"
        md.write_text(md.read_text() + "\n".join(reference(train_set, test_set, args.size)) + "\n")
        return
    rows: dict = read_csv(Path(args.out) / "mvp.csv") if args.append else {}
    if args.append:  # the table's first line names every command that made its rows
        command = (Path(args.out) / "mvp.md").read_text().splitlines()[2].split("`")[1] + "` then `" + command
    suffix = " + 2-D heatmaps" if args.w_heatmap > 0 else ""
    for seed in args.seeds:
        for views in args.views:
            for att in args.attention:
                torch.manual_seed(seed)
                model = create_task_model("mvp", BACKBONE, img_size=args.size, num_views=views, attention=att,
                                          w_heatmap=args.w_heatmap, dim=args.dim, depth=args.depth,
                                          backbone_kwargs={**BACKBONE_KW, "patch_size": args.patch})  # fmt: skip
                t0 = time.perf_counter()
                train(model, None, 0, args.lr, args.batch, seed, steps=args.steps,
                      loader=Batches(take_views(train_set, views), args.batch, seed))  # fmt: skip
                train_s = time.perf_counter() - t0
                res = evaluate(model, take_views(test_set, views))
                row = {"seed": seed, "train_s": round(train_s, 1), "s_per_step": train_s / args.steps, **res}
                rows.setdefault((att + suffix, views), []).append(row)
                print(att, views, seed, {k: round(v, 1) for k, v in row.items()}, flush=True)
                write(args, rows, started, command)


if __name__ == "__main__":
    main()
