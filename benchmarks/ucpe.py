"""UCPE (paper 40) at CPU scale: camera encodings of a small novel-view-synthesis transformer on Render3D.

One source view -> the target view (``ucpe_nvs``), 32 px, two views per scene. Rows: the camera encoding (none /
absolute Plücker / PRoPE / UCPE relative rays / + absolute orientation map), the relative ones in the parallel
zero-initialised adapter. Trained on pinhole cameras with a 40-70 degree field of view and no roll; tested on the
same distribution and on three shifts: unseen fields of view (75-90 degrees), distorted lenses (|k1| <= 0.3 and
unified-model xi <= 0.6) and unseen roll (+-45 degrees). Scenes, textures (Fashion-MNIST test split) and poses of
the test sets are the same across the four; only the camera draws change. PSNR (per image, averaged) and SSIM
(torchmetrics) of the full target view in [0, 1] RGB. Writes ``benchmarks/results/ucpe.{csv,md,png}``.

    .venv/bin/python benchmarks/ucpe.py --threads 1                    # ~15 min a seed on one shared core
    .venv/bin/python benchmarks/ucpe.py --n 64 --test-n 16 --steps 3 --seeds 0 --out /tmp/ucpe   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from task_fit import cell, warmup_cosine  # the shared table cell (this directory is on sys.path)
from vitlab.data.synthetic.render3d_sets import generate_render3d
from vitlab.tasks import create_task_model
from vitlab.tasks.multiview.ucpe import CAMERA_KEYS, ENCODINGS, nvs_batch

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "vit_micro_patch4_28"
BACKBONE_KW = {"embed_dim": 64, "depth": 4, "num_heads": 4}
TRAIN_CAMS = {"fov": (40.0, 70.0)}
TESTS = {
    "same": {"fov": (40.0, 70.0)},
    "wide_fov": {"fov": (75.0, 90.0)},
    "distorted": {"fov": (40.0, 70.0), "distortion": 0.3, "xi": 0.6},
    "roll": {"fov": (40.0, 70.0), "roll": 45.0},
}


def tensors(split: str, n: int, seed: int, size: int, cams: dict) -> dict[str, torch.Tensor]:
    ds = generate_render3d(split, n, seed, views=2, size=size, spread=30.0, **cams)
    return nvs_batch({"views": ds.views, **{k: getattr(ds, k) for k in CAMERA_KEYS}})


def batches(data: dict[str, torch.Tensor], size: int, perm: torch.Tensor | None = None):
    n = len(data["image"])
    index = perm if perm is not None else torch.arange(n)
    for i in range(0, n, size):
        yield {k: v[index[i : i + size]] for k, v in data.items()}


def fit(model, data, steps: int, lr: float, batch: int, seed: int) -> float:
    """AdamW, linear warmup and cosine decay, gradient clipping at 1 (as ``task_fit.train``); returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = warmup_cosine(opt, steps, max(1, steps // 10))
    g, step, t0 = torch.Generator().manual_seed(seed), 0, time.perf_counter()
    model.train()
    while step < steps:
        for b in batches(data, batch, torch.randperm(len(data["image"]), generator=g)):
            if len(b["image"]) < batch:
                continue
            loss = model.loss(model(b["image"], **model.forward_kwargs(b)), b)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, data) -> dict[str, float]:
    model.eval()
    metrics = model.build_metrics()
    for b in batches(data, 100):
        model.update_metrics(metrics, model(b["image"], **model.forward_kwargs(b)), b)
    return model.summarize_metrics(metrics)


def write(rows: list[dict], args, header: list[str]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    keys = ["encoding", "seed", "params", "train_s"] + [f"{t}_{m}" for t in TESTS for m in ("psnr", "ssim")]
    with open(args.out / "ucpe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    cols = " | ".join(f"{t} PSNR | {t} SSIM" for t in TESTS)
    secs_col = "train s (1 thread, machine shared with other jobs)"
    lines = [*header, "", f"| encoding | seeds | params | {secs_col} | {cols} |", "|---" * (4 + 2 * len(TESTS)) + "|"]
    for enc in ENCODINGS:
        mine = [r for r in rows if r["encoding"] == enc]
        if not mine:
            continue
        cells = [cell([r[f"{t}_{m}"] for r in mine], 2 if m == "psnr" else 3) for t in TESTS for m in ("psnr", "ssim")]
        secs = cell([r["train_s"] for r in mine], 0)
        lines.append(f"| {enc} | {len(mine)} | {mine[0]['params']} | {secs} | " + " | ".join(cells) + " |")
    (args.out / "ucpe.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "ucpe.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    encs = [e for e in ENCODINGS if any(r["encoding"] == e for r in rows)]
    width = 0.8 / max(1, len(encs))
    for ax, metric in zip(axes, ("psnr", "ssim"), strict=True):
        for i, enc in enumerate(encs):
            mine = [r for r in rows if r["encoding"] == enc]
            means = [statistics.fmean(r[f"{t}_{metric}"] for r in mine) for t in TESTS]
            halves = [(max(v) - min(v)) / 2 for v in ([r[f"{t}_{metric}"] for r in mine] for t in TESTS)]
            xs = [j + (i - (len(encs) - 1) / 2) * width for j in range(len(TESTS))]
            ax.bar(xs, means, width, yerr=halves, label=enc, capsize=2)
        ax.set_xticks(range(len(TESTS)), list(TESTS))
        ax.set_ylabel(metric.upper())
        lo = min(r[f"{t}_{metric}"] for r in rows for t in TESTS)
        ax.set_ylim(bottom=max(0.0, lo * 0.85))
    axes[0].legend(fontsize=7)
    fig.suptitle("UCPE camera encodings, novel-view synthesis on Render3D 32 px (mean ± half range over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="training scenes")
    ap.add_argument("--test-n", type=int, default=200, help="scenes per test set")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--steps", type=int, default=350)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--compress", type=int, default=2)
    ap.add_argument("--encodings", nargs="+", default=list(ENCODINGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = tensors("train", args.n, 0, args.img, TRAIN_CAMS)
    tests = {name: tensors("test", args.test_n, 1, args.img, cams) for name, cams in TESTS.items()}
    header = [
        "# UCPE camera encodings: novel-view synthesis on Render3D (CPU-scale reconstruction)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`; torch {torch.__version__}; "
        f"{datetime.date.today().isoformat()}; seeds {args.seeds} (model init and batch order; the data are fixed).",
        f"Model: `ucpe_nvs` on {BACKBONE} {BACKBONE_KW}, patch 4, {args.img} px, camera branch width dim/"
        f"{args.compress}; {args.steps} AdamW steps of {args.batch} (lr {args.lr}), L1 loss. Train: {args.n} "
        f"two-view scenes, pinhole, FoV {TRAIN_CAMS['fov']} deg, no roll, azimuth spread 30 deg. Test: "
        f"{args.test_n} scenes each (Fashion-MNIST test textures): "
        + "; ".join(f"{k} {v}" for k, v in TESTS.items())
        + ". PSNR per image (averaged) and SSIM on the full target view, RGB in [0, 1]; mean ± half the range. "
        "Absolute values differ across test sets with what the lenses see (wide lenses: more wall and floor): "
        "compare encodings within a column.",
    ]
    rows: list[dict] = []
    for seed in args.seeds:
        for enc in args.encodings:
            torch.manual_seed(seed)
            model = create_task_model(
                "ucpe_nvs", BACKBONE, img_size=args.img, backbone_kwargs=BACKBONE_KW, encoding=enc,
                compress=args.compress,
            )  # fmt: skip
            secs = fit(model, train, args.steps, args.lr, args.batch, seed)
            row = {"encoding": enc, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
                   "train_s": round(secs, 1)}  # fmt: skip
            for name, data in tests.items():
                scores = evaluate(model, data)
                row[f"{name}_psnr"], row[f"{name}_ssim"] = round(scores["psnr"], 3), round(scores["ssim"], 4)
            rows.append(row)
            print(row, flush=True)
            write(rows, args, header)


if __name__ == "__main__":
    main()
