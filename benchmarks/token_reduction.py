"""Token reduction trade-off: top-1, GFLOPs and img/s of ToMe, EViT, ATS and MCTF, off the shelf.

Trains an isotropic ViT on Fashion-MNIST with vitlab's recipe at a resolution giving 196 patch
tokens (``vitlab train``, so the tuned allocator applies), then applies every method at several
settings to the trained weights (no fine-tuning) and measures on the same machine, in one run:
top-1 on the test split, GFLOPs counted by ``torch.utils.flop_counter`` on the reduced graph with
real test images (ATS keeps a different number of tokens per image), and img/s at a fixed batch on
real images (after warm-up, all settings of a host timed in interleaved rounds, median per setting, so
other load on the machine hits the unreduced baseline and every method alike). It also times timm's
``deit_small_patch16_224`` at 224 px (speed needs no training).
Writes ``benchmarks/results/token_reduction.{csv,md,png}``.

    .venv/bin/python benchmarks/token_reduction.py                              # the committed table
    .venv/bin/python benchmarks/token_reduction.py --run runs/token_reduction/vit_micro_patch4_28
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # per method: the keyword swept and its values, mildest first (r for 12 blocks, scaled by depth)
    "tome": ("r", [8, 12, 16, 20, 24]),  # ToMe clips r to half the tokens a block holds
    "tome_decreasing": ("r", [12, 16, 20]),  # ToMe's decreasing schedule: 2r at the first block down to 0
    "evit": ("keep", [0.9, 0.8, 0.7, 0.6, 0.5]),
    "ats": ("keep", [1.0, 0.75, 0.5, 0.35, 0.25]),
    "mctf": ("r", [4, 8, 12, 16, 20]),
    "mctf_approx": ("r", [12, 16, 20]),  # MCTF with the official evaluation's approximate one-step-ahead
}
VARIANT_OF = {
    "mctf_approx": ("mctf", {"one_step_ahead": "approx"}),
    "tome_decreasing": ("tome", {"inflect": -1.0}),
}  # table label -> (method, fixed options)


def _values(method: str, depth: int) -> tuple[str, list]:
    key, values = SETTINGS[method]
    return key, [round(v * 12 / depth) for v in values] if key == "r" else values


def _retune_allocator() -> None:
    from vitlab.cli import reexec_with_tuned_allocator

    reexec_with_tuned_allocator([sys.executable, *sys.argv])


def train(args: argparse.Namespace) -> Path:
    out = Path(args.runs)
    name = args.model
    cmd = [
        str(Path(sys.executable).parent / "vitlab"),
        "train",
        "--model",
        args.model,
        "--img-size",
        str(args.img_size),
    ]
    cmd += ["--epochs", str(args.epochs), "--train-subset", str(args.train_subset)]
    cmd += ["--test-subset", str(args.test_subset)]
    cmd += ["--device", "cpu", "--out", str(out), "--name", name]
    subprocess.run(cmd, check=True)
    return out / name


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / len(x) / 1e9


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules sharing its parameters and buffers (many reduced variants, one set of weights)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def img_per_s(models: list[torch.nn.Module], x: torch.Tensor, seconds: float, rounds: int) -> list[float]:
    """img/s of each model: ``rounds`` round-robin passes over all of them (so load on the machine hits every
    model alike), each timing about ``seconds / rounds`` per model after one untimed forward (the first forward
    after switching models runs on caches and allocator free lists the previous model left); median per model."""
    with torch.no_grad():
        reps = []
        for model in models:  # warm-up, then the forwards that fill one round
            model(x)
            t0 = time.perf_counter()
            model(x)
            reps.append(max(1, round(seconds / rounds / (time.perf_counter() - t0))))
        times: list[list[float]] = [[] for _ in models]
        for _ in range(rounds):
            for model, n, t in zip(models, reps, times, strict=True):
                model(x)
                t0 = time.perf_counter()
                for _ in range(n):
                    model(x)
                t.append((time.perf_counter() - t0) / n)
    return [len(x) / statistics.median(t) for t in times]


def top1(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def sweep(base, batches, timing_x, flops_x, args, label: str, with_acc: bool) -> list[dict]:
    from vitlab import reduce

    rows, models = [dict(model=label, method="none", setting="")], [base]
    for method in args.methods:
        key, values = _values(method, len(base.blocks))
        for value in values:
            rows.append(dict(model=label, method=method, setting=f"{key}={value}"))
            name, fixed = VARIANT_OF.get(method, (method, {}))
            models.append(reduce.apply(shared_copy(base), name, **{key: value}, **fixed))
    for row, model in zip(rows, models, strict=True):
        row["top1"] = top1(model, batches) if with_acc else None
        row["gflops"] = gflops(model, flops_x)
    for row, speed in zip(rows, img_per_s(models, timing_x, args.seconds, args.rounds), strict=True):
        row["img_s"] = speed
        print(row, flush=True)
    ref = rows[0]
    for row in rows:
        row["flop_reduction"] = ref["gflops"] / row["gflops"]
        row["speedup"] = row["img_s"] / ref["img_s"]
        row["speedup_over_flops"] = row["speedup"] / row["flop_reduction"]
        row["top1_drop"] = None if row["top1"] is None else ref["top1"] - row["top1"]
    return rows


def write(rows: list[dict], args: argparse.Namespace, header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = args.results / args.name
    cols = ["model", "method", "setting", "top1", "top1_drop", "gflops", "flop_reduction", "img_s", "speedup"]
    cols.append("speedup_over_flops")
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    trained = [r for r in rows if r["top1"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ["none", *args.methods]:
        pts = [r for r in trained if r["method"] in (method, "none")]
        style = "k-o" if method == "tome" else "--o"
        ax.plot([r["img_s"] for r in pts], [r["top1"] for r in pts], style, label=method, alpha=0.9)
    ax.set_xlabel("img/s (CPU, fixed batch)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{trained[0]['model']}: off-the-shelf token reduction")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=120)


def draw(base, image: torch.Tensor, args: argparse.Namespace) -> None:
    """One test image, then each method's source map at its middle setting (<results>/<name>_sources.png)."""
    import numpy as np
    from PIL import Image

    from vitlab import reduce
    from vitlab.reduce.visualize import draw_sources

    gray = (image[0] - image[0].min()) / (image[0].max() - image[0].min())
    big = np.asarray(Image.fromarray((gray.numpy() * 255).astype(np.uint8)).resize((224, 224)), dtype=np.float32)
    rgb = np.repeat(big[..., None] / 255.0, 3, axis=2)
    panels = []
    for method in [m for m in args.methods if m not in VARIANT_OF]:  # a variant merges as its method does
        key, values = _values(method, len(base.blocks))
        model = reduce.apply(shared_copy(base), method, **{key: values[2]})
        with torch.no_grad():
            _, state = reduce.forward_with_state(model, image[None])
        panels.append(draw_sources(rgb, state.source[0], tuple(base.patch_embed.grid_size)))
    strip = np.concatenate([rgb, *panels], axis=1)
    Image.fromarray((strip * 255).astype(np.uint8)).save(args.results / f"{args.name}_sources.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_micro_patch4_28")
    p.add_argument("--img-size", type=int, default=56)  # patch 4: 14 x 14 = 196 tokens
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64, help="timing batch")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per model, over --rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median per model)")
    p.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--run", help="reuse this trained run directory instead of training")
    p.add_argument("--runs", default="runs/token_reduction")
    p.add_argument("--skip-deit", action="store_true")
    p.add_argument("--name", default="token_reduction")
    p.add_argument("--results", default=str(RESULTS), help="directory for the tables and plots")
    args = p.parse_args()
    args.results = Path(args.results)
    _retune_allocator()
    torch.set_num_threads(min(os.cpu_count() or 1, 16))
    from vitlab.bench import allocator_setting, describe_machine
    from vitlab.engine import RunConfig, load_trained
    from vitlab.engine.setup import build_datasets, build_loader

    run = Path(args.run) if args.run else train(args)
    base, meta, _ = load_trained(run)
    cfg = RunConfig()
    cfg.model.img_size, cfg.data.test_subset, cfg.data.batch_size = meta["img_size"], args.test_subset, 250
    ds = build_datasets(cfg, splits=("test",))["test"]
    batches = [(x, y) for x, y in build_loader(ds, cfg, train=False, in_chans=meta["in_chans"]).iter_epoch(0)]
    images = torch.cat([x for x, _ in batches])
    args.results.mkdir(parents=True, exist_ok=True)
    draw(base, images[0], args)
    rows = sweep(base, batches, images[: args.batch_size], images[:64], args, meta["model"], with_acc=True)
    if not args.skip_deit:
        import timm

        deit = timm.create_model("deit_small_patch16_224").eval()
        x = torch.nn.functional.interpolate(images[: args.batch_size].expand(-1, 3, -1, -1), size=224, mode="bilinear")
        rows += sweep(deit, [], x, x[:8], args, "deit_small_patch16_224 (random weights)", with_acc=False)
    m = describe_machine()
    trained = json.loads((run / "config.json").read_text())  # the run's own recipe (it may come from --run)
    header = (
        f"# Token reduction, off the shelf (no fine-tuning)\n\n{meta['model']} trained by `vitlab train` at "
        f"{meta['img_size']} px ({trained['optim']['epochs']} epochs on {trained['data']['train_subset'] or 'all'} "
        f"Fashion-MNIST images), top-1 on "
        f"{args.test_subset} test images. Machine: {m.get('cpu', m)}; {torch.get_num_threads()} threads; "
        f"allocator: {allocator_setting()}; timing batch {args.batch_size}, median of {args.rounds} interleaved "
        f"rounds (~{args.seconds}s per setting, each slice after one untimed forward); "
        f"load average at the end {os.getloadavg()[0]:.1f} (other processes on the machine make img/s noisy).\n"
        f"Command: `{' '.join(sys.argv)}`"
    )
    write(rows, args, header)
    print(Path(f"{args.results / args.name}.md").read_text())


if __name__ == "__main__":
    main()
