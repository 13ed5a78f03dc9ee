"""Multi-HMR (paper 35) on stick-figure humans: does the camera-ray token encoding help on unseen intrinsics?

One view, 1-3 stick figures per image (``stick_humans``; SMPL-X is licence-gated, the 15-joint stick model replaces
it). Train on fields of view 50-70 deg; test on the seen range and on unseen ones (80-90 and 35-45 deg). The room
camera backs off as the field narrows (``humans.sample_room_cameras``), so apparent size alone does not give depth.
Rows (``--rows``): the task model ``multihmr`` without / with the ray embedding, the MLP head instead of the Human
Prediction Head, the ray-embedded HPH without the 2-D reprojection loss (``w_reproj=0``) or on a conv stem
(``ray_conv``, ``noray_conv``: ``conv_stem=True``), and ``rot*``: the paper's rotation parametrisation
(``pose="rotations"``) instead of direct joints. Every model trains the same steps on the same batches
(teacher-forced person queries) and is evaluated on detections (threshold + 3x3 NMS). Metrics: detection F1 (2-D
radius img/8), root-relative MPJPE, PA-MPJPE, root |z| error and MRPE (mm, matched people), against trivial floors
(mean pose, constant depth); with ground-truth queries the MPJPE, the facing (yaw) error about the vertical and the
MPJPE after the best turn about the vertical (``multihmr_parts.yaw_errors``), which separate the global orientation
from the articulation. ``--size 96 --patch 8`` keeps the 12 x 12 tokens of 48 px at patch 4 with people twice as
large in pixels. Writes ``benchmarks/results/multihmr.{csv,md,png}`` (``--name``: another file stem).

    .venv/bin/python benchmarks/multihmr.py --threads 1                      # the table (see the results file)
    .venv/bin/python benchmarks/multihmr.py --n 64 --test-n 32 --steps 5 --out /tmp/mh   # a smoke run
    .venv/bin/python benchmarks/multihmr.py --size 96 --merge /tmp/a/multihmr.csv /tmp/b/multihmr.csv   # join runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from task_fit import cell, read_csv, train, write_csv  # shared loop and table helpers (this directory is on sys.path)
from vitlab.data.synthetic.humans_sets import GENERATOR_VERSION, generate_stick_humans
from vitlab.layers.camera import axis_angle_to_matrix
from vitlab.tasks import create_task_model
from vitlab.tasks.pose3d import batch_from_humans
from vitlab.tasks.pose3d.multihmr import depth_to_nearness, nearness_to_depth
from vitlab.tasks.pose3d.multihmr_parts import person_errors, yaw_errors

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_FOV = (50.0, 70.0)
TESTS = {"seen 50-70": (50.0, 70.0), "wide 80-90": (80.0, 90.0), "narrow 35-45": (35.0, 45.0)}
METRICS = ("f1", "mpjpe", "pa_mpjpe", "depth_err", "mrpe", "gt_mpjpe", "yaw_err", "mpjpe_yaw")
ROWS = {
    "noray": ("no ray embedding (HPH)", {"ray_embed": False}),
    "ray": ("ray embedding (HPH)", {"ray_embed": True}),
    "mlp": ("ray embedding (MLP head)", {"ray_embed": True, "head": "mlp"}),
    "noreproj": ("ray embedding (HPH), no 2-D loss", {"ray_embed": True, "w_reproj": 0.0}),
    "ray_conv": ("ray embedding (HPH), conv stem", {"ray_embed": True, "conv_stem": True}),
    "noray_conv": ("no ray embedding (HPH), conv stem", {"ray_embed": False, "conv_stem": True}),
    "rot": ("rotations, ray embedding (HPH)", {"ray_embed": True, "pose": "rotations"}),
    "rot_noray": ("rotations, no ray embedding (HPH)", {"ray_embed": False, "pose": "rotations"}),
    "rot_mlp": ("rotations, ray embedding (MLP head)", {"ray_embed": True, "head": "mlp", "pose": "rotations"}),
}


class Batches:
    """Shuffled slices of one pre-built multihmr batch dict (the ``train`` loop's loader protocol)."""

    def __init__(self, data: dict, batch: int, seed: int, shuffle: bool = True) -> None:
        self.data, self.batch, self.seed, self.shuffle = data, batch, seed, shuffle
        self.n = len(data["image"])

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def iter_batches(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        for i in range(0, self.n, self.batch):
            idx = order[i : i + self.batch]
            yield {k: v[idx] for k, v in self.data.items()}


def load(split: str, n: int, size: int, fov: tuple[float, float], seed: int) -> dict:
    """A multihmr batch dict of the whole set, plus ``up`` (n, 3): the world's up axis in the camera frame."""
    data = generate_stick_humans(split, n=n, seed=seed, views=1, size=size, fov=fov)
    raw = data.collate([data[i] for i in range(len(data))])
    return batch_from_humans(raw, data.mean, data.std) | {"up": raw["cam_to_world"][:, 0, 2, :3]}


@torch.no_grad()
def evaluate(model, data: dict) -> dict[str, float]:
    """The model's metrics on detections, then with ground-truth queries (teacher forcing, every person present):
    ``gt_mpjpe`` (mm), ``yaw_err`` (deg, mean; 90 is chance) and ``mpjpe_yaw`` (mm, after the best turn about the
    vertical), which separate the facing from the rest of the pose."""
    model.eval()
    metrics = model.build_metrics()
    preds, truths, ups = [], [], []
    for b in Batches(data, 64, 0, shuffle=False).iter_batches(0):
        model.update_metrics(metrics, model(b["image"], K=b["K"]), b)  # detections, no teacher forcing
        out = model(b["image"], K=b["K"], centre_2d=b["centre_2d"], person_mask=b["person_mask"])
        m, j = b["person_mask"], b["joints_cam"]
        preds.append(out["gt_joints_rel"][m])
        truths.append((j - j[:, :, :1])[m])
        ups.append(b["up"][:, None].expand(-1, m.shape[1], -1)[m])
    pred, truth = torch.cat(preds), torch.cat(truths)
    yaw = yaw_errors(pred, truth, torch.cat(ups))
    return model.summarize_metrics(metrics) | {
        "gt_mpjpe": 1000 * float((pred - truth).norm(dim=-1).mean()),
        "yaw_err": float(yaw["yaw"].rad2deg().mean()),
        "mpjpe_yaw": 1000 * float(yaw["mpjpe_yaw"].mean()),
    }


def _upright(people: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Root-relative people (N, 15, 3) turned so that their frame's ``up`` (N, 3) becomes +z (the shortest turn)."""
    z = torch.tensor([0.0, 0.0, 1.0]).expand_as(up)
    axis = torch.cross(up, z, dim=-1)
    angle = torch.atan2(axis.norm(dim=-1), (up * z).sum(-1))
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return people @ axis_angle_to_matrix(axis * angle[:, None]).transpose(-1, -2)


def facing_oracle_floor(train_people: torch.Tensor, train_up: torch.Tensor, test_people, test_up) -> float:
    """MPJPE (mm) of the mean *articulation* given the true facing: the training people made upright and turned
    onto a common facing (re-fitted to their mean three times), that mean turned to each upright test person's best fit.
    The floor for the "MPJPE after best turn" column (the plain mean pose is a blurred, nearly turn-free body)."""
    z = torch.tensor([[0.0, 0.0, 1.0]])
    people = _upright(train_people, train_up)
    mean = people[0]
    for _ in range(3):
        mean = yaw_errors(people, mean.expand_as(people), z.expand(len(people), 3))["aligned"].mean(0)
    test = _upright(test_people, test_up)
    return 1000 * float(yaw_errors(mean.expand_as(test), test, z.expand(len(test), 3))["mpjpe_yaw"].mean())


def reference(train: dict, tests: dict, size: int, floors: dict | None = None) -> list[str]:
    """Markdown lines of trivial predictors fitted on the training people (ground-truth people, no detection):
    the mean root-relative pose, a constant focal-normalised nearness (turned into metres with each test K) and a
    constant depth. ``floors``, when given, receives the mean-pose MPJPE / PA-MPJPE per test range (for the plot)."""
    m, j = train["person_mask"], train["joints_cam"]
    mean_rel = (j - j[:, :, :1])[m].mean(0)
    train_up = train["up"][:, None].expand(-1, m.shape[1], -1)[m]
    f = train["K"][:, None, 0, 0].expand_as(m)[m]
    n_mean = depth_to_nearness(j[:, :, 0, 2][m], f, float(size)).mean()
    z_mean = j[:, :, 0, 2][m].mean()
    lines = ["", "Reference (trivial predictors fitted on the training people, evaluated on all test people):", "",
             "| test FoV | mean-pose MPJPE | mean-pose PA-MPJPE | mean-pose MPJPE after best turn | "
             "mean articulation, true facing (MPJPE after best turn) | "
             "constant nearness root depth err | constant depth root depth err |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, te in tests.items():
        mk, jt = te["person_mask"], te["joints_cam"]
        people = (jt - jt[:, :, :1])[mk]
        mpjpe = 1000 * float((people - mean_rel).norm(dim=-1).mean())
        pa = statistics.fmean(person_errors(mean_rel, g, g[0], g[0])["pa_mpjpe"] for g in people)
        up = te["up"][:, None].expand(-1, mk.shape[1], -1)[mk]
        turned = 1000 * float(yaw_errors(mean_rel.expand_as(people), people, up)["mpjpe_yaw"].mean())
        oracle = facing_oracle_floor((j - j[:, :, :1])[m], train_up, people, up)
        if floors is not None:
            floors[name] = {"mpjpe": mpjpe, "pa_mpjpe": pa}
        z, ft = jt[:, :, 0, 2][mk], te["K"][:, None, 0, 0].expand_as(mk)[mk]
        dn = 1000 * float((nearness_to_depth(n_mean, ft, float(size)) - z).abs().mean())
        dz = 1000 * float((z_mean - z).abs().mean())
        lines.append(f"| {name} | {mpjpe:.1f} | {pa:.1f} | {turned:.1f} | {oracle:.1f} | {dn:.1f} | {dz:.1f} |")
    return lines


def write(args, rows: dict, started: str, command: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{args.name}.csv", rows, ("train_s", *METRICS, "matched"), keys=("model", "test"))
    lines = [
        "# Multi-HMR on stick-figure humans: ray embedding on unseen fields of view",
        "",
        f"`{command}` · started {started} · torch {torch.__version__} · backbone `{args.backbone}`"
        f"{f' with patch {args.patch}' if args.patch else ''} at {args.size} px · "
        f"train {args.n} scenes (FoV {TRAIN_FOV[0]:.0f}-{TRAIN_FOV[1]:.0f} deg), {args.steps} steps of {args.batch}, "
        f"lr {args.lr:g}{f' · task kwargs {args.model_kw}' if args.model_kw != '{}' else ''} · "
        f"test {args.test_n} scenes per FoV range · seeds {args.seeds} (mean ± half the range) · "
        f"stick_humans generator version {GENERATOR_VERSION} (hair and a darker shirt back: front/back cues) · "
        "1-3 people per image; SMPL-X is licence-gated, a 15-joint stick model replaces it.",
        "",
        "Detection F1 (%, radius img/8), root-relative MPJPE, PA-MPJPE (after a similarity Procrustes fit), root |z| "
        "error and MRPE (mm, on matched people). "
        "Depth is focal-normalised log-nearness, so every row uses K to turn it into metres; the ray embedding "
        'adds K to the tokens; rows train with the 2-D reprojection loss (w_reproj = 5) unless marked "no 2-D loss". '
        "GT-query MPJPE, yaw err and MPJPE after best turn: all test people, queried at their true centres "
        "(teacher forcing); yaw err is the mean angle about the vertical between the predicted and true left "
        "directions (hips + shoulders; 90 deg is chance), the last the MPJPE after the best turn about the vertical. "
        "Train time: 1 thread on a 2-core machine shared with 4 other agents' jobs (loaded wall time, not a speed "
        "comparison).",
        "",
        "| model | test FoV | F1 ↑ | MPJPE ↓ | PA-MPJPE ↓ | root depth err ↓ | MRPE ↓ | GT-query MPJPE ↓ | "
        "yaw err (deg) ↓ | MPJPE after best turn ↓ | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, test), runs in rows.items():
        vals = [cell([r[k] for r in runs], 1) for k in METRICS]
        lines.append(f"| {model} | {test} | {' | '.join(vals)} | {cell([r['train_s'] for r in runs], 0)} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / f"{args.name}.png", getattr(args, "floors", {}))


def plot(rows: dict, path: Path, floors: dict) -> None:
    """Bars per model and test range: MPJPE, PA-MPJPE (the mean-pose floors dashed) and MRPE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(m for m, _ in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("mpjpe", "root-relative MPJPE (mm)"), ("pa_mpjpe", "PA-MPJPE (mm)"), ("mrpe", "MRPE (mm)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            xs, ys = [], []
            for j, t in enumerate(TESTS):
                if (m, t) in rows:
                    xs.append(j + i * width)
                    ys.append(sum(r[key] for r in rows[m, t]) / len(rows[m, t]))
            ax.bar(xs, ys, width, label=m)
        for j, t in enumerate(TESTS):
            if key in floors.get(t, {}):
                ax.hlines(floors[t][key], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--",
                          label="mean pose" if j == 0 else None)  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(TESTS))], list(TESTS))
        ax.set_title(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(models) + 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--test-n", type=int, default=192)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backbone", default="vit_micro_patch4_28")
    p.add_argument("--patch", type=int, default=0, help="override the backbone's patch size (0: its own)")
    p.add_argument("--model-kw", default="{}", help="JSON task kwargs for every row, e.g. '{\"w_joints\": 20}'")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=["noray", "ray", "mlp", "noreproj"])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="multihmr", help="file stem of the tables and plot")
    p.add_argument("--reference-only", action="store_true", help="append the trivial predictors to the markdown")
    p.add_argument("--merge", nargs="+", default=[], help="CSVs of runs made apart: write their rows as one table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/multihmr.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    train_set = load("train", args.n, args.size, TRAIN_FOV, 0)
    tests = {name: load("test", args.test_n, args.size, fov, 1) for name, fov in TESTS.items()}
    args.floors = {}
    ref = reference(train_set, tests, args.size, args.floors)
    print("\n".join(ref), flush=True)
    if args.reference_only:
        md = Path(args.out) / f"{args.name}.md"
        md.write_text(md.read_text() + "\n".join(ref) + "\n")
        return
    rows: dict = {}
    for path in args.merge:  # rows of runs made apart (same settings), joined in the order given
        for key, runs in read_csv(path, ("train_s", *METRICS, "matched"), keys=("model", "test")).items():
            rows.setdefault(key, []).extend(runs)
    if args.merge:
        write(args, rows, started, command)
        md = Path(args.out) / f"{args.name}.md"
        md.write_text(md.read_text() + "\n".join(ref) + "\n")
        return
    for seed in args.seeds:
        for label, kw in (ROWS[r] for r in args.rows):
            torch.manual_seed(seed)
            kw = {**json.loads(args.model_kw), **kw}
            if args.patch:
                kw["backbone_kwargs"] = {"patch_size": args.patch}
            model = create_task_model("multihmr", args.backbone, img_size=args.size, **kw)
            t0 = time.perf_counter()
            train(model, None, 0, args.lr, args.batch, seed, steps=args.steps,
                  loader=Batches(train_set, args.batch, seed))  # fmt: skip
            train_s = time.perf_counter() - t0
            for test, data in tests.items():
                res = evaluate(model, data)
                rows.setdefault((label, test), []).append({"seed": seed, "train_s": round(train_s, 1), **res})
                print(label, test, {k: round(v, 1) for k, v in res.items()}, flush=True)
            write(args, rows, started, command)
            md = Path(args.out) / f"{args.name}.md"
            md.write_text(md.read_text() + "\n".join(ref) + "\n")


if __name__ == "__main__":
    main()
