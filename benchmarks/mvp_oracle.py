"""MvP (paper 36) with oracle 2-D evidence: does the decoder place people in 3-D when the 2-D perception is perfect?

The backbone's per-view feature maps are replaced (``MvP.forward(..., features=...)``) by the ground-truth 2-D
joint heatmaps of every view (``mvp_parts.joint_heatmaps``: per joint the largest Gaussian of ``--sigma`` cells at
the projections of all present people, rendered at each feature level's resolution, occlusion ignored) through a
learnt 1x1 convolution per level to the decoder width. Which person a blob belongs to is not given: association
across views, the 3-D placement and the skeleton are left to the paper's part (RayConv, hierarchical joint queries,
projective or dense cross-attention, refinement, Hungarian set loss). Same scenes, rig frame, decoder, metrics and
trivial predictors as ``benchmarks/mvp.py``; "root" / "root-rel" are the pelvis error and the root-relative MPJPE
of the Hungarian-matched people (mm, every true person matched to one prediction, confidence ignored). Writes
``benchmarks/results/mvp_oracle.{csv,md,png}`` and, with ``--eval-every``, the learning curves
``mvp_oracle_curves.{csv,png}`` (``--tag`` suffixes the names; ``--append`` adds seeds to an earlier run).

``--triangulate`` (how good is the 2-D backbone of ``benchmarks/mvp.py``?): the backbone is pretrained on 2-D joint
heatmaps exactly as there (``--pretrain`` steps), then every test person's joints are triangulated from its
predicted heatmaps (finest level) with the true association: per view the heatmap peak within ``--window`` cells of
the joint's true projection, refined to sub-cell precision by a parabola through the log-heat of the peak and its
neighbours (exact for a Gaussian), and a DLT over the views that see it. The true heatmaps through the same
read-out give the ceiling of the read-out itself. Writes
``benchmarks/results/mvp_oracle_triangulation.md``.

    .venv/bin/python benchmarks/mvp_oracle.py --threads 1 --steps 2000 --seeds 0 1 --eval-every 250  # the table
    .venv/bin/python benchmarks/mvp_oracle.py --threads 1 --triangulate --pretrain 300 1000  # triangulation
    .venv/bin/python benchmarks/mvp_oracle.py --n 32 --test-n 16 --steps 3 --out /tmp/mvpo  # smoke
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from multihmr import Batches  # shuffled slices of one pre-built batch dict (this directory is on sys.path)
from mvp import (
    BACKBONE,
    BACKBONE_KW,
    METRICS,
    load,
    plot,
    pretrain_heatmaps,
    read_csv,
    reference,
    rig_frame,
    take_views,
)
from task_fit import cell, train, write_csv
from vitlab.layers.camera import invert_pose, project, transform_points
from vitlab.tasks import create_task_model
from vitlab.tasks.pose3d.mvp_parts import joint_heatmaps, match_people

RESULTS = Path(__file__).resolve().parent / "results"
EXTRA = ("root", "rootrel")


class OracleMvP(nn.Module):
    """An ``mvp`` task model whose view features are the true 2-D joint heatmaps (module doc): the wrapper has the
    ``train`` loop's protocol (``forward_kwargs`` hands it the true joints; ``loss`` and the metrics are the
    model's)."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma
        dim = model.input_proj.out_channels
        self.proj = nn.ModuleList(nn.Conv2d(15, dim, 1) for _ in model.level_sizes)
        for name in ("backbone", "input_proj", "upsample", "heatmap_head"):  # not run: keep them out of AdamW
            module = getattr(model, name)
            if module is not None:
                module.requires_grad_(False)

    def forward_kwargs(self, batch: dict) -> dict:
        return {k: batch[k] for k in ("K", "cam_to_world", "joints_3d", "person_mask")}

    def forward(self, image, K, cam_to_world, joints_3d, person_mask) -> dict:
        B, V = K.shape[:2]
        size = self.model.img_size
        features = [
            proj(joint_heatmaps(joints_3d, person_mask, K, cam_to_world, size, hw, self.sigma).flatten(0, 1)).unflatten(
                0, (B, V)
            )
            for proj, hw in zip(self.proj, self.model.level_sizes, strict=True)
        ]
        return self.model(None, K=K, cam_to_world=cam_to_world, features=features)

    def loss(self, output, batch):
        return self.model.loss(output, batch)


