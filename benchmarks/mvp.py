"""MvP (paper 36) on stick-figure humans: projective vs dense cross-attention at equal steps.

Scenes of 1-3 stick figures (``stick_humans`` generator version 2, 15 joints, metres) seen by 4 calibrated room
cameras at ``--size`` px; a row with V views uses the first V cameras of every scene (the same scenes for every
row), in the rig frame (``rig_frame``: the world turned about the vertical so that camera 0 stands on +x; MvP
trains and tests on one fixed rig). Rows: the task model ``mvp`` with ``attention="projective"`` (the paper:
deformable sampling around each joint query's 3-D point projected into every view and feature level, views fused by
concatenation with their projected coordinates) or ``attention="dense"`` (plain cross-attention to every token of
every level of every view), both with RayConv, the same backbone, the same 2-D heatmap pretraining of the backbone
(``--pretrain`` steps: the stand-in for MvP's 2-D-pose-pretrained backbone), decoder size, steps, batches and
learning rate. Metrics (MvP / VoxelPose protocol): AP at MPJPE thresholds 25..150 mm (and 250, 500), recall at
500 mm and MPJPE of the true positives at 500 mm; train time per step relative to dense; two trivial predictors
(a mean pose at the mean place, the true pelvis + the mean root-relative pose) on the same test scenes. Writes
``benchmarks/results/mvp.{csv,md,png}``.

    .venv/bin/python benchmarks/mvp.py --threads 1 --views 3 --seeds 0 1                  # the table
    .venv/bin/python benchmarks/mvp.py --threads 1 --views 2 4 --append                    # + rows, 1 seed
    .venv/bin/python benchmarks/mvp.py --views 3 --seeds 0 1 --render      # md + png from the CSV (same args)
    .venv/bin/python benchmarks/mvp.py --n 32 --test-n 16 --steps 3 --pretrain 2 --views 2 --out /tmp/mvp  # smoke
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
ATTENTIONS = ("projective", "dense")


def load(split: str, n: int, size: int, seed: int, max_people: int = 3) -> dict:
    data = generate_stick_humans(split, n=n, seed=seed, views=4, size=size, max_people=max_people)
    return batch_from_humans_views(data.collate([data[i] for i in range(len(data))]), data.mean, data.std)


def rig_frame(data: dict) -> dict:
    """The scenes in a rig frame: the world turned about the vertical axis (through the room centre) so that
    camera 0 stands on the +x axis, cameras and joints alike (the images do not change).

    MvP trains and tests on one fixed camera rig (Panoptic's); the generator draws every scene's rig with a random
    azimuth, so without this the decoder must learn a regression that turns with the cameras. The other views keep
    their +-20 deg azimuth jitter and every view its random field of view, distance and height."""
    eye = data["cam_to_world"][:, 0, :2, 3]
    angle = -torch.atan2(eye[:, 1], eye[:, 0])
    c, s = angle.cos(), angle.sin()
    turn = torch.eye(4).repeat(len(angle), 1, 1)
    turn[:, 0, 0], turn[:, 0, 1], turn[:, 1, 0], turn[:, 1, 1] = c, -s, s, c
    joints = data["joints_3d"] @ turn[:, None, :3, :3].transpose(-1, -2)  # padded people stay at the origin
    return {**data, "cam_to_world": turn[:, None] @ data["cam_to_world"], "joints_3d": joints}


def take_views(data: dict, views: int) -> dict:
    return {k: v[:, :views] if k in ("image", "K", "cam_to_world") else v for k, v in data.items()}


@torch.no_grad()
def evaluate(model, data: dict) -> dict[str, float]:
    model.eval()
    metrics = model.build_metrics()
    for b in Batches(data, 32, 0, shuffle=False).iter_batches(0):
        model.update_metrics(metrics, model(b["image"], K=b["K"], cam_to_world=b["cam_to_world"]), b)
    return model.summarize_metrics(metrics)


def pretrain_heatmaps(model, loader: Batches, steps: int, lr: float) -> None:
    """The stand-in for MvP's 2-D-pose-pretrained backbone: ``steps`` AdamW steps of the backbone (+ input
    projection + heatmap head) on 2-D joint heatmaps of the training views (``MvP.heatmap_pretrain_loss``)."""
    stage = ("backbone", "input_proj", "upsample", "heatmap_head")
    params = [p for n, p in model.named_parameters() if n.split(".")[0] in stage]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        for b in loader.iter_batches(epoch):
            loss = model.heatmap_pretrain_loss(b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            if step >= steps:
                break
        epoch += 1


def write(args, rows: dict, started: str, command: str, ref: tuple[list[str], dict] | None = None) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "mvp.csv", rows, ("pretrain_s", "train_s", "s_per_step", *METRICS), keys=("attention", "views"))
    alloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    lines = [
        "# MvP on stick-figure humans (generator version 2): projective vs dense attention",
        "",
        f"`{command}` · started {started} · torch {torch.__version__} · {args.threads} thread(s) on a shared 2-core "
        f"machine (other jobs running; times are indicative) · malloc mmap threshold: {alloc} · backbone "
        f"`{BACKBONE}` {BACKBONE_KW} patch {args.patch} at {args.size} px, shared by the views · decoder "
        f"{args.depth} layers, width {args.dim}, {args.people} person x 15 joint queries, {args.levels} feature "
        f"level(s), projective fusion with coordinates: {bool(args.coords)} · backbone first pretrained "
        f"{args.pretrain} steps on 2-D joint heatmaps, then heatmap loss weight {args.w_heatmap} · train {args.n} "
        f"scenes, {args.steps} steps of {args.batch}, AdamW lr {args.lr} · test {args.test_n} scenes · seeds "
        f"{args.seeds} (mean ± half the range) · rig frame: {bool(args.rig)} · 1-3 people per scene in a 5 x 5 m "
        "room, metres (so AP thresholds are real millimetres, not rescaled).",
        "",
        "AP at MPJPE thresholds (%), recall at 500 mm (%), MPJPE of the true positives at 500 mm (mm, 1e4: none). "
        "s/step: seconds per step of the set-loss stage (the heatmap pretraining excluded; loaded machine); step "
        "ratio: relative to dense with the same views.",
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
    if ref is not None:
        lines += ref[0]
    (out / "mvp.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "mvp.png", ref[1] if ref is not None else {})


def plot(rows: dict, path: Path, ref: dict) -> None:
    """AP against the MPJPE threshold (mean, bars: half the range over seeds) and the true positives' MPJPE per row,
    with the trivial predictors' values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    keys = METRICS[:6]
    xs = [float(k[2:]) for k in keys]
    names = []
    for (att, views), runs in rows.items():
        ys = [[r[k] for r in runs] for k in keys]
        mid = [sum(y) / len(y) for y in ys]
        axes[0].errorbar(xs, mid, yerr=[(max(y) - min(y)) / 2 for y in ys], marker="o", capsize=3,
                         label=f"{att}, {views} views")  # fmt: skip
        mpjpe = [r["mpjpe"] for r in runs]
        axes[1].bar(len(names), sum(mpjpe) / len(mpjpe), yerr=(max(mpjpe) - min(mpjpe)) / 2, capsize=3)
        names.append(f"{att}\n{views} views")
    for name, values in ref.items():
        axes[0].plot(xs, [values[k] for k in keys], "k--" if "oracle" in name else "k:", lw=1, label=name)
        axes[1].axhline(values["mpjpe"], color="k", ls="--" if "oracle" in name else ":", lw=1)
    axes[0].set_xscale("log")
    axes[0].set_xticks(xs, [f"{x:g}" for x in xs])
    axes[0].minorticks_off()
    axes[0].set_xlabel("MPJPE threshold (mm)")
    axes[0].set_title("AP (%) ↑", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(names)), names, fontsize=7)
    axes[1].set_title("MPJPE (mm) of true positives @500 mm ↓\n(dashed: oracle pelvis + mean pose; dotted: mean pose)",
                      fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def reference(train: dict, test: dict, size: int) -> tuple[list[str], dict]:
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
    results = {}
    lines = ["", "Reference (trivial predictors, same test scenes and protocol):", "",
             "| predictor | AP150 | AP250 | AP500 | recall@500 | MPJPE |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, (joints, logits) in cases.items():
        metrics = model.build_metrics()
        model.update_metrics(metrics, {"joints": joints.contiguous(), "logits": logits}, test)
        r = model.summarize_metrics(metrics)
        values = " | ".join(f"{r[k]:.1f}" for k in ("ap150", "ap250", "ap500", "recall", "mpjpe"))
        lines.append(f"| {name} | {values} |")
        results[name] = r
    return lines, results


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
    p.add_argument("--w-heatmap", type=float, default=1.0, help="weight of the 2-D joint-heatmap loss (0: off)")
    p.add_argument("--pretrain", type=int, default=300, help="steps of 2-D heatmap pretraining of the backbone")
    p.add_argument("--levels", type=int, default=3, help="feature levels: the map, + 2x finer, + 2x coarser")
    p.add_argument("--coords", type=int, default=1, help="1: projective fusion with the points' coordinates")
    p.add_argument("--people", type=int, default=10, help="person queries")
    p.add_argument("--rig", type=int, default=1, help="1: scenes in the rig frame (camera 0 on +x), see rig_frame")
    p.add_argument("--append", action="store_true", help="keep the rows of the CSV already in --out")
    p.add_argument("--render", action="store_true", help="rewrite md + png from the CSV in --out (no training)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/mvp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    train_set, test_set = load("train", args.n, args.size, 0), load("test", args.test_n, args.size, 1)
    if args.rig:
        train_set, test_set = rig_frame(train_set), rig_frame(test_set)
    ref = reference(train_set, test_set, args.size)
    rows: dict = read_csv(Path(args.out) / "mvp.csv") if args.append or args.render else {}
    if args.append or args.render:  # the table's first line names every command that made its rows
        earlier = (Path(args.out) / "mvp.md").read_text().splitlines()[2][1:].split("` · started")[0]
        command = earlier if args.render else earlier + "` then `" + command
    if args.render:
        started = (Path(args.out) / "mvp.md").read_text().splitlines()[2].split("started ")[1].split(" ·")[0]
        write(args, rows, started, command, ref)
        return
    suffix = ""
    for seed in args.seeds:
        for views in args.views:
            for att in args.attention:
                torch.manual_seed(seed)
                extra = {"coords": args.coords} if att == "projective" else {}
                model = create_task_model("mvp", BACKBONE, img_size=args.size, num_views=views, attention=att,
                                          w_heatmap=args.w_heatmap, dim=args.dim, depth=args.depth,
                                          levels=args.levels, num_people=args.people,
                                          backbone_kwargs={**BACKBONE_KW, "patch_size": args.patch},
                                          **extra)  # fmt: skip
                data = take_views(train_set, views)
                t0 = time.perf_counter()
                if args.pretrain:
                    pretrain_heatmaps(model, Batches(data, args.batch, seed + 100), args.pretrain, args.lr)
                pre_s = time.perf_counter() - t0
                train(model, None, 0, args.lr, args.batch, seed, steps=args.steps,
                      loader=Batches(data, args.batch, seed))  # fmt: skip
                train_s = time.perf_counter() - t0 - pre_s
                res = evaluate(model, take_views(test_set, views))
                row = {"seed": seed, "pretrain_s": round(pre_s, 1), "train_s": round(train_s, 1),
                       "s_per_step": train_s / args.steps, **res}  # fmt: skip
                rows.setdefault((att + suffix, views), []).append(row)
                print(att, views, seed, {k: round(v, 1) for k, v in row.items()}, flush=True)
                write(args, rows, started, command, ref)


if __name__ == "__main__":
    main()
