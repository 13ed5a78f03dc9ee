"""LeTFuser (paper 38) at CPU scale: the driving world of ``data/synthetic/driving.py``, a tiny CvT, 32 px cameras.

Rows (same data, budget and seed per row): the front camera only; three cameras (left, front, right, side by side
into one wide image); three cameras + the semantic depth cloud (SDC, the full model); three cameras trained on the
waypoint loss alone (vs the multi-task row "three cameras"). Multi-task rows weight their losses with GradNorm
(alpha 1.5). Open loop on held-out samples (test split): waypoint ADE / FDE (m), traffic-light accuracy (%),
segmentation mIoU (%, 6 classes). Closed loop: episodes in held-out worlds, the model's waypoints -> PID -> bicycle
step -> re-render, 9 s each; collision and red-light-violation rates (%) and mean progress (m); the expert's own
rollouts as the reference row. Writes ``benchmarks/results/letfuser.{csv,md,png}``.

    .venv/bin/python benchmarks/letfuser.py --threads 1                 # ~25 min on one shared core
    .venv/bin/python benchmarks/letfuser.py --n 64 --test-n 16 --episodes 2 --steps 3 --seeds 0 --out /tmp/lf
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

from task_fit import cell, train, write_csv  # this directory is on sys.path
from vitlab.data.fashion_mnist import load_fashion_mnist
from vitlab.data.synthetic.driving import expert_waypoints, rollout, start_state
from vitlab.data.synthetic.driving_sets import generate_driving, world_of
from vitlab.tasks import create_task_model

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "cvt_13_224"
BACKBONE_KW = {"embed_dims": (32, 64, 96), "depths": (1, 1, 2), "num_heads": (1, 2, 3)}  # a tiny CvT
ROWS = {
    "front camera": {"cameras": "front", "sdc": False, "tasks": "all"},
    "three cameras": {"cameras": "three", "sdc": False, "tasks": "all"},
    "three cameras + SDC": {"cameras": "three", "sdc": True, "tasks": "all"},
    "three cameras, waypoints only": {"cameras": "three", "sdc": False, "tasks": "waypoints"},
}
COLUMNS = ("ade", "fde", "light_acc", "miou", "collision", "red_violation", "progress", "train_s", "params_m")


class Batches:
    """The driving set in memory as task batches (normalised views), shuffled per epoch."""

    def __init__(self, data, batch: int, seed: int, front_only: bool, shuffle: bool = True, norm=None) -> None:
        sel = slice(1, 2) if front_only else slice(None)  # the rig's view order: left, front, right
        m, s = norm or (torch.tensor(data.mean).view(1, 1, 3, 1, 1), torch.tensor(data.std).view(1, 1, 3, 1, 1))
        self.t = {"image": (data.views[:, sel].float() / 255 - m) / s, "depth": data.depth[:, sel],
                  "semantic": data.semantic[:, sel].long(), "K": data.K[:, sel], "cam_to_ego": data.cam_to_ego[:, sel],
                  "measurements": data.measurements, "waypoints": data.waypoints, "light": data.light}  # fmt: skip
        self.mean, self.std = m, s
        self.batch, self.seed, self.shuffle, self.n = batch, seed, shuffle, len(data)

    def __len__(self) -> int:
        return max(1, self.n // self.batch)

    def iter_batches(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        for i in range(0, self.n - (self.batch - 1 if self.shuffle else 0), self.batch):
            idx = order[i : i + self.batch]
            yield {k: v[idx] for k, v in self.t.items()}


@torch.no_grad()
def open_loop(model, test: Batches) -> dict:
    model.eval()
    metrics = model.build_metrics()
    for b in test.iter_batches(0):
        model.update_metrics(metrics, model(b["image"], **model.forward_kwargs(b)), b)
    return model.summarize_metrics(metrics)


def no_swerve(world, state):
    """The expert's plan with the obstacles removed (lane keeping and the light only): the reference for how many
    worlds end in a collision when nothing is avoided."""
    saved, world.obstacles = world.obstacles, world.obstacles[:0]
    try:
        return expert_waypoints(world, state)
    finally:
        world.obstacles = saved


@torch.no_grad()
def closed_loop(model, pool, episodes: int, seed: int, size: int, front_only: bool, steps: int,
                swerve: bool = True) -> dict:  # fmt: skip
    """Rates (%) over ``episodes`` held-out worlds; ``model`` None drives the expert (``swerve=False``: without
    obstacle avoidance)."""
    cams = "front" if front_only else "three"

    def policy(obs, state):
        views = obs["views"][None].float() / 255
        x = (views - test_mean) / test_std
        kw = {"measurements": torch.from_numpy(obs["measurements"])[None], "K": obs["K"][None],
              "cam_to_ego": obs["cam_to_ego"][None]}  # fmt: skip
        return model(x, **kw)["waypoints"][0].numpy()

    if model is not None:
        model.eval()
    hits = reds = red_worlds = 0
    progress = []
    for e in range(episodes):
        world, rng = world_of("test", e, 10_000 + seed, pool)
        if model is None:
            drive = None if swerve else (lambda obs, state, w=world: no_swerve(w, state))
            out = rollout(world, drive, start_state(world, rng), steps, size, cams, render=False)
        else:
            out = rollout(world, policy, start_state(world, rng), steps, size, cams)
        hits += out["collision"]
        reds += out["red_violation"]
        red_worlds += world.red
        progress.append(out["progress"])
    return {"collision": 100 * hits / episodes, "red_violation": 100 * float(reds) / max(1, red_worlds),
            "progress": float(np.mean(progress))}  # fmt: skip


test_mean = test_std = None  # the training set's normalisation, used by the closed-loop policy


def main(argv: list[str] | None = None) -> int:
    global test_mean, test_std
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per row")
    p.add_argument("--n", type=int, default=1500, help="training samples")
    p.add_argument("--test-n", type=int, default=300)
    p.add_argument("--episodes", type=int, default=30, help="closed-loop episodes per row")
    p.add_argument("--episode-steps", type=int, default=36)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rows", nargs="+", default=list(ROWS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV in --out")
    args = p.parse_args(argv)
    if args.replot:
        replot(Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, list[dict]] = {r: [] for r in ["expert", "expert without swerving", *args.rows]}
    pool = load_fashion_mnist(None, split="test").images
    for seed in args.seeds:
        train_set = generate_driving("train", args.n, seed, size=args.size)
        test_set = generate_driving("test", args.test_n, seed, size=args.size)
        test_mean = torch.tensor(train_set.mean).view(1, 1, 3, 1, 1)
        test_std = torch.tensor(train_set.std).view(1, 1, 3, 1, 1)
        expert = closed_loop(None, pool, args.episodes, seed, args.size, False, args.episode_steps)
        results["expert"].append({"seed": seed, **expert})
        blind = closed_loop(None, pool, args.episodes, seed, args.size, False, args.episode_steps, swerve=False)
        results["expert without swerving"].append({"seed": seed, **blind})
        print(f"seed {seed} expert {expert}", flush=True)
        for row in args.rows:
            kw = ROWS[row]
            front = kw["cameras"] == "front"
            torch.manual_seed(seed)
            model = create_task_model("letfuser", BACKBONE, img_size=args.size, backbone_kwargs=BACKBONE_KW, **kw)
            loader = Batches(train_set, args.batch, seed, front)
            wall = train(model, None, 0, args.lr, args.batch, seed, steps=args.steps, loader=loader)
            test = Batches(test_set, 64, seed, front, shuffle=False, norm=(test_mean, test_std))
            scores = open_loop(model, test)
            loop = closed_loop(model, pool, args.episodes, seed, args.size, front, args.episode_steps)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            r = {"seed": seed, **scores, **loop, "train_s": round(wall, 1), "params_m": round(params, 3)}
            if kw["tasks"] == "waypoints":
                r["light_acc"] = None  # the light head gets no light loss: not a measurement of anything
            results[row].append(r)
            print(f"seed {seed} {row}: {r}", flush=True)
        # after every seed, so a cut-short run still leaves the seeds it finished
        write_csv(out / "letfuser.csv", results, COLUMNS)
        write_md(out / "letfuser.md", results, args, time.perf_counter() - t_start)
        plot(out / "letfuser.png", results)
    return 0


def write_md(path: Path, results: dict, args, wall: float) -> None:
    head = (
        "| row | ADE (m) | FDE (m) | light acc (%) | seg mIoU (%) | collisions (%) | red-light violations (%) "
        "| progress (m) | params (M) |"
    )
    lines = [head, "|" + "---|" * 9]
    for row, runs in results.items():
        c = [cell([r.get(k) for r in runs], 2 if k in ("ade", "fde") else 1) for k in COLUMNS[:7]]
        lines.append(f"| {row} | " + " | ".join(c) + f" | {cell([r.get('params_m') for r in runs], 3)} |")
    cmd = "python benchmarks/letfuser.py " + " ".join(sys.argv[1:])
    text = [
        "# LeTFuser (paper 38) on the toy driving world",
        "",
        f"Command: `{cmd}` ({datetime.date.today()}, {wall / 60:.0f} min, {args.threads} thread, shared 2-core "
        f"machine; seeds {args.seeds}; mean ± half range over seeds where more than one).",
        "",
        f"Backbone `{BACKBONE}` with `backbone_kwargs={BACKBONE_KW}` (a tiny CvT from scratch), {args.size} px per "
        f"camera, {args.n} training / {args.test_n} test samples, {args.steps} AdamW steps of batch {args.batch}, "
        f"lr {args.lr}. Closed loop: {args.episodes} held-out worlds x {args.episode_steps} steps of 0.25 s; "
        "red-light violations are per red-light world.",
        "",
        *lines,
        "",
    ]
    path.write_text("\n".join(text))


def plot(path: Path, results: dict) -> None:
    """Bars: the mean per row; dots: the seeds; dashed: the expert without swerving (collisions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results if not r.startswith("expert")]
    fig = Figure(figsize=(9, 3), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    labels = ("open-loop ADE (m)", "collisions (%)", "red-light violations (%)")
    for ax, key, label in zip(axes, ("ade", "collision", "red_violation"), labels, strict=True):
        for i, row in enumerate(rows):
            vals = [float(r[key]) for r in results[row]]
            ax.barh(i, np.mean(vals), color="tab:blue")
            ax.plot(vals, [i] * len(vals), "k.", ms=4)
        ref = results.get("expert without swerving")
        if key == "collision" and ref:
            ax.axvline(np.mean([float(r[key]) for r in ref]), color="tab:red", ls="--", lw=1, label="no swerving")
            ax.legend(fontsize=6, loc="lower right")
        if key == "red_violation":
            ax.set_xlim(0, 100)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0] else [""] * len(rows), fontsize=6)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path)


def replot(out: Path) -> None:
    """Redraw ``letfuser.png`` from ``letfuser.csv`` (``--replot``)."""
    results: dict[str, list[dict]] = {}
    with open(out / "letfuser.csv", newline="") as f:
        for r in csv.DictReader(f):
            results.setdefault(r["row"], []).append(r)
    plot(out / "letfuser.png", results)


if __name__ == "__main__":
    raise SystemExit(main())
