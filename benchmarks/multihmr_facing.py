"""Why Multi-HMR's facing is not learnt here: can a small CNN, a plain ViT or a ViT with a conv stem read a stick
figure's facing from a crop of it?

The people of ``stick_humans`` (96 px, FoV 50-70 deg, the scenes ``benchmarks/multihmr.py`` uses) are cut out as
32 x 32 crops (a square around their 2-D joints, 1.3x + 4 px), and each model regresses the direction the body faces
in the camera's x-z plane (a unit 2-vector; loss 1 - cos). Rows: a 4-layer CNN (3x3 convolutions, batch norm, ReLU,
global average pool), ``vit_nano_patch4_28`` from scratch (patch 4: 8 x 8 tokens, class token read out) and the same
ViT with ``PlainViTTrunk(conv_stem=True)``, all AdamW with a warmup-cosine schedule, batch 64. Metrics on the test
people: mean angle error (90 deg is chance) and front/back flips (error over 90 deg, % of people; chance 50).
Writes ``benchmarks/results/multihmr_facing.{csv,md,png}``.

    .venv/bin/python benchmarks/multihmr_facing.py --threads 1 --rows cnn vit_conv_stem --out /tmp/f1   # + --rows vit
    .venv/bin/python benchmarks/multihmr_facing.py --n 32 --test-n 8 --steps 4 --out /tmp/f   # a smoke run
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from task_fit import warmup_cosine, write_csv
from vitlab.data.synthetic.humans_sets import generate_stick_humans
from vitlab.tasks._backbone import PlainViTTrunk
from vitlab.tasks.pose3d import batch_from_humans

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {"cnn": "4-layer CNN", "vit": "ViT (patchify)", "vit_conv_stem": "ViT (conv stem)"}
CROP = 32


def facing_crops(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised 32 x 32 crops (N, 3, 32, 32) of every person present and their facing (N, 2): the body's forward
    axis in the camera frame, its (x, z) part made unit length."""
    data = generate_stick_humans(split, n=n, seed=seed, views=1, size=96, fov=(50.0, 70.0))
    raw = data.collate([data[i] for i in range(len(data))])
    batch = batch_from_humans(raw, data.mean, data.std)
    b, p = batch["person_mask"].nonzero(as_tuple=True)
    uv = raw["joints_2d"][:, 0][b, p].nan_to_num(48.0)  # (N, 15, 2); a joint behind the camera sits at the centre
    lo, hi = uv.amin(1), uv.amax(1)
    centre, side = (lo + hi) / 2, (hi - lo).amax(-1) * 1.3 + 4
    S = batch["image"].shape[-1]
    theta = torch.zeros(len(b), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side / S
    theta[:, :, 2] = 2 * centre / S - 1
    grid = F.affine_grid(theta, (len(b), 3, CROP, CROP), align_corners=False)
    crops = F.grid_sample(batch["image"][b], grid, align_corners=False)
    forward = batch["orient"][b, p][:, [0, 2], 0]
    return crops, F.normalize(forward, dim=-1)


class SmallCNN(nn.Sequential):
    def __init__(self, width: int = 128) -> None:
        chs = (3, width // 4, width // 2, width, width)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chs[i], chs[i + 1], 3, 1 if i == 0 else 2, 1), nn.BatchNorm2d(chs[i + 1]), nn.ReLU()]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


class TrunkRegressor(nn.Module):
    """A plain ViT trunk, its class token normed and read out linearly."""

    def __init__(self, conv_stem: bool) -> None:
        super().__init__()
        self.trunk = PlainViTTrunk("vit_nano_patch4_28", in_chans=3, img_size=CROP, conv_stem=conv_stem)
        self.norm, self.head = nn.LayerNorm(self.trunk.embed_dim), nn.Linear(self.trunk.embed_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.trunk.embed(x)
        return self.head(self.norm(self.trunk.run_blocks(tokens, grid, 0, self.trunk.depth)[:, 0]))


def angle_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean angle error (deg) and flips (% over 90 deg) of ``model`` on crops ``x`` with facings ``y``."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([F.normalize(model(c), dim=-1) for c in x.split(256)])
    model.train()
    err = torch.acos((pred * y).sum(-1).clamp(-1, 1)).rad2deg()
    return float(err.mean()), float((err > 90).float().mean() * 100)


def fit(row: str, train, test, args, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = SmallCNN() if row == "cnn" else TrunkRegressor(conv_stem=row == "vit_conv_stem")
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.05)
    schedule = warmup_cosine(opt, args.steps, max(1, args.steps // 10))
    g = torch.Generator().manual_seed(seed)
    (x, y), points, t0 = train, [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (args.batch,), generator=g)
        loss = (1 - (F.normalize(model(x[idx]), dim=-1) * y[idx]).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            train_err = angle_errors(model, x[:512], y[:512])[0]
            err, flips = angle_errors(model, *test)
            points.append({"seed": seed, "step": step, "train_err": round(train_err, 1), "test_err": round(err, 1),
                           "flips": round(flips, 1), "s": round(time.perf_counter() - t0)})  # fmt: skip
            print(row, points[-1], flush=True)
    return points


def write(args, rows: dict, started: str, command: str, counts: tuple[int, int]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {(ROWS[r], p["step"]): [p] for r, pts in rows.items() for p in pts}
    write_csv(out / "multihmr_facing.csv", flat, ("train_err", "test_err", "flips", "s"), keys=("model", "step"))
    lines = [
        "# Reading a stick figure's facing from a crop: CNN vs ViT from scratch",
        "",
        f"`{command}` · started {started} · torch {torch.__version__} · {counts[0]} training people "
        f"({args.n} scenes), {counts[1]} test people · {args.steps} steps of {args.batch}, lr {args.lr:g} · "
        f"seed {args.seed} · time: loaded wall seconds (1 thread, other jobs beside), not a speed comparison.",
        "",
        "Angle error between the predicted and true facing in the camera's x-z plane (deg; 90 is chance), on 512 "
        "training people and on the test people; flips: test people with an error over 90 deg (%, chance 50).",
        "",
        "| model | step | train err ↓ | test err ↓ | flips % ↓ | s |",
        "|---|---|---|---|---|---|",
    ]
    for (model, step), (p,) in flat.items():
        lines.append(f"| {model} | {step} | {p['train_err']} | {p['test_err']} | {p['flips']} | {p['s']} |")
    (out / "multihmr_facing.md").write_text("\n".join(lines) + "\n")
    plot(flat, out / "multihmr_facing.png")


def plot(flat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for model in dict.fromkeys(m for m, _ in flat):
        pts = [(s, p[0]["test_err"]) for (m, s), p in flat.items() if m == model]
        ax.plot(*zip(*pts, strict=True), marker="o", label=model)
    ax.axhline(90, color="k", linestyle="--", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("test facing error (deg)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=8192, help="training scenes (1-3 people each)")
    p.add_argument("--test-n", type=int, default=192)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/multihmr_facing.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    train, test = facing_crops("train", args.n, 0), facing_crops("test", args.test_n, 1)
    rows: dict = {}
    for row in args.rows:
        rows[row] = fit(row, train, test, args, args.seed)
        write(args, rows, started, command, (len(train[0]), len(test[0])))


if __name__ == "__main__":
    main()
