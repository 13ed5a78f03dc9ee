"""MonoDINO-DETR's depth cues on FMNIST-Scenes-3D: a DETR-3D baseline, then + depth head, + depth-aware attention,
+ geometric depth (the full model).

The paper freezes Depth-Anything-V2's DINOv2 and DPT head; those weights cannot be downloaded here, so **stage 1**
trains the backbone and the depth branch (DPT relative depth with MiDaS's scale-and-shift-invariant loss on inverse
depth, and the LID depth-map focal loss) on the training scenes' depth maps, once per seed. **Stage 2** builds each
row with ``freeze_backbone=True``, loads the stage-1 backbone (and, where the row has it, the depth branch) and
trains the detector. All rows share data, schedule, widths and seeds. Reports centre-distance AP (0.5 / 1 / 2 m and
their mean), matched-object depth AbsRel and 3-D centre error (m) on the test scenes, and 2-D AP50: mean ± half the
range over the seeds. Writes ``benchmarks/results/monodino_detr.{csv,md}``.

    .venv/bin/python benchmarks/monodino_detr.py   # 3 seeds x (1 + 4) trainings: roughly 6-8 h on 2 quiet cores
    .venv/bin/python benchmarks/monodino_detr.py --img-size 64   # about 2.5-3.5 h
    .venv/bin/python benchmarks/monodino_detr.py --train-scenes 16 --test-scenes 8 --pretrain-steps 2 --steps 2 \
        --seeds 0 --img-size 32 --out /tmp/monodino   # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import csv
import statistics
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
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    kw = {"canvas": args.img_size, "max_items": 4}
    train_set = make_dataset("fmnist_scenes_3d", split="train", n=args.train_scenes, seed=0, **kw)
    test_set = make_dataset("fmnist_scenes_3d", split="test", n=args.test_scenes, seed=0, **kw)
    common = {"img_size": args.img_size, "num_queries": 16, "dim": 128, "decoder_heads": 4, "ffn_dim": 256,
              "dpt_features": 32, "depth_bins": 40, "depth_range": (1.0, 30.0)}  # fmt: skip
    backbone_kwargs = {"depth": 6}
    results: dict[str, list[dict]] = {label: [] for label in ROWS}
    for seed in args.seeds:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        stage1 = create_task_model("monodino_detr", BACKBONE, backbone_kwargs=backbone_kwargs, **common)
        train(stage1, train_set, args.pretrain_steps, args.lr, args.batch_size, seed, depth_loss)
        pretrained = {k: v for k, v in stage1.state_dict().items() if k.startswith(PRETRAINED)}
        print(f"seed {seed}: stage 1 (depth pre-training) {time.perf_counter() - t0:.0f} s", flush=True)
        for label, cues in ROWS.items():
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
            summary = evaluate(model, test_set, args.batch_size) | {"train_s": time.perf_counter() - t0}
            results[label].append(summary)
            print(
                f"seed {seed} {label}: " + ", ".join(f"{k}={summary.get(k)}" for k in (*METRICS, "train_s")), flush=True
            )
    write(results, args)


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
            for seed, run in zip(args.seeds, runs, strict=True):
                w.writerow([label, seed, *(run.get(k) for k in keys)])
    lines = [
        "# MonoDINO-DETR depth cues on FMNIST-Scenes-3D",
        "",
        f"{args.train_scenes} train / {args.test_scenes} test scenes at {args.img_size} px; backbone {BACKBONE} "
        f"(depth 6), depth pre-trained {args.pretrain_steps} steps then frozen; detector {args.steps} steps, batch "
        f"{args.batch_size}, AdamW lr {args.lr}; seeds {args.seeds}. Mean ± half the range over the seeds. "
        "AP: nuScenes-style centre-distance AP (bird's-eye), %. Machine: "
        + ", ".join(f"{k}={v}" for k, v in describe_machine().items())
        + ".",
        "",
        "| row | AP centre | AP@0.5 m | AP@1 m | AP@2 m | depth AbsRel | centre error (m) | 2-D AP50 | train s |",
        "|---|---|---|---|---|---|---|---|---|",
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
                else f"{m:.1f} ± {h:.1f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (args.out / "monodino_detr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
