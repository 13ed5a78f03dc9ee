"""Channel subsets: top-1 of a plain ViT and of ChannelViT, each trained with and without Hierarchical
Channel Sampling (HCS), on every non-empty subset of the 4-channel Fashion-MNIST set's channels.

ChannelViT (arXiv:2309.16108) claims that per-channel tokens plus HCS keep a model accurate when channels are
missing at test time (its Tables 2-4). This reproduces the comparison at small scale: the four models train
with one recipe (``vitlab train --dataset fashion_mnist_multichannel [--hcs]``, through the function the
command calls), then each is evaluated on all 15 channel subsets (what ``vitlab eval RUN --channels ...``
does). ChannelViT gets only the kept channels' tokens; the plain ViT gets the missing channels as zeros (the
data mean).
Writes ``benchmarks/results/channel_subsets.{csv,md}``.

    .venv/bin/python benchmarks/channel_subsets.py           # the recorded table (budget: 15 min on 2 cores)
    .venv/bin/python benchmarks/channel_subsets.py --smoke   # wiring check in about a minute (numbers meaningless)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = (("vit_nano_patch4_28", False), ("vit_nano_patch4_28", True))
MODELS += (("channelvit_nano_patch4_28", False), ("channelvit_nano_patch4_28", True))


def _tune_allocator() -> None:
    # the same glibc setting the vitlab console script applies (DESIGN.md), before torch starts
    from vitlab.cli import TUNED_MALLOC

    if sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **TUNED_MALLOC})


def _label(model: str, hcs: bool) -> str:
    return ("ChannelViT" if model.startswith("channelvit") else "ViT") + (" + HCS" if hcs else "")


def train_one(model: str, hcs: bool, out: Path, args: argparse.Namespace) -> Path:
    from vitlab.engine import RunConfig, train

    cfg = RunConfig(out=str(out), name=f"{model}{'-hcs' if hcs else ''}", device="cpu", seed=args.seed)
    cfg.model.model = model
    cfg.data.dataset = "fashion_mnist_multichannel"
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = (
        args.train_subset,
        args.test_subset,
        args.batch_size,
    )
    cfg.optim.epochs, cfg.hcs.hcs = args.epochs, hcs
    cfg.log_every = 50
    return train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-subset", type=int, default=6000, help="training images (of 60000)")
    parser.add_argument("--test-subset", type=int, default=2000, help="test images (of 10000)")
    parser.add_argument("--epochs", type=float, default=2.0)
    # few images: a smaller batch gives the tiny models more optimiser steps for the same compute
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the wiring only")
    parser.add_argument("--out", type=Path, default=RESULTS / "channel_subsets", help="path prefix of the tables")
    args = parser.parse_args()
    if args.smoke:
        args.train_subset, args.test_subset, args.epochs = 256, 128, 1.0
    _tune_allocator()

    import torch

    from vitlab.bench import allocator_setting, count_flops_meta, count_params_meta, describe_machine, gmacs
    from vitlab.data.multichannel import MULTICHANNEL_VIEWS
    from vitlab.engine import load_config, load_trained
    from vitlab.engine.evaluate import evaluate_model
    from vitlab.engine.hcs import ChannelSubset
    from vitlab.engine.setup import build_datasets, build_loader

    torch.manual_seed(args.seed)
    C = len(MULTICHANNEL_VIEWS)
    subsets = [list(s) for k in range(C, 0, -1) for s in itertools.combinations(range(C), k)]
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model, hcs in MODELS:
            run = train_one(model, hcs, Path(tmp), args)
            summary = json.loads((run / "summary.json").read_text())
            cost = {
                "params_m": round(count_params_meta(model, in_chans=C, num_classes=10) / 1e6, 3),
                "gmacs_all_channels": round(gmacs(count_flops_meta(model, in_chans=C, num_classes=10)), 3),
                "train_seconds": summary["train_seconds"],
            }
            # what `vitlab eval RUN --channels 0,2` does, with the test set built once per model
            net, meta, _ = load_trained(run, "cpu")
            cfg = load_config(run / "config.json")
            loader = build_loader(build_datasets(cfg, ("test",))["test"], cfg, train=False, in_chans=meta["in_chans"])
            for channels in subsets:
                spec = ",".join(map(str, channels))
                res = evaluate_model(ChannelSubset(net, spec, C), loader, torch.device("cpu"), meta["classes"])
                rows.append(
                    {
                        "model": model,
                        "hcs": hcs,
                        "label": _label(model, hcs),
                        "channels": spec,
                        "views": "+".join(MULTICHANNEL_VIEWS[c] for c in channels),
                        "num_channels": len(channels),
                        "test_top1": res.top1,
                        **cost,
                    }
                )
                print(f"{_label(model, hcs):18s} channels {spec:8s} top-1 {res.top1:6.2f}%", flush=True)
    wall = time.perf_counter() - t0
    machine = describe_machine()
    machine["allocator"] = allocator_setting(dict(os.environ))
    settings = (
        f"train_subset={args.train_subset}, test_subset={args.test_subset}, epochs={args.epochs:g}, "
        f"batch_size={args.batch_size}, seed={args.seed}"
    )
    write_tables(args.out, rows, subsets, MULTICHANNEL_VIEWS, machine, settings, wall, args.smoke)


def write_tables(out: Path, rows, subsets, views, machine, settings, wall, smoke) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"settings": settings, "machine": machine.get("cpu", ""), "allocator": machine.get("allocator", "")}
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *extra])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **extra})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    top1 = {(r["label"], r["channels"]): r["test_top1"] for r in rows}
    first = {label: next(r for r in rows if r["label"] == label) for label in labels}
    lines = [
        "# Channel subsets: ViT vs ChannelViT, with and without HCS (4-channel Fashion-MNIST)",
        "",
    ]
    if smoke:
        lines += ["**SMOKE RUN: tiny settings that only check the wiring; the accuracies mean nothing.**", ""]
    lines += [
        f"Channels: {', '.join(f'{i} {v}' for i, v in enumerate(views))} (`vitlab.data.multichannel`).",
        f"Settings: {settings}; one recipe for all models (`vitlab train` defaults otherwise); "
        "a missing channel is dropped from ChannelViT's tokens and zeroed (the data mean) for the ViT.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; allocator: "
        f"{machine.get('allocator', '?')}; torch {machine.get('torch', '?')}, timm {machine.get('timm', '?')}, "
        f"vitlab {machine.get('vitlab', '?')}. Date: {time.strftime('%Y-%m-%d')}; whole script {wall:.0f} s.",
        "Produced by `python benchmarks/channel_subsets.py`.",
        "",
        "Test top-1 (%) per channel subset:",
        "",
        "| channels | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for channels in subsets:
        spec = ",".join(map(str, channels))
        name = "+".join(views[c] for c in channels)
        lines.append(f"| {spec} ({name}) | " + " | ".join(f"{top1[(lb, spec)]:.2f}" for lb in labels) + " |")
    for k in range(len(views), 0, -1):
        specs = [",".join(map(str, s)) for s in subsets if len(s) == k]
        means = [sum(top1[(lb, s)] for s in specs) / len(specs) for lb in labels]
        lines.append(f"| **mean, {k} channel{'s' if k > 1 else ''}** | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    all_means = [sum(top1[(lb, ",".join(map(str, s)))] for s in subsets) / len(subsets) for lb in labels]
    lines.append("| **mean, all 15 subsets** | " + " | ".join(f"{m:.2f}" for m in all_means) + " |")
    lines += [
        "",
        "| model | params (M) | GMACs, all 4 channels | training s |",
        "|---|---:|---:|---:|",
        *(
            f"| {lb} | {first[lb]['params_m']} | {first[lb]['gmacs_all_channels']} | {first[lb]['train_seconds']} |"
            for lb in labels
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(out.with_suffix(".csv"), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')}, .md and .png")


def plot(csv_path: Path, png_path: Path) -> None:
    """Mean top-1 against the number of channels kept, one line per model (reads the CSV: no retraining)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        by_k: dict[int, list[float]] = {}
        for r in rows:
            if r["label"] == label:
                by_k.setdefault(int(r["num_channels"]), []).append(float(r["test_top1"]))
        ks = sorted(by_k)
        ax.plot(ks, [sum(by_k[k]) / len(by_k[k]) for k in ks], "-o", label=label)
    ax.set_xlabel("channels kept at test time (mean over the subsets of that size)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_xticks(sorted({int(r["num_channels"]) for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("4-channel Fashion-MNIST: accuracy with missing channels")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    main()
