"""MV-Adapter (paper 41) at CPU scale: a frozen single-view flow DiT made multi-view by adapters, on Render3D rings.

Step 1 trains ``flow_dit`` (class-conditional on the texture item's Fashion-MNIST class) on single 32 px views of one
textured box seen from a ring of cameras at 0 deg elevation (``mv_adapter_parts.orbit_object_set``). Step 2 freezes
it and trains only MV-Adapter's parts (``mv_adapter``: multi-view attention, reference cross-attention to view 0, the
ray-map condition encoder) for the same steps per row: independent views (no multi-view attention), full multi-view
attention, row-wise attention, row-wise without the weight copy. Test scenes (Fashion-MNIST test items) are sampled
from the same initial noise in every row (Euler); scores: multi-view consistency (generated view i warped into view
j with the true depth and cameras, masked PSNR, all ordered pairs), PSNR of the generated novel views 1..V-1 to the
true renders, the held-out flow loss, trainable parameters and seconds per step. Writes
``benchmarks/results/mv_adapter.{csv,md,png}`` and ``mv_adapter_samples.png``.

    .venv/bin/python benchmarks/mv_adapter.py --threads 1                               # ~30 min on one shared core
    .venv/bin/python benchmarks/mv_adapter.py --n 16 --test-n 4 --steps 3 --base-steps 3 --seeds 0 --out /tmp/mva
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch

from task_fit import cell, warmup_cosine, write_csv  # the shared table helpers (this directory is on sys.path)
from vitlab.data.fashion_mnist import load_fashion_mnist
from vitlab.engine.checkpoint import save_weights
from vitlab.layers.adapters import trainable_parameters
from vitlab.tasks.generative.flow import FlowDiT
from vitlab.tasks.generative.mv_adapter import MVAdapter
from vitlab.tasks.generative.mv_adapter_parts import PIXEL_MEAN, PIXEL_STD, multiview_consistency, orbit_object_set

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "vit_micro_patch4_28"
BACKBONE_KW = {"embed_dim": 64, "depth": 4, "num_heads": 4}
ROWS = {
    "independent views": {"mode": "none"},
    "full multi-view attn": {"mode": "full"},
    "row-wise attn": {"mode": "row"},
    "row-wise, no weight copy": {"mode": "row", "copy_weights": False},
}
SCENE_KEYS = ("views", "K", "cam_to_world", "label")


def scenes(split: str, n: int, views: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    fm = load_fashion_mnist(split=split, download=False)
    return orbit_object_set(n, views, size, fm.images, fm.targets, seed=seed)


def fit(model, step_fn, steps: int, lr: float) -> float:
    """AdamW on the trainable parameters, warmup + cosine, clipping at 1; returns seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, max(1, steps // 10))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return (time.perf_counter() - t0) / max(1, steps)


def train_base(train: dict, args, path: Path) -> float:
    torch.manual_seed(0)
    base = FlowDiT(BACKBONE, num_classes=10, in_chans=3, img_size=args.size, backbone_kwargs=BACKBONE_KW)
    images, labels = train["views"].flatten(0, 1), train["label"].repeat_interleave(args.views)
    g = torch.Generator().manual_seed(0)

    def step(_: int) -> torch.Tensor:
        i = torch.randint(0, len(images), (args.base_batch,), generator=g)
        return base.loss(base(images[i], labels[i]), {})["loss"]

    sec = fit(base, step, args.base_steps, 2e-3)
    meta = {"task": "flow_dit", "model": BACKBONE, "backbone_args": BACKBONE_KW, "task_args": {},
            "num_classes": 10, "in_chans": 3, "img_size": args.size}  # fmt: skip
    save_weights(base, path, meta)
    return sec


def batch_of(data: dict, index: torch.Tensor) -> dict[str, torch.Tensor]:
    b = {k: data[k][index] for k in SCENE_KEYS}
    return {"image": b["views"][:, 0].clone(), **b}


@torch.no_grad()
def evaluate(model: MVAdapter, test: dict, args) -> tuple[dict, torch.Tensor]:
    model.eval()
    gens, losses = [], []
    for i in range(0, len(test["views"]), 16):
        b = batch_of(test, torch.arange(i, min(i + 16, len(test["views"]))))
        losses.append(model.loss(model(b), b)["loss"] * len(b["image"]))
        g = torch.Generator().manual_seed(10_000 + i)  # the same initial noise in every row
        gens.append(model.sample(b["image"], b["K"], b["cam_to_world"], b["label"], args.sample_steps, g))
    gen = torch.cat(gens)
    cons = multiview_consistency(gen, test["depth"], test["valid"], test["K"], test["cam_to_world"])
    to01 = lambda x: (x * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)  # noqa: E731
    mse = (to01(gen[:, 1:]) - to01(test["views"][:, 1:])).pow(2).flatten(2).mean(2)  # per novel view
    psnr = (-10 * torch.log10(mse.clamp(min=1e-10))).mean()
    return {"consistency_db": float(cons.mean()), "psnr_gt_db": float(psnr),
            "flow_loss": float(sum(losses) / len(test["views"]))}, gen  # fmt: skip


def grid_png(rows: dict[str, torch.Tensor], path: Path, scenes_shown: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    V = next(iter(rows.values())).shape[1]
    scenes_shown = min(scenes_shown, len(next(iter(rows.values()))))
    fig, axes = plt.subplots(
        len(names), scenes_shown, squeeze=False, figsize=(1.1 * V * scenes_shown, 1.2 * len(names))
    )
    for r, name in enumerate(names):
        for s in range(scenes_shown):
            strip = torch.cat(list((rows[name][s] * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)), -1)  # (3, H, V*W)
            ax = axes[r, s]
            ax.imshow(strip.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if s == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("MV-Adapter: 4 ring views per scene (view 0 = reference), same initial noise in every row", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_png(table: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, title in ((axes[0], "consistency_db", "multi-view consistency (dB)"),
                           (axes[1], "psnr_gt_db", "PSNR of novel views to true renders (dB)")):  # fmt: skip
        means = [sum(r[key] for r in table[n]) / len(table[n]) for n in names]
        ax.barh(names, means, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        lo = min(means) - 1
        ax.set_xlim(left=max(0, lo))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=500, help="adapter steps per row")
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8, help="scenes per adapter step")
    p.add_argument("--base-batch", type=int, default=32)
    p.add_argument("--n", type=int, default=600, help="training scenes")
    p.add_argument("--test-n", type=int, default=48)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--merge", default="", help="a CSV of this script (other seeds, same settings) to add to the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train = scenes("train", args.n, args.views, args.size, seed=1)
    test = scenes("test", args.test_n, args.views, args.size, seed=2)
    base_path = out / "mv_adapter_base.safetensors"
    base_sec = train_base(train, args, base_path)
    print(f"base: {args.base_steps} steps, {base_sec:.3f} s/step", flush=True)

    table: dict[str, list[dict]] = {}
    samples: dict[str, torch.Tensor] = {"true renders": test["views"]}
    frozen = MVAdapter(BACKBONE, img_size=args.size, base_checkpoint=str(base_path), num_views=args.views, mode="row")
    scores, samples["frozen base (adapters at init)"] = evaluate(frozen, test, args)
    table["frozen base (adapters at init)"] = [{"seed": "-", **scores, "trainable": 0, "sec_step": 0.0}]
    if args.merge:  # earlier seeds of the same settings: the base is retrained identically (seed 0)
        with open(args.merge) as f:
            for r in csv.DictReader(f):
                if r["seed"] != "-":
                    vals = {k: float(v) for k, v in r.items() if k not in ("row", "seed")}
                    table.setdefault(r["row"], []).append(
                        {"seed": int(r["seed"]), **vals, "trainable": int(vals["trainable"])}
                    )
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, kw in ROWS.items():
            torch.manual_seed(seed)
            model = MVAdapter(BACKBONE, img_size=args.size, base_checkpoint=str(base_path), num_views=args.views, **kw)
            g = torch.Generator().manual_seed(seed)

            def step(_: int, model=model, g=g) -> torch.Tensor:
                b = batch_of(train, torch.randint(0, args.n, (args.batch,), generator=g))
                return model.loss(model(b), b)["loss"]

            sec = fit(model, step, args.steps, args.lr)
            scores, gen = evaluate(model, test, args)
            row = {"seed": seed, **scores, "trainable": trainable_parameters(model), "sec_step": sec}
            table.setdefault(name, []).append(row)
            samples.setdefault(name, gen)
            print(name, row, flush=True)
        # the tables after every seed: a run cut short still leaves its finished seeds
        gt = multiview_consistency(test["views"], test["depth"], test["valid"], test["K"], test["cam_to_world"])
        total_params = sum(p.numel() for p in frozen.parameters())
        minutes = (time.perf_counter() - t_start) / 60
        write_report(out, table, float(gt.mean()), total_params, base_sec, minutes, args)
        grid_png(samples, out / "mv_adapter_samples.png")
        bar_png(table, out / "mv_adapter.png")
    base_path.unlink(missing_ok=True)  # not committed: rebuilt by the script


def write_report(out: Path, table: dict, gt_cons: float, total: int, base_sec: float, minutes: float, args) -> None:
    write_csv(out / "mv_adapter.csv", table, ("consistency_db", "psnr_gt_db", "flow_loss", "trainable", "sec_step"))
    ref = table["independent views"]
    ref_sec = sum(r["sec_step"] for r in ref) / len(ref)
    lines = [
        "# MV-Adapter (paper 41) at CPU scale",
        "",
        f"Command: `.venv/bin/python benchmarks/mv_adapter.py --threads {args.threads} --seeds {args.seeds} "
        f"--steps {args.steps} --base-steps {args.base_steps} --n {args.n} --test-n {args.test_n} --sample-steps "
        f"{args.sample_steps}` ({minutes:.0f} min to the last finished seed; {args.threads} thread, shared 2-core "
        f"machine under heavy load from other jobs, so seconds per step are comparable within this run only; "
        f"{datetime.date.today()}).",
        "",
        f"Frozen base: `flow_dit` on `{BACKBONE}` {BACKBONE_KW}, {args.size} px, trained here for {args.base_steps} "
        f"steps (batch {args.base_batch}) on single views of {args.n} ring scenes (one Fashion-MNIST-textured box, "
        f"{args.views} cameras at 0 deg elevation, 90 deg apart); {total:,} parameters in the adapted model. Adapters: "
        f"{args.steps} AdamW steps (lr {args.lr}, batch {args.batch} scenes) per row, view 0 given as the reference "
        f"image. Test: {args.test_n} scenes with Fashion-MNIST test items, {args.sample_steps} Euler steps from the "
        "same noise in every row. Consistency: generated view i warped into view j with the true depth and cameras, "
        f"PSNR over visible pixels of all ordered pairs (the true renders score {gt_cons:.1f} dB: the warp's floor of "
        "error). PSNR to GT: generated novel views 1-3 vs the true renders. Seeds: "
        f"{', '.join(str(r['seed']) for r in ref)} finished (mean ± half the range); the base is one (seed 0) for "
        "all rows.",
        "",
        "| row | consistency (dB) | PSNR to GT, novel views (dB) | held-out flow loss | trainable params | "
        "s / step | time vs independent |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in table.items():
        sec = [r["sec_step"] for r in rs]
        ratio = cell([s / ref_sec for s in sec], 2) if rs[0]["trainable"] else "-"
        lines.append(
            f"| {name} | {cell([r['consistency_db'] for r in rs], 2)} | {cell([r['psnr_gt_db'] for r in rs], 2)} | "
            f"{cell([r['flow_loss'] for r in rs], 4)} | {rs[0]['trainable']:,} | "
            f"{cell(sec, 3) if rs[0]['trainable'] else '-'} | {ratio} |"
        )
    lines += ["", "READING", ""]
    (out / "mv_adapter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
