"""Token reduction with fine-tuning: off the shelf vs `vitlab train --reduce`, with and without MCTF's consistency.

Starts from a host trained by ``benchmarks/token_reduction.py`` (or any ``vitlab train`` run) and, for each
setting ``METHOD:KEY=VALUE``, compares on the whole Fashion-MNIST test split:

- off the shelf: the host with the method applied, no training;
- fine-tuned: ``vitlab train --init-from HOST --reduce METHOD ...`` for a short schedule;
- fine-tuned with MCTF's token-reduction consistency (``--reduce-consistency W``);
- and, as the control for "more training", the host fine-tuned with the same schedule and no reduction.

Writes ``benchmarks/results/token_reduction_finetune.{csv,md}``.

    .venv/bin/python benchmarks/token_reduction_finetune.py --run runs/token_reduction/vit_micro_patch4_28 \
        --settings tome:r=16 mctf:r=16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = {"r": "--reduce-r", "keep": "--reduce-keep"}


def parse_setting(text: str) -> tuple[str, str, str]:
    """``"tome:r=16"`` -> ``("tome", "r", "16")``."""
    try:
        method, kv = text.split(":", 1)
        key, value = kv.split("=", 1)
    except ValueError:
        raise SystemExit(f"--settings entries look like METHOD:KEY=VALUE (e.g. tome:r=16), got {text!r}") from None
    if key not in FLAGS:
        raise SystemExit(f"setting {text!r}: KEY must be one of {sorted(FLAGS)}")
    return method, key, value


def finetune(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    """One ``vitlab train --init-from`` run (reused when its summary exists); returns its summary."""
    out = Path(args.runs)
    summary = out / name / "summary.json"
    if not summary.is_file():
        cmd = [str(Path(sys.executable).parent / "vitlab"), "train", "--init-from", str(args.run)]
        cmd += ["--model", args.meta["model"], "--img-size", str(args.meta["img_size"])]
        cmd += ["--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--lr", str(args.lr)]
        cmd += ["--warmup-epochs", str(args.warmup_epochs), "--seed", str(args.seed)]
        cmd += ["--test-subset", str(args.test_subset)]
        cmd += ["--device", "cpu", "--out", str(out), "--name", name, *extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def off_the_shelf(base: torch.nn.Module, method: str, key: str, value: str, batches) -> float:
    import copy

    from token_reduction import top1  # the sibling script's scorer (this directory is on sys.path)
    from vitlab import reduce

    model = base if method == "none" else reduce.apply(copy.deepcopy(base), method, **{key: _num(value)})
    return top1(model, batches)


def _num(value: str) -> int | float:
    return float(value) if "." in value else int(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/token_reduction/vit_micro_patch4_28", help="the trained host run")
    p.add_argument("--settings", nargs="+", default=["tome:r=16", "mctf:r=16"], help="METHOD:KEY=VALUE")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=0.05)
    p.add_argument("--consistency", type=float, default=1.0, help="--reduce-consistency weight of the third arm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--test-subset", type=int, default=0, help="0: the whole test split")
    p.add_argument("--runs", default="runs/token_reduction_ft")
    p.add_argument("--name", default="token_reduction_finetune")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    from vitlab.cli import reexec_with_tuned_allocator

    reexec_with_tuned_allocator([sys.executable, *sys.argv])
    from vitlab.engine import RunConfig, load_trained
    from vitlab.engine.setup import build_datasets, build_loader

    base, args.meta, _ = load_trained(args.run)
    cfg = RunConfig()
    cfg.model.img_size, cfg.data.batch_size, cfg.data.test_subset = args.meta["img_size"], 250, args.test_subset
    ds = build_datasets(cfg, splits=("test",))["test"]
    batches = list(build_loader(ds, cfg, train=False, in_chans=args.meta["in_chans"]).iter_epoch(0))

    host = off_the_shelf(base, "none", "", "", batches)
    control = finetune(args, "none", [])
    rows = [dict(setting="none", off_the_shelf=host, finetuned=control["test_top1"], finetuned_consistency=None)]
    rows[-1]["train_s"] = control["train_seconds"]
    for method, key, value in settings:
        tag = f"{method}_{key}{value}"
        flags = ["--reduce", method, FLAGS[key], value]
        plain = finetune(args, tag, flags)
        cons = finetune(
            args, f"{tag}_cons{args.consistency:g}", [*flags, "--reduce-consistency", str(args.consistency)]
        )
        rows.append(
            dict(
                setting=f"{method} {key}={value}",
                off_the_shelf=off_the_shelf(base, method, key, value, batches),
                finetuned=plain["test_top1"],
                finetuned_consistency=cons["test_top1"],
                train_s=f"{plain['train_seconds']:.0f} / {cons['train_seconds']:.0f}",
            )
        )
        print(rows[-1], flush=True)
    for r in rows:
        r["drop_off_the_shelf"] = host - r["off_the_shelf"]
        r["drop_vs_control"] = control["test_top1"] - r["finetuned"]
        c = r["finetuned_consistency"]
        r["drop_vs_control_consistency"] = None if c is None else control["test_top1"] - c
    write(rows, args, host, control)


def write(rows: list[dict], args: argparse.Namespace, host: float, control: dict) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    cols = ["setting", "off_the_shelf", "drop_off_the_shelf", "finetuned", "drop_vs_control"]
    cols += ["finetuned_consistency", "drop_vs_control_consistency", "train_s"]
    with open(results / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    header = (
        f"# Token reduction with fine-tuning\n\nHost: `{args.run}` ({args.meta['model']} at "
        f"{args.meta['img_size']} px), {host:.2f}% top-1 on {args.test_subset or 'all 10,000'} Fashion-MNIST "
        "test images. Each arm fine-tunes the host for "
        f"{args.epochs:g} epoch(s) on {args.train_subset} training images (lr {args.lr:g}, warm-up "
        f"{args.warmup_epochs:g} epochs, cosine, seed {args.seed}); the control (`none`) fine-tunes with no "
        f"reduction and reaches {control['test_top1']:.2f}%. `drop_vs_control` compares a reduced fine-tune with "
        f"that control; the consistency arm adds `--reduce-consistency {args.consistency:g}` (MCTF Sec. 3.4). "
        f"train_s: seconds of training (plain / consistency). Load average at the end {os.getloadavg()[0]:.1f}.\n"
        f"Command: `{' '.join(sys.argv)}`"
    )
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