@torch.no_grad()
def evaluate(oracle: OracleMvP, data: dict) -> dict[str, float]:
    """The model's metrics plus the matched people's pelvis error and root-relative MPJPE (mm)."""
    oracle.eval()
    model = oracle.model
    metrics = model.build_metrics()
    root, rel = [], []
    for b in Batches(data, 32, 0, shuffle=False).iter_batches(0):
        out = oracle(b["image"], **oracle.forward_kwargs(b))
        model.update_metrics(metrics, out, b)
        pairs = match_people(out["logits"], model.normalise(out["joints"]), model.normalise(b["joints_3d"]),
                             b["person_mask"], 0.0, 1.0)  # fmt: skip
        for i, (q, p) in enumerate(pairs):
            pred, gt = out["joints"][i, q], b["joints_3d"][i, p]
            root.append((pred[:, 0] - gt[:, 0]).norm(dim=-1))
            rel.append(((pred - pred[:, :1]) - (gt - gt[:, :1])).norm(dim=-1).mean(-1))
    res = model.summarize_metrics(metrics)
    return {**res, "root": 1000 * float(torch.cat(root).mean()), "rootrel": 1000 * float(torch.cat(rel).mean())}


def fit(oracle: OracleMvP, data: dict, test: dict, args, seed: int, curve: list) -> float:
    """``task_fit.train`` that also scores ``test`` every ``--eval-every`` steps into ``curve`` (with the mean
    training loss since the last point); returns the training wall time (s, evaluations excluded)."""
    losses: list[float] = []

    def after_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step == args.steps:
            curve.append({"step": step, "loss": sum(losses) / len(losses)})
        elif args.eval_every and step % args.eval_every == 0:
            curve.append({"step": step, "loss": sum(losses) / len(losses), **evaluate(oracle, test)})
            losses.clear()
            print(" ", step, {k: round(v, 1) for k, v in curve[-1].items()}, flush=True)

    loader = Batches(data, args.batch, seed)
    return train(oracle, None, 0, args.lr, args.batch, seed, steps=args.steps, loader=loader, after_step=after_step)


