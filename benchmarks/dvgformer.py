"""DVGFormer (paper 39) on scripted expert camera paths: state only vs images without the depth-like stream vs full.

Data: ``camera_paths`` (``data/synthetic/camera_paths.py``): fly the look-at point to a Fashion-MNIST target around
no-fly zones, zoom in, level the roll, stop. The frozen frame encoder is ``runs/compression/host_vit_micro_s0``
(vit_micro_patch4_28 trained on Fashion-MNIST, head dropped); it is frozen, so its pooled patch features are
computed once per frame and the task model is trained on them by ``task_fit.train`` (``DVGFormer.forward_sequence``;
equal to the full forward since the encoder runs in eval mode without gradient). Open loop: action L1 (action units:
one unit = the expert's top speed, see ``ACTION_SCALE``) on held-out trajectories with the expert's frames and poses.
Closed loop: from each test start pose the model's actions are executed, the view re-rendered after every frame and
fed back, until it raises the stop flag or the frames run out. Writes ``benchmarks/results/dvgformer.{csv,md,png}``.

    nice -n 5 .venv/bin/python benchmarks/dvgformer.py --threads 1   # 2 seeds, about 50 min on one shared core
    .venv/bin/python benchmarks/dvgformer.py --n 32 --test-n 8 --steps 5 --seeds 0 --out /tmp/dvg   # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from task_fit import cell, train, write_csv  # shared loop and table helpers (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data.synthetic import make_dataset
from vitlab.data.synthetic.camera_paths import (
    GOAL,
    collisions,
    goal_reached,
    integrate_actions,
    render_views,
    trajectory_background,
)
from vitlab.engine.inference import load_trained
from vitlab.tasks import create_task_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOST = ROOT / "runs" / "compression" / "host_vit_micro_s0"
BACKBONE = "vit_micro_patch4_28"
ROWS = {
    "state only (no image tokens)": {"use_images": False, "in_chans": 2},
    "images, no depth-like stream": {"in_chans": 1},
    "full (images + proximity stream)": {"in_chans": 2},
}
COLUMNS = ("l1", "l1_moving", "stop_acc", "goal", "collision", "deviation", "final_dist", "train_s")
TOL = (0.1, 0.1, 0.1)  # closed-loop goal: within 0.1 frame sides of the target, |log_zoom| and |roll| <= 0.1


def build(kw: dict, args, host_state: dict, seed: int):
    torch.manual_seed(seed)
    model = create_task_model(
        "dvgformer", BACKBONE, img_size=args.size, num_frames=args.frames, substeps=args.substeps, grid=args.grid,
        embed_dim=args.dim, depth=args.depth, num_heads=args.heads, **kw,
    )  # fmt: skip
    if model.encoder is not None:
        model.encoder.backbone.load_state_dict(host_state, strict=True)
    return model


def normalise(clips: torch.Tensor, mean, std) -> torch.Tensor:
    return (clips.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def features(encoder_model, clips: torch.Tensor, mean, std, batch: int = 16) -> torch.Tensor:
    """Pooled frozen features (N, T, 2, grid**2, D) of uint8 clips (N, T, 2, S, S)."""
    return torch.cat([encoder_model.encode_frames(normalise(c, mean, std)) for c in clips.split(batch)])


class OnFeatures(torch.nn.Module):
    """DVGFormer on cached frame features, shaped for ``task_fit.train``: ``forward(features, state)``, its loss."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, state: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_sequence(_select(self.model, feats), state)

    def loss(self, out, batch):
        return self.model.loss(out, batch)

    def forward_kwargs(self, batch) -> dict:
        return {"state": batch["state"]}


class CachedFeatures:
    """Shuffled batches of the cached features and targets: one generator seeded with ``seed``, a permutation per
    epoch (the batch order is the seed's, as the rows' model init is)."""

    def __init__(self, feats: torch.Tensor, data, batch: int, seed: int) -> None:
        self.feats, self.data, self.batch = feats, data, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch)

    def iter_batches(self, epoch: int):
        d = self.data
        for idx in torch.randperm(len(d), generator=self.generator).split(self.batch):
            yield {"image": self.feats[idx], "state": d.state[idx], "actions": d.actions[idx], "stop": d.stop[idx]}


def fit(model, feats, data, args, seed: int) -> float:
    """``task_fit.train`` (AdamW wd 0.05, warmup 10% + cosine, clip 1) on the cached features; the wall time (s)."""
    steps = args.steps or math.ceil(args.epochs * len(data) / args.batch)
    loader = CachedFeatures(feats, data, args.batch, seed)
    return train(OnFeatures(model), data, 0, args.lr, args.batch, seed, steps=steps, loader=loader)


