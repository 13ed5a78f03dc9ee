"""UniFormerV2 (paper 34, arXiv:2211.09552) on camera-motion videos: frame averaging, + global UniBlocks,
+ local MHRA, both, on a motion-centred label ("motion") and an appearance-centred one ("identity").

Every row trains the same small image ViT from scratch (``vit_micro_patch4_28`` narrowed by ``--embed-dim``,
``--depth`` and ``--heads``) inside the ``uniformerv2`` task model, with the same batches and steps:
- frame averaging: ``global_layers=0, local_mhra="none"`` (the mean of the frames' CLS tokens: order-blind);
- + global UniBlocks: the video query over the last ``--global-layers`` blocks (the Kinetics design);
- + local MHRA: ``local_mhra="double"`` in every block (the Something-Something design), no global blocks;
- both: double local MHRA and the global blocks;
- two controls on the fusion (``--rows``): frame averaging and + local MHRA with each frame pooled by the mean of
  its patch tokens (``frame_pool="avg"``) instead of its CLS token.
Columns: top-1 on the test clips; for "motion" also the reversal-pair accuracy (test clips of the ten paired classes:
how often the true class's logit beats its time-reversed partner's, chance 50%); training seconds per epoch;
parameters. Writes ``benchmarks/results/uniformerv2.{csv,md,png}``, rewritten after every row.

    nice -n 5 .venv/bin/python benchmarks/uniformerv2.py --threads 1 --epochs 4 --seeds 0
    .venv/bin/python benchmarks/uniformerv2.py --n 64 --test-n 32 --epochs 0.2 --out /tmp/u2   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from task_fit import cell, train, write_csv  # shared loop and table helpers (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data.loader import BatchLoader
from vitlab.data.synthetic import make_dataset
from vitlab.tasks import create_task_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BACKBONE = "vit_micro_patch4_28"
ROWS = {
    "frame averaging": {"local_mhra": "none", "global_layers": 0},
    "+ global UniBlocks": {"local_mhra": "none"},
    "+ local MHRA (double)": {"local_mhra": "double", "global_layers": 0},
    "both": {"local_mhra": "double"},
    # a control on the fusion: the frames pooled by their patch-token mean instead of their CLS token
    "frame averaging, patch-mean frames": {"local_mhra": "none", "global_layers": 0, "frame_pool": "avg"},
    "+ local MHRA (double), patch-mean frames": {"local_mhra": "double", "global_layers": 0, "frame_pool": "avg"},
}
MAIN_ROWS = list(ROWS)[:4]
LABELS = ("motion", "identity")
COLUMNS = ("top1", "pair_acc", "epoch_s", "params_m")


def build(label: str, kw: dict, args, seed: int):
    torch.manual_seed(seed)
    kw = {"global_layers": args.global_layers, **kw}
    net = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads}
    return create_task_model(
        "uniformerv2", BACKBONE, img_size=args.img, num_frames=args.frames, label=label, backbone_kwargs=net, **kw
    )


@torch.no_grad()
def evaluate(model, data, label: str) -> tuple[float, float | None]:
    """Top-1 (%) on ``label``; for "motion" also the reversal-pair accuracy (%), else None."""
    model.eval()
    logits, target = [], []
    for b in BatchLoader(data, 100, shuffle=False).iter_batches(0):
        logits.append(model(b["image"]))
        target.append(b[label])
    logits, target = torch.cat(logits), torch.cat(target)
    top1 = 100 * float((logits.argmax(1) == target).float().mean())
    if label != "motion":
        return top1, None
    partner = torch.tensor(data.reverse_of)[target]
    paired = (partner >= 0) & (partner != target)
    rows = paired.nonzero().squeeze(1)
    wins = logits[rows, target[rows]] > logits[rows, partner[rows]]
    return top1, 100 * float(wins.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500, help="training clips")
    ap.add_argument("--test-n", type=int, default=500, help="test clips")
    ap.add_argument("--img", type=int, default=28)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--global-layers", type=int, default=2, help="the last n blocks feed the video query")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--labels", nargs="+", default=list(LABELS), choices=LABELS)
    ap.add_argument("--rows", nargs="+", default=MAIN_ROWS, choices=list(ROWS), help="rows to run; the others "
                    "come from the existing CSV")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = read_csv(args.out / "uniformerv2.csv")
    started = datetime.now(timezone.utc)
    for seed in args.seeds:
        kw = {"seed": seed, "frames": args.frames, "size": args.img}
        train_set = make_dataset("camera_motion_videos", split="train", n=args.n, **kw)
        test_set = make_dataset("camera_motion_videos", split="test", n=args.test_n, **kw)
        test_set.mean, test_set.std = train_set.mean, train_set.std
        for label in args.labels:
            for name in args.rows:
                task_kw = ROWS[name]
                model = build(label, task_kw, args, seed)
                secs = train(model, train_set, args.epochs, args.lr, args.batch, seed)
                top1, pair = evaluate(model, test_set, label)
                row = {"seed": seed, "top1": top1, "pair_acc": pair, "epoch_s": secs / args.epochs,
                       "params_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip
                key = (label, name)
                rows[key] = [r for r in rows.get(key, []) if r["seed"] != seed] + [row]
                print(f"seed {seed} {label} {name}: " + ", ".join(f"{k}={row[k]}" for k in COLUMNS), flush=True)
                write(rows, args, started)


def read_csv(path: Path) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = {}
    if path.exists():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                row = {"seed": int(r["seed"])} | {k: float(r[k]) if r[k] else None for k in COLUMNS}
                rows.setdefault((r["label"], r["row"]), []).append(row)
    return rows


def write(rows: dict[tuple[str, str], list[dict]], args, started: datetime) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "uniformerv2.csv", rows, COLUMNS, keys=("label", "row"))
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    lines = [
        "# UniFormerV2 (paper 34) on camera-motion videos: frame averaging, + global UniBlocks, + local MHRA, both",
        "",
        f"Data: `camera_motion_videos`, {args.n} training / {args.test_n} test clips of {args.frames} frames at "
        f"{args.img} px (data seed = run seed), labels `motion` (11 classes: static + 5 time-reversed pairs; chance "
        "9.1% top-1, 50% pair accuracy) and `identity` (the centre item's Fashion-MNIST class, 10 classes; chance "
        f"10%). Model `uniformerv2` on `{BACKBONE}` narrowed to {args.embed_dim} wide, {args.depth} blocks, "
        f"{args.heads} heads, trained from scratch; global UniBlocks on the last {args.global_layers} blocks; local "
        "MHRA 'double' (before attention and MLP of every block). Every row: same batches, "
        f"{args.epochs:g} epochs, batch {args.batch}, AdamW lr {args.lr} (wd 0.05, warmup 10% + cosine, clip 1). "
        f"Seeds {seeds}" + (" (one seed: differences of a few points may be noise)" if len(seeds) == 1
                            else ": mean ± half the range") + ". "
        "Pair acc.: on test clips of the ten paired motion classes, how often the true class's logit beats its "
        f"time reversal's. Training time on {args.threads} thread(s), machine shared with other jobs. "
        f"Machine: {machine}. Command: `python benchmarks/uniformerv2.py {' '.join(sys.argv[1:])}` "
        f"(started {started:%Y-%m-%d %H:%M} UTC, table written {time.strftime('%H:%M', time.gmtime())} UTC).",
        "",
        "| row | motion top-1 % | motion pair acc. % | identity top-1 % | train s/epoch (motion) | params M |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name in ROWS:
        m, i = rows.get(("motion", name), []), rows.get(("identity", name), [])
        if not m and not i:
            continue
        cells = [cell([r["top1"] for r in m]), cell([r["pair_acc"] for r in m]), cell([r["top1"] for r in i]),
                 cell([r["epoch_s"] for r in m or i], 0), cell([r["params_m"] for r in m or i], 3)]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path = args.out / "uniformerv2.md"
    reading = ""
    if path.exists():
        text = path.read_text()
        k = text.find("\n## Reading")
        reading = text[k:] if k >= 0 else ""
    path.write_text("\n".join(lines) + "\n" + reading)
    plot(rows, args.out / "uniformerv2.png")


def plot(rows: dict[tuple[str, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("motion", "top1", "motion top-1 %", 100 / 11), ("motion", "pair_acc", "motion pair acc. %", 50.0),
              ("identity", "top1", "identity top-1 %", 10.0)]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(ROWS)
    for ax, (label, key, title, chance) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            vals = [r[key] for r in rows.get((label, name), []) if r[key] is not None]
            if not vals:
                continue
            m = statistics.fmean(vals)
            err = (max(vals) - min(vals)) / 2
            ax.barh(i, m, xerr=err, color=f"C{i}")
            ax.text(m, i, f" {m:.1f}", va="center", fontsize=8)
        ax.axvline(chance, color="k", ls="--", lw=0.8)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{title} (dashed: chance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