def write(args, rows: dict, started: str, command: str, ref: tuple[list[str], dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = ("train_s", "s_per_step", *METRICS, *EXTRA)
    write_csv(out / f"mvp_oracle{args.tag}.csv", rows, columns, keys=("attention", "views"))
    lines = [
        "# MvP decoder with oracle 2-D evidence (ground-truth joint heatmaps in place of the backbone)",
        "",
        f"`{command}` · started {started} · torch {torch.__version__} · {args.threads} thread(s) on a shared 2-core "
        f"machine (other jobs running; times are indicative) · view features: the 15 true joint heatmaps of every "
        f"view (sigma {args.sigma} cells, all people's blobs per joint, occlusion ignored) at each of "
        f"{args.levels} level(s) {rows_sizes(args)} of a {args.size} px view with patch {args.patch}, a learnt 1x1 "
        f"convolution per level to width {args.dim} · decoder {args.depth} layers, {args.people} person x 15 joint "
        f"queries, projective fusion with coordinates: {bool(args.coords)} · train {args.n} scenes, {args.steps} "
        f"steps of {args.batch}, AdamW lr {args.lr} · test {args.test_n} scenes · seeds {args.seeds} (mean ± half "
        f"the range) · rig frame · 1-{args.max_people} people per scene in a 5 x 5 m room, metres.",
        "",
        "AP at MPJPE thresholds (%), recall at 500 mm (%), MPJPE of the true positives at 500 mm (mm); root / "
        "root-rel: pelvis error and root-relative MPJPE of the Hungarian-matched people (mm); s/step: loaded machine.",
        "",
        "| attention | views | AP25 | AP50 | AP100 | AP150 | AP250 | AP500 | recall@500 | MPJPE ↓ | root ↓ | "
        "root-rel ↓ | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (att, views), runs in rows.items():
        vals = [cell([r[k] for r in runs], 1) for k in (*METRICS, *EXTRA)]
        lines.append(f"| {att} | {views} | {' | '.join(vals)} | {cell([r['s_per_step'] for r in runs], 3)} |")
    lines += ref[0]
    (out / f"mvp_oracle{args.tag}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / f"mvp_oracle{args.tag}.png", ref[1])


def write_curves(args, curves: dict, ref: dict) -> None:
    """The learning curves (``--eval-every``) as CSV: one line per (attention, views, seed, step)."""
    keys = ("loss", *METRICS, *EXTRA)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"mvp_oracle{args.tag}_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["attention", "views", "seed", "step", *keys])
        for (att, views, seed), points in curves.items():
            for r in points:
                w.writerow([att, views, seed, int(r["step"]), *(round(r[k], 2) if k in r else "" for k in keys)])
    if any(len(points) > 1 for points in curves.values()):
        plot_curves(curves, Path(args.out) / f"mvp_oracle{args.tag}_curves.png", ref)


def plot_curves(curves: dict, path: Path, ref: dict) -> None:
    """The learning curves: AP250 / AP500 and the MPJPE, pelvis and root-relative errors against the step, one colour
    per attention, a line per seed; dashed: the oracle-pelvis + mean-pose predictor (its AP250 and MPJPE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    colours = {"projective": "C0", "dense": "C3"}
    oracle = next((v for k, v in ref.items() if "oracle" in k), None)
    for (att, views, seed), points in curves.items():
        points = [r for r in points if "mpjpe" in r]
        steps = [r["step"] for r in points]
        label = f"{att}, {views} views, seed {seed}"
        style = {"color": colours.get(att, "k"), "ls": "-" if seed == min(k[2] for k in curves) else "--"}
        axes[0].plot(steps, [r["ap250"] for r in points], marker="o", ms=3, label=f"AP250, {label}", **style)
        axes[0].plot(steps, [r["ap500"] for r in points], marker="x", ms=3, lw=0.8, label=f"AP500, {label}", **style)
        axes[1].plot(steps, [r["mpjpe"] for r in points], marker="o", ms=3, label=label, **style)
        axes[2].plot(steps, [r["root"] for r in points], marker="o", ms=3, label=f"root, {label}", **style)
        axes[2].plot(steps, [r["rootrel"] for r in points], marker="x", ms=3, lw=0.8, label=f"root-rel, {label}",
                     **style)  # fmt: skip
    if oracle is not None:
        axes[0].axhline(oracle["ap250"], color="k", ls=":", lw=1, label="AP250, oracle pelvis + mean pose")
        axes[1].axhline(oracle["mpjpe"], color="k", ls=":", lw=1, label="oracle pelvis + mean pose")
        axes[2].axhline(oracle["mpjpe"], color="k", ls=":", lw=1, label="mean pose (its root-rel)")
    titles = ("AP (%) ↑", "MPJPE of true positives @500 mm (mm) ↓", "matched people: pelvis / root-relative (mm) ↓")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows_sizes(args) -> str:
    m = args.size // args.patch
    return "(" + ", ".join(f"{s}x{s}" for s in [m, 2 * m, m // 2][: args.levels]) + ")"


def read_peaks(heat: torch.Tensor, uv: torch.Tensor, image_size: int, window: float) -> torch.Tensor:
    """Per-person joint pixels (B, V, P, J, 2) from heatmaps ``heat`` (B, V, J, h, w) with the true association: the
    peak cell within ``window`` cells of the true projection ``uv`` (B, V, P, J, 2) pixels, then the sub-cell
    maximum of a parabola through the log-heat of the peak and its two neighbours along x and along y (exact for a
    Gaussian blob; no shift at the map's border or where the log-heat is not concave)."""
    h, w = heat.shape[-2:]
    cell = uv * uv.new_tensor([w / image_size, h / image_size])  # map units, cell centres at i + 0.5
    gy, gx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    grid = torch.stack([gx, gy], -1).to(heat)  # (h, w, 2)
    dist = (grid - cell[..., None, None, :]).norm(dim=-1)  # (B, V, P, J, h, w)
    P = uv.shape[2]
    flat = heat[:, :, None].expand(-1, -1, P, -1, -1, -1).flatten(-2)  # (B, V, P, J, h * w)
    idx = torch.where(dist.flatten(-2) <= window, flat, -1.0).argmax(-1)
    iy, ix = idx // w, idx % w
    log = flat.clamp_min(1e-6).log()

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return log.gather(-1, (y.clamp(0, h - 1) * w + x.clamp(0, w - 1))[..., None])[..., 0]

    centre = at(iy, ix)
    shifts = []
    for lo, hi, inner in ((at(iy, ix - 1), at(iy, ix + 1), (ix > 0) & (ix < w - 1)),
                          (at(iy - 1, ix), at(iy + 1, ix), (iy > 0) & (iy < h - 1))):  # fmt: skip
        curve = lo - 2 * centre + hi
        ok = inner & (curve < -1e-6)
        shifts.append(torch.where(ok, 0.5 * (lo - hi) / curve.where(ok, -1.0), 0.0).clamp(-1, 1))
    peak = torch.stack([ix + 0.5 + shifts[0], iy + 0.5 + shifts[1]], -1).to(uv.dtype)
    return peak * uv.new_tensor([image_size / w, image_size / h])


def triangulate(uv: torch.Tensor, use: torch.Tensor, K: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """DLT: world points (B, P, J, 3) from pixels ``uv`` (B, V, P, J, 2) in the views where ``use`` (B, V, P, J);
    a point seen by fewer than 2 views is NaN."""
    proj = K @ invert_pose(cam_to_world)[..., :3, :]  # (B, V, 3, 4)
    P = proj[:, :, None, None]  # (B, V, 1, 1, 3, 4)
    rows = torch.stack([uv[..., 0, None] * P[..., 2, :] - P[..., 0, :], uv[..., 1, None] * P[..., 2, :] - P[..., 1, :]],
                       -2) * use[..., None, None]  # (B, V, P, J, 2, 4); unused views give zero rows  # fmt: skip
    A = rows.permute(0, 2, 3, 1, 4, 5).flatten(3, 4).double()  # (B, P, J, 2V, 4)
    X = torch.linalg.svd(A).Vh[..., -1, :]
    out = (X[..., :3] / X[..., 3:]).float()
    return torch.where((use.sum(1) >= 2)[..., None], out, float("nan"))


@torch.no_grad()
def triangulation_row(heat, data: dict, size: int, window: float) -> dict[str, float]:
    """Triangulated people vs the truth: MPJPE, pelvis and root-relative error (mm), the share of people under
    each MPJPE threshold (true association, every true person, no confidences) and the median 2-D error (px)."""
    gt, mask, K, c2w = data["joints_3d"], data["person_mask"], data["K"], data["cam_to_world"]
    cam = transform_points(invert_pose(c2w)[:, :, None, None], gt[:, None])  # (B, V, P, J, 3)
    uv, front = project(cam, K[:, :, None, None])
    inside = ((uv >= 0) & (uv <= size)).all(-1)
    use = front & (cam[..., 2] > 1e-6) & inside & mask[:, None, :, None]
    found = read_peaks(heat, uv, size, window)
    pts = triangulate(found, use, K, c2w)[mask]  # (people, J, 3)
    truth = gt[mask]
    err = (pts - truth).norm(dim=-1)  # NaN where fewer than 2 views see the joint
    ok = ~err.isnan()
    person = torch.where(ok, err, 0).sum(-1) / ok.sum(-1).clamp_min(1)
    root = (pts[:, 0] - truth[:, 0]).norm(dim=-1)
    rel = ((pts - pts[:, :1]) - (truth - truth[:, :1])).norm(dim=-1)
    rel_ok = ~rel.isnan()
    out = {"mpjpe": 1000 * float(person.mean()), "root": 1000 * float(root[~root.isnan()].mean()),
           "rootrel": 1000 * float(rel[rel_ok].mean()), "seen": 100 * float(ok.float().mean()),
           "px": float((found - uv).norm(dim=-1)[use].median())}  # fmt: skip
    for t in (25, 50, 100, 150, 250, 500):
        out[f"pct{t}"] = 100 * float((person < t / 1000).float().mean())
    return out


def run_triangulation(args, train_set: dict, test_set: dict, command: str, started: str) -> None:
    views = args.views[0]
    test = take_views(test_set, views)
    rows = []
    for lvl, name in ((0, "map"), (1, "2x finer")):
        if lvl < args.levels:
            hw = (args.size // args.patch * (2 if lvl else 1),) * 2
            true = joint_heatmaps(test["joints_3d"], test["person_mask"], test["K"], test["cam_to_world"], args.size,
                                  hw, args.sigma)  # fmt: skip
            res = triangulation_row(true, test, args.size, args.window)
            rows.append((f"true heatmaps ({name} level, {hw[0]}x{hw[1]})", "-", res))
    for seed in args.seeds:
        for steps in args.pretrain:
            torch.manual_seed(seed)
            model = create_task_model("mvp", BACKBONE, img_size=args.size, num_views=views, w_heatmap=1.0,
                                      dim=args.dim, levels=args.levels, num_people=args.people,
                                      backbone_kwargs={**BACKBONE_KW, "patch_size": args.patch})  # fmt: skip
            t0 = time.perf_counter()
            pretrain_heatmaps(model, Batches(take_views(train_set, views), args.batch, seed + 100), steps, args.lr)
            secs = time.perf_counter() - t0
            model.eval()
            heat = []
            with torch.no_grad():
                for b in Batches(test, 32, 0, shuffle=False).iter_batches(0):
                    B, V = b["image"].shape[:2]
                    levels = model.pyramid(model.forward_image(b["image"]).flatten(0, 1))
                    heat.append(model._heatmaps(levels).sigmoid().unflatten(0, (B, V)))
            hw = tuple(heat[0].shape[-2:])
            res = triangulation_row(torch.cat(heat), test, args.size, args.window)
            label = f"pretrained backbone, {steps} steps, seed {seed} ({hw[0]}x{hw[1]} heatmaps)"
            rows.append((label, f"{secs:.0f}", res))
            print(label, {k: round(v, 1) for k, v in res.items()}, flush=True)
            write_triangulation(args, rows, command, started)


def write_triangulation(args, rows: list, command: str, started: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("pct25", "pct50", "pct100", "pct150", "pct250", "pct500", "mpjpe", "root", "rootrel", "px", "seen")
    lines = [
        "# MvP's 2-D backbone by triangulation (true association): how good is the 2-D evidence?",
        "",
        f"`{command}` · started {started} · torch {torch.__version__} · {args.threads} thread(s), loaded machine · "
        f"backbone `{BACKBONE}` {BACKBONE_KW} patch {args.patch} at {args.size} px, pretrained on 2-D joint heatmaps "
        f"as in `benchmarks/mvp.py` (batch {args.batch}, AdamW lr {args.lr}, {args.n} training scenes, heatmaps on "
        f"the finest of {args.levels} level(s)) · {args.views[0]} views · {args.test_n} test scenes, rig frame · "
        f"read-out: peak within {args.window} cells of the true projection, log-parabola sub-cell peak, DLT over "
        "the views that see the joint.",
        "",
        "<t mm: % of true people whose triangulated MPJPE is below t (every person, no detection or confidence: "
        "not AP); MPJPE / root / root-rel in mm; 2-D px: median distance of the read-out from the true projection "
        f"(pixels of the {args.size} px view); seen: % of joints in >= 2 views; pretrain s: loaded machine.",
        "",
        "| heatmaps | <25 | <50 | <100 | <150 | <250 | <500 | MPJPE | root | root-rel | 2-D px | seen % | pretrain s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, secs, r in rows:
        lines.append(f"| {label} | {' | '.join(f'{r[k]:.1f}' for k in keys)} | {secs} |")
    (out / "mvp_oracle_triangulation.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8, help="sets the feature levels' sizes (the backbone is not run)")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--test-n", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--views", type=int, nargs="+", default=[3])
    p.add_argument("--attention", nargs="+", default=["projective", "dense"], choices=["projective", "dense"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--coords", type=int, default=1)
    p.add_argument("--people", type=int, default=10)
    p.add_argument("--max-people", type=int, default=3, help="people per scene: 1..max (an easier regime: 1)")
    p.add_argument("--sigma", type=float, default=1.0, help="heatmap Gaussian sigma in cells of each level")
    p.add_argument("--eval-every", type=int, default=0, help="score the test scenes every N steps (a curve)")
    p.add_argument("--triangulate", action="store_true", help="the 2-D backbone's triangulation diagnostic")
    p.add_argument("--pretrain", type=int, nargs="+", default=[300], help="--triangulate: heatmap pretraining steps")
    p.add_argument("--window", type=float, default=2.0, help="--triangulate: cells around the true projection")
    p.add_argument("--append", action="store_true", help="keep the rows and curves of the CSVs already in --out")
    p.add_argument("--tag", default="", help="suffix of the output files' names (e.g. _1person)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/mvp_oracle.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    train_set, test_set = (rig_frame(load(s, n, args.size, k, args.max_people))
                           for s, n, k in (("train", args.n, 0), ("test", args.test_n, 1)))  # fmt: skip
    if args.triangulate:
        run_triangulation(args, train_set, test_set, command, started)
        return
    ref = reference(train_set, test_set, args.size)
    rows: dict = {}
    curves: dict = {}
    if args.append:  # an earlier invocation's rows and curves (other seeds), its command kept in the header
        rows = read_csv(Path(args.out) / f"mvp_oracle{args.tag}.csv")
        with open(Path(args.out) / f"mvp_oracle{args.tag}_curves.csv", newline="") as f:
            for r in csv.DictReader(f):
                key = (r.pop("attention"), int(r.pop("views")), int(r.pop("seed")))
                curves.setdefault(key, []).append({k: float(v) for k, v in r.items() if v != ""})
        earlier = (Path(args.out) / f"mvp_oracle{args.tag}.md").read_text().splitlines()[2]
        command = earlier[1:].split("` · started")[0] + "` then `" + command
        started = earlier.split("started ")[1].split(" ·")[0]
    for seed in args.seeds:
        for views in args.views:
            for att in args.attention:
                torch.manual_seed(seed)
                extra = {"coords": args.coords} if att == "projective" else {}
                model = create_task_model("mvp", BACKBONE, img_size=args.size, num_views=views, attention=att,
                                          dim=args.dim, depth=args.depth, levels=args.levels, num_people=args.people,
                                          backbone_kwargs={**BACKBONE_KW, "patch_size": args.patch},
                                          **extra)  # fmt: skip
                oracle = OracleMvP(model, args.sigma)
                test = take_views(test_set, views)
                curve: list = []
                train_s = fit(oracle, take_views(train_set, views), test, args, seed, curve)
                res = evaluate(oracle, test)
                curve[-1] |= res
                curves[(att, views, seed)] = curve
                write_curves(args, curves, ref[1])
                row = {"seed": seed, "train_s": round(train_s, 1), "s_per_step": train_s / args.steps, **res}
                rows.setdefault((att, views), []).append(row)
                print(att, views, seed, {k: round(v, 1) for k, v in row.items()}, flush=True)
                write(args, rows, started, command, ref)


if __name__ == "__main__":
    main()
