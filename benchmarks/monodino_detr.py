"""MonoDINO-DETR's depth cues on FMNIST-Scenes-3D: a DETR-3D baseline, then + depth head, + depth-aware attention,
+ geometric depth (the full model).

The paper freezes Depth-Anything-V2's DINOv2 and DPT head; those weights cannot be downloaded here, so **stage 1**
trains the backbone and the depth branch (DPT relative depth with MiDaS's scale-and-shift-invariant loss on inverse
depth, and the LID depth-map focal loss) on the training scenes' depth maps, once per seed. **Stage 2** builds each
row with ``freeze_backbone=True``, loads the stage-1 backbone (and, where the row has it, the depth branch) and
trains the detector. All rows share data, schedule, widths and seeds. Reports centre-distance AP (0.5 / 1 / 2 m and
their mean), matched-object depth AbsRel and 3-D centre error (m) on the test scenes, and 2-D AP50: mean ± half the
range over the seeds. Writes ``benchmarks/results/monodino_detr.{csv,md,png}``, the table and the plot rewritten after
every finished row (a killed run keeps what it had).

    # the committed table: 3 seeds x (1 + 4) trainings, about 75 min on ONE thread of a shared 2-core machine
    nice -n 5 .venv/bin/python benchmarks/monodino_detr.py --img-size 48 --train-scenes 1000 --test-scenes 200 \
        --max-items 3 --pretrain-steps 250 --steps 600 --lr 5e-4 --seeds 0 1 2 --threads 1
    .venv/bin/python benchmarks/monodino_detr.py   # the defaults (96 px, 800 steps): roughly 6-8 h on 2 quiet cores
    .venv/bin/python benchmarks/monodino_detr.py --train-scenes 16 --test-scenes 8 --pretrain-steps 2 --steps 2 \
        --seeds 0 --img-size 32 --out /tmp/monodino   # a smoke run (seconds)

``--rows`` trains a subset of the rows (indices into ``ROWS``), e.g. ``--rows 0 3`` for a quick baseline-vs-full pilot.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from vitlab.bench import describe_machine
from vitlab.data.synthetic import make_dataset
from vitlab.layers.dpt import scale_shift_invariant_loss
from vitlab.tasks import create_task_model
from vitlab.tasks.detection.mono3d import lid_focal_loss

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "vit_micro_patch4_28"
ROWS = {
    "DETR-3D baseline (no depth branch)": {"depth_head": False, "depth_attention": False, "geometric_depth": False},
    "+ depth head (DPT + LID depth map)": {"depth_head": True, "depth_attention": False, "geometric_depth": False},
    "+ depth-aware cross-attention": {"depth_head": True, "depth_attention": True, "geometric_depth": False},
    "+ geometric depth (full MonoDINO-DETR)": {"depth_head": True, "depth_attention": True, "geometric_depth": True},
}
SHORT = dict(zip(ROWS, ("baseline", "+ depth head", "+ depth attn", "+ geometric\n(full)"), strict=True))
METRICS = ("ap_center", "ap_center_0.5", "ap_center_1", "ap_center_2", "depth_abs_rel", "center_error", "map_50")
PRETRAINED = ("backbone.", "dpt.", "depth_cnn.", "depth_classifier.")


def batches(scenes, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(scenes), generator=generator) if generator is not None else torch.arange(len(scenes))
    mean, std = torch.tensor(scenes.mean).view(1, -1, 1, 1), torch.tensor(scenes.std).view(1, -1, 1, 1)
    for i in range(0, len(order), batch_size):
        batch = scenes.collate([scenes[int(j)] for j in order[i : i + batch_size]])
        if generator is not None:
            batch = scenes.augment(batch, generator)
        batch["image"] = (batch["image"].float() / 255 - mean) / std
        yield batch


def train(model, scenes, steps: int, lr: float, batch_size: int, seed: int, loss_fn) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1), pct_start=0.1)
    g, step = torch.Generator().manual_seed(seed), 0
    model.train()
    while step < steps:
        for batch in batches(scenes, batch_size, g):
            loss = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            optimizer.step()
            schedule.step()
            step += 1
            if step >= steps:
                return


def depth_loss(model, batch) -> torch.Tensor:
    """Stage 1: DPT relative depth (scale-shift invariant, inverse depth) + the LID depth map."""
    out = model(batch["image"])
    depth, valid = batch["depth"], batch["depth"] > 0
    relative = scale_shift_invariant_loss(out["relative_depth"][:, 0], 1.0 / depth.clamp(min=1e-3), valid)
    return relative + lid_focal_loss(out["depth_logits"], depth, model.depth_bins, *model.depth_range)


@torch.no_grad()
def evaluate(model, scenes, batch_size: int) -> dict:
    model.eval()
    metrics = model.build_metrics()
    for batch in batches(scenes, batch_size, None):
        model.update_metrics(metrics, model(batch["image"]), batch)
    return model.summarize_metrics(metrics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-scenes", type=int, default=1000)
    ap.add_argument("--test-scenes", type=int, default=300)
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-items", type=int, default=4)
    ap.add_argument("--backbone-depth", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))), help="indices of ROWS to train")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.started = time.perf_counter()
    torch.set_num_threads(args.threads)
    kw = {"canvas": args.img_size, "max_items": args.max_items}
    train_set = make_dataset("fmnist_scenes_3d", split="train", n=args.train_scenes, seed=0, **kw)
    test_set = make_dataset("fmnist_scenes_3d", split="test", n=args.test_scenes, seed=0, **kw)
    common = {"img_size": args.img_size, "num_queries": 16, "dim": 128, "decoder_heads": 4, "ffn_dim": 256,
              "dpt_features": 32, "depth_bins": 40, "depth_range": (1.0, 30.0)}  # fmt: skip
    backbone_kwargs = {"depth": args.backbone_depth}
    rows = {label: cues for i, (label, cues) in enumerate(ROWS.items()) if i in args.rows}
    results: dict[str, list[dict]] = {label: [] for label in rows}
    args.stage1_s = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        stage1 = create_task_model("monodino_detr", BACKBONE, backbone_kwargs=backbone_kwargs, **common)
        train(stage1, train_set, args.pretrain_steps, args.lr, args.batch_size, seed, depth_loss)
        pretrained = {k: v for k, v in stage1.state_dict().items() if k.startswith(PRETRAINED)}
        args.stage1_s.append(time.perf_counter() - t0)
        print(f"seed {seed}: stage 1 (depth pre-training) {args.stage1_s[-1]:.0f} s", flush=True)
        for label, cues in rows.items():
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            model = create_task_model("monodino_detr", BACKBONE, backbone_kwargs=backbone_kwargs, freeze_backbone=True,
                                      **common, **cues)  # fmt: skip
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in pretrained.items() if k in own}, strict=False)
            train(
                model,
                train_set,
                args.steps,
                args.lr,
                args.batch_size,
                seed,
                lambda m, b: m.loss(m(b["image"]), b)["loss"],
            )
            summary = evaluate(model, test_set, args.batch_size) | {"train_s": time.perf_counter() - t0, "seed": seed}
            results[label].append(summary)
            print(
                f"seed {seed} {label}: " + ", ".join(f"{k}={summary.get(k)}" for k in (*METRICS, "train_s")), flush=True
            )
            write(results, args)  # after every finished row: a killed run keeps what it had
            plot(results, args)


def _stat(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (max(values) - min(values)) / 2


def write(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    keys = (*METRICS, "train_s")
    with open(args.out / "monodino_detr.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", *keys])
        for label, runs in results.items():
            for run in runs:
                w.writerow([label, run["seed"], *(run.get(k) for k in keys)])
    done = sum(len(runs) for runs in results.values())
    stage1 = ", ".join(f"{s:.0f}" for s in args.stage1_s)
    lines = [
        "# MonoDINO-DETR depth cues on FMNIST-Scenes-3D",
        "",
        f"{args.train_scenes} train / {args.test_scenes} test scenes at {args.img_size} px, 1-{args.max_items} items "
        f"per scene (depths 2-20 m); backbone {BACKBONE} (depth {args.backbone_depth}), depth pre-trained (stage 1) "
        f"{args.pretrain_steps} steps then frozen; detector {args.steps} steps, batch {args.batch_size}, AdamW lr "
        f"{args.lr}; seeds {args.seeds}. Mean ± half the range over the seeds (n = seeds finished per row). AP: "
        "nuScenes-style centre-distance AP (bird's-eye, matched by 3-D centre distance), %; depth AbsRel and centre "
        "error over the test objects paired by the set matcher. "
        f"{done} of {len(args.seeds) * len(results)} rows finished; stage 1 took {stage1 or '-'} s per seed; "
        f"wall time so far {(time.perf_counter() - args.started) / 60:.1f} min. "
        f"Date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        + ", ".join(f"{k}={v}" for k, v in describe_machine().items())
        + ".",
        "",
        f"Command: `{args.command}`",
        "",
        f"| row | n | AP centre | AP@0.5 m | AP@1 m | AP@2 m | depth AbsRel | centre error (m) | 2-D AP50 | train s "
        f"({args.threads} thread, machine shared with other jobs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        cells = []
        for k in keys:
            m, h = _stat([r.get(k) for r in runs])
            cells.append(
                "-"
                if m is None
                else f"{m:.3f} ± {h:.3f}"
                if k in ("depth_abs_rel", "center_error")
                else f"{m:.0f} ± {h:.0f}"
                if k == "train_s"
                else f"{m:.1f} ± {h:.1f}"
            )
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += _paired(results)
    (args.out / "monodino_detr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _paired(results: dict[str, list[dict]]) -> list[str]:
    """Per-seed values and each row's change against the first row trained with the same seed (paired by seed)."""
    base = {r["seed"]: r for r in next(iter(results.values()), [])}
    lines = [
        "",
        "Per seed, and the change against the first row with the same seed (mean ± half the range of the paired "
        "differences; a change inside its own spread, or smaller than the seeds' spread, is noise):",
        "",
        "| row | depth AbsRel per seed | Δ depth AbsRel | AP centre per seed | Δ AP centre | 2-D AP50 per seed |",
        "|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        cells = []
        for key, fmt in (("depth_abs_rel", "{:.3f}"), ("ap_center", "{:.1f}")):
            cells.append(" ".join("-" if r.get(key) is None else fmt.format(r[key]) for r in runs))
            pairs = [(r.get(key), base.get(r["seed"], {}).get(key)) for r in runs]
            deltas = [a - b for a, b in pairs if a is not None and b is not None]
            m, h = _stat(deltas)
            cells.append("-" if m is None else f"{fmt.replace('{:', '{:+').format(m)} ± {fmt.format(h)}")
        cells.append(" ".join(f"{r.get('map_50', 0.0):.1f}" for r in runs))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Object-depth AbsRel and centre-distance AP per row: each seed a dot, the mean a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    short = [SHORT[label] for label in labels]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("depth_abs_rel", "object depth AbsRel (lower is better)"),
        ("ap_center", "centre-distance AP, % (mean of 0.5/1/2 m)"),
        ("map_50", "2-D AP50, %"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, label in enumerate(labels):
            values = [r[key] for r in results[label] if r.get(key) is not None]
            if values:
                ax.bar(i, statistics.fmean(values), color="#bcd", width=0.6)
                ax.plot([i] * len(values), values, "o", color="#246", ms=4)
        ax.set_xticks(range(len(labels)), short, fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"MonoDINO-DETR depth cues, FMNIST-Scenes-3D {args.img_size} px, seeds {args.seeds} (dots)", size=10)
    fig.tight_layout()
    fig.savefig(args.out / "monodino_detr.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