def _select(model, feats: torch.Tensor | None) -> torch.Tensor | None:
    return None if not model.use_images else feats[:, :, : model.in_chans]


@torch.no_grad()
def open_loop(model, feats, data) -> dict[str, float]:
    model.eval()
    out = model.forward_sequence(_select(model, feats), data.state)
    err = (out["actions"] - data.actions).abs()
    moving = data.stop == 0
    stop_acc = ((out["stop"] > 0).float() == data.stop).float().mean()
    return {"l1": float(err.mean()), "l1_moving": float(err[moving].mean()), "stop_acc": 100 * float(stop_acc)}


@torch.no_grad()
def closed_loop(model, encoder_model, data, args, mean, std) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Roll the model out from every test start pose (module docstring); returns the metrics and the routes."""
    model.eval()
    S, T, N = args.size, args.frames, len(data)
    backgrounds = [trajectory_background(args.seed_data, "test", i, S, data.params["canvas"]) for i in range(N)]
    pose, poses, feats = data.camera[:, 0].double(), [], []
    route, stopped = [pose[:, None, :2]], torch.zeros(N, dtype=torch.bool)
    for _ in range(T):  # all episodes step together; a stopped one keeps its pose
        poses.append(pose.float())
        if model.use_images:
            views = torch.stack([
                render_views(pose[i : i + 1], data.target[i], data.zones[i], data.items[i], backgrounds[i], S)[0][0]
                for i in range(N)
            ])  # fmt: skip
            feats.append(features(encoder_model, views[:, None], mean, std)[:, 0])
        state = torch.stack(poses, 1)
        state[..., :2] /= S
        out = model.forward_sequence(_select(model, torch.stack(feats, 1)) if feats else None, state)
        stopped |= out["stop"][:, -1] > 0
        steps = integrate_actions(pose, out["actions"][:, -1].double(), S)  # (N, K, 5)
        steps = torch.where(stopped[:, None, None], pose[:, None], steps)
        route.append(steps[..., :2])
        pose = steps[:, -1]
    routes = list(torch.cat(route, 1).float())
    pose = pose.float()
    dist = [torch.cdist(r, e) for r, e in zip(routes, data.route, strict=True)]
    metrics = {
        "goal": 100 * float(goal_reached(pose, data.target, S, TOL).float().mean()),
        "collision": 100
        * statistics.mean(bool(collisions(r, z).any()) for r, z in zip(routes, data.zones, strict=True)),
        # symmetric (chamfer) distance between the point sets: staying put is not "on the route"
        "deviation": statistics.mean(float(d.amin(1).mean() + d.amin(0).mean()) / (2 * S) for d in dist),
        "final_dist": float((pose[:, :2] - data.target[:, :2]).norm(dim=-1).mean()) / S,
    }
    return metrics, routes


def write(rows: dict[str, list[dict]], args, routes: dict[str, list], test) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "dvgformer.csv", rows, COLUMNS)
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    lines = [
        "# DVGFormer (paper 39) on scripted expert camera paths (2-D camera-motion canvas)",
        "",
        f"Data: `camera_paths`, {args.n} training / {args.test_n} test trajectories (data seed {args.seed_data}; test "
        f"targets are test-split Fashion-MNIST items, layouts unseen), {args.frames} frames of {args.size} px, "
        f"{args.substeps} motion sub-steps per frame, 1-3 no-fly zones. Frozen encoder `{BACKBONE}` "
        "(`runs/compression/host_vit_micro_s0`, Fashion-MNIST 81% top-1), patch features pooled to "
        f"{args.grid}x{args.grid} per stream. Causal transformer {args.depth} blocks, {args.dim} wide, {args.heads} "
        f"heads; {f'{args.steps} steps' if args.steps else f'{args.epochs:g} epochs'} of batch {args.batch}, AdamW lr "
        f"{args.lr} (wd 0.05, warmup 10% + cosine, clip 1). Seeds "
        f"{seeds} (model init and batch order; same data){': mean ± half the range' if len(seeds) > 1 else ''}. "
        "Open loop on the expert's frames: action L1 in action units (1 = the expert's top speed per sub-step), "
        "over all frames and over the frames before the expert stops; stop-flag accuracy. Closed loop from the test "
        f"start poses: goal = ends within {TOL[0]} frame sides of the target with |log-zoom|, |roll| <= {TOL[1]} "
        "(the expert's own goal is tighter: "
        f"{GOAL}); collision = some sub-step enters a no-fly zone; deviation = chamfer distance (frame sides) between "
        "the roll-out's and the expert's sub-step points (mean of both directions' mean nearest distance); final "
        "distance to the target (frame sides). The expert "
        "scores goal 100%, collision 0%, deviation 0 by construction. Training time: 1 thread, machine shared with "
        f"other jobs. torch {torch.__version__}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine}. "
        f"Command: `python benchmarks/dvgformer.py {' '.join(sys.argv[1:])}`.",
        "",
        "| row | action L1 | L1 moving | stop acc. % | goal % | collision % | deviation | final dist. "
        "| train s (1 thread, shared machine) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    digits = {"l1": 3, "l1_moving": 3, "deviation": 3, "final_dist": 3, "train_s": 0}
    for label, runs in rows.items():
        lines.append(
            f"| {label} | " + " | ".join(cell([r.get(k) for r in runs], digits.get(k, 1)) for k in COLUMNS) + " |"
        )
    (args.out / "dvgformer.md").write_text("\n".join(lines) + "\n")
    plot(routes, test, args.out / "dvgformer.png", args.size)


def plot(routes: dict[str, list], test, path: Path, size: int, count: int = 4) -> None:
    """Roll-out paths (first seed) vs the expert's route on the first ``count`` test layouts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    fig = Figure(figsize=(3 * count, 3.3), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, count, squeeze=False)[0]
    colours = ("tab:orange", "tab:blue", "tab:green")
    for i, ax in enumerate(axes[: min(count, len(test))]):
        for x, y, r in test.zones[i].tolist():
            if r > 0:
                ax.add_patch(Circle((x / size, y / size), r / size, color="red", alpha=0.3))
        ax.plot(*(test.route[i] / size).T.tolist(), "k-", lw=2, label="expert")
        for (label, rs), c in zip(routes.items(), colours, strict=False):
            ax.plot(*(rs[i] / size).T.tolist(), "-", color=c, lw=1, label=label)
        ax.plot(*(test.target[i, :2] / size).tolist(), "*", color="gold", ms=12, mec="k")
        ax.plot(*(test.route[i, 0] / size).tolist(), "ko", ms=4)
        ax.set_aspect("equal")
        ax.invert_yaxis()  # image convention: y down
        ax.set_title(f"test layout {i}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=6, loc="best")
    fig.suptitle("closed-loop roll-outs (seed 0) vs expert; red: no-fly zones, star: target (frame sides)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--test-n", type=int, default=100)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--substeps", type=int, default=4)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--steps", type=int, default=1200, help="training steps (0: --epochs)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seed-data", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    host, meta, _ = load_trained(HOST)
    if meta["model"] != BACKBONE or meta["img_size"] != args.size:
        raise SystemExit(f"{HOST} holds {meta['model']} at {meta['img_size']} px; expected {BACKBONE} at {args.size}")
    host_state = {k: v for k, v in host.state_dict().items() if not k.startswith("head.")}
    kw = {"seed": args.seed_data, "frames": args.frames, "size": args.size, "substeps": args.substeps}
    train_set = make_dataset("camera_paths", split="train", n=args.n, **kw)
    test = make_dataset("camera_paths", split="test", n=args.test_n, **kw)
    encoder_model = build(ROWS["full (images + proximity stream)"], args, host_state, 0).eval()
    t0 = time.perf_counter()
    train_feats = features(encoder_model, train_set.clips, train_set.mean, train_set.std)
    test_feats = features(encoder_model, test.clips, train_set.mean, train_set.std)
    print(f"features: {time.perf_counter() - t0:.0f} s", flush=True)
    rows: dict[str, list[dict]] = {}
    routes: dict[str, list] = {}
    for seed in args.seeds:
        for label, row_kw in ROWS.items():
            model = build(row_kw, args, host_state, seed)
            train_s = fit(model, train_feats, train_set, args, seed)
            result = {"seed": seed, "train_s": train_s, **open_loop(model, test_feats, test)}
            loop, paths = closed_loop(model, encoder_model, test, args, train_set.mean, train_set.std)
            result.update(loop)
            routes.setdefault(label, paths)
            rows.setdefault(label, []).append(result)
            print(label, {k: round(v, 3) for k, v in result.items()}, flush=True)
            write(rows, args, routes, test)


if __name__ == "__main__":
    main()
