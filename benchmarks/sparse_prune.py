"""Sparse then Prune (arXiv 2307.11988) on the shared Fashion-MNIST host: does the attention-sparsity regulariser
make a ViT easier to prune, and what does structured pruning keep?

From a trained host (``runs/compression/host_vit_micro_s0``):

1. three fine-tunes of the host, one epoch on a training subset: no regulariser, ``attn_sparsity`` with
   ``layers="last"`` (the official code) and ``layers="all"`` (the paper's wording), weight 0.01;
2. for each: global magnitude pruning (``compress magnitude``) at several sparsities, top-1 one-shot, and for
   some sparsities after a short fine-tune that keeps the mask (``--compress magnitude`` with ``keep_mask``);
3. from the unregularised fine-tune: structured pruning (``compress structured``) of heads and MLP channels at
   several fractions, with L1 and Taylor importance, one-shot and after a short fine-tune.

Fine-tunes run ``vitlab.engine.train`` with ``--init-from`` (the Python API of ``vitlab train``). Every scored
model is saved as a vitlab checkpoint (its surgery record included) so ``benchmarks/compression.py`` can
reload it and measure params and img/s on a quiet machine; this script measures no speed.
Writes ``benchmarks/results/sparse_prune.{csv,md,png}``.

    .venv/bin/python benchmarks/sparse_prune.py --host runs/compression/host_vit_micro_s0
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {"none": None, "last": "last", "all": "all"}  # arm -> attn_sparsity layers
COLS = [
    "arm", "method", "setting", "sparsity", "params", "top1_oneshot", "top1_finetuned", "sparsity_after_ft",
    "attn_entropy_last", "checkpoint_oneshot", "checkpoint_finetuned",
]  # fmt: skip


def finetune(args: argparse.Namespace, name: str, init_from: str, subset: int, compress: str = "", cargs=None, lr=None):
    """One ``vitlab train --init-from`` run in this process (reused when its summary exists); its summary."""
    from vitlab.engine import RunConfig, train

    summary = Path(args.runs) / name / "summary.json"
    if not summary.is_file():
        cfg = RunConfig(out=args.runs, name=name, device="cpu", seed=args.seed, log_every=50)
        cfg.model.model, cfg.model.init_from = args.meta["model"], str(init_from)
        cfg.data.dataset, cfg.data.batch_size = "fashion_mnist", args.batch_size
        cfg.data.train_subset, cfg.data.test_subset = subset, args.ft_eval_subset  # the engine's own evals
        lr = lr or args.lr
        cfg.optim.epochs, cfg.optim.lr, cfg.optim.warmup_epochs = 1.0, lr, 0.1
        cfg.optim.min_lr, cfg.optim.label_smoothing = lr / 20, 0.1
        cfg.compression.compress = compress
        cfg.compression.compress_args = json.dumps(cargs) if cargs else ""
        print(f"fine-tune {name}: init {init_from}, {subset} images, compress {compress or '-'} {cargs or ''}")
        train(cfg)
    return json.loads(summary.read_text())


def top1(model: nn.Module, batches) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def attn_entropy_last(model: nn.Module, x: torch.Tensor) -> float:
    """Mean entropy (nats) of the last block's attention rows: does the regulariser sparsify attention?"""
    from vitlab.compress.attn_sparsity import _probs

    got = []
    h = model.blocks[-1].attn.register_forward_hook(lambda m, a, o: got.append(_probs(m, a[0])))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    p = got[0]
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


def save(model: nn.Module, meta: dict, path: Path) -> str:
    from vitlab import compress
    from vitlab.engine.checkpoint import save_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    return str(save_weights(model, path, {**meta, "surgery": compress.surgery_of(model)}))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="runs/compression/host_vit_micro_s0")
    p.add_argument("--runs", default="runs/compression/sparse_prune")
    p.add_argument("--train-subset", type=int, default=10000, help="images of the regulariser fine-tunes")
    p.add_argument("--ft-subset", type=int, default=2000, help="images of the short post-pruning fine-tunes")
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--ft-eval-subset", type=int, default=100, help="test images of the engine's in-run evals")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="peak lr of the regulariser fine-tunes")
    p.add_argument("--ft-lr", type=float, default=1e-4, help="peak lr of the short post-pruning fine-tunes")
    p.add_argument("--weight", type=float, default=0.01, help="attn_sparsity weight (paper and code: 0.01)")
    p.add_argument("--strong-weight", type=float, default=1.0, help="extra arm 'all_strong' (layers=all); 0: off")
    p.add_argument("--sparsities", type=int, nargs="+", default=[10, 30, 50, 70, 90], help="magnitude, %")
    p.add_argument("--ft-sparsities", type=int, nargs="+", default=[50, 70, 90])
    p.add_argument("--fractions", type=int, nargs="+", default=[20, 30, 50], help="structured heads = mlp, %")
    p.add_argument("--criteria", nargs="+", default=["l1", "taylor"])
    p.add_argument("--taylor-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sparse_prune")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV (e.g. after a cut run)")
    args = p.parse_args()
    if args.plot_only:
        with open(Path(args.results) / f"{args.name}.csv") as f:
            rows = [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(f)]
        return plot(rows, Path(args.results) / f"{args.name}.png")
    torch.manual_seed(args.seed)
    from vitlab.engine import RunConfig, load_trained
    from vitlab.engine.setup import build_datasets, build_loader

    host, args.meta, _ = load_trained(args.host)
    meta = {k: v for k, v in args.meta.items() if k != "surgery"}
    cfg = RunConfig(seed=args.seed)
    cfg.model.img_size, cfg.data.batch_size = args.meta["img_size"], 250
    cfg.data.test_subset, cfg.data.train_subset = args.test_subset, args.train_subset
    sets = build_datasets(cfg, splits=("train", "test"))
    test = list(build_loader(sets["test"], cfg, train=False, in_chans=args.meta["in_chans"]).iter_epoch(0))
    cfg.data.batch_size = args.batch_size
    train_it = build_loader(sets["train"], cfg, train=False, in_chans=args.meta["in_chans"]).iter_epoch(0)
    taylor = [{"image": x, "label": y} for _, (x, y) in zip(range(args.taylor_batches), train_it, strict=False)]
    probe = test[0][0][:64]
    args.host_top1 = top1(host, test)
    rows = [
        dict(arm="host", method="dense", setting="", sparsity=0.0, params=n_params(host), top1_oneshot=args.host_top1,
             attn_entropy_last=attn_entropy_last(host, probe), checkpoint_oneshot=str(args.host))
    ]  # fmt: skip
    write(rows, args)
    arms = [(a, layers, args.weight) for a, layers in ARMS.items()]
    arms += [("all_strong", "all", args.strong_weight)] if args.strong_weight else []
    for arm, layers, weight in arms:  # structured right after arm none: the lead's table needs it first
        cargs = {"weight": weight, "layers": layers} if layers else None
        s = finetune(args, f"ft_{arm}", args.host, args.train_subset, "attn_sparsity" if layers else "", cargs)
        model, _, _ = load_trained(s["checkpoint"])
        setting = f"attn_sparsity w={weight:g} layers={layers}" if layers else "no regulariser"
        rows.append(
            dict(
                arm=arm,
                method="dense (1 epoch fine-tune)",
                setting=setting,
                sparsity=0.0,
                params=n_params(model),
                top1_oneshot=top1(model, test),
                attn_entropy_last=attn_entropy_last(model, probe),
                checkpoint_oneshot=s["checkpoint"],
            )
        )
        write(rows, args)
        if arm == "none":
            structured_rows(args, model, meta, test, taylor, rows)
        magnitude_rows(args, arm, model, s["checkpoint"], meta, test, rows)
    plot(rows, Path(args.results) / f"{args.name}.png")


def magnitude_rows(args, arm: str, base: nn.Module, ckpt: str, meta: dict, test, rows: list[dict]) -> None:
    """Global magnitude pruning of one arm at each sparsity; a mask-keeping fine-tune at ``--ft-sparsities``."""
    from vitlab import compress
    from vitlab.engine import load_trained

    for pct in args.sparsities:
        model = compress.apply(copy.deepcopy(base), "magnitude", amount=pct / 100)
        row = dict(
            arm=arm,
            method="magnitude (global L1, unstructured)",
            setting=f"amount={pct}%",
            sparsity=compress.sparsity(model),
            params=n_params(model),
            top1_oneshot=top1(model, test),
            checkpoint_oneshot=save(model, meta, Path(args.runs) / "oneshot" / f"{arm}_mag{pct}.safetensors"),
        )
        if pct in args.ft_sparsities:
            cargs = {"amount": pct / 100, "keep_mask": True}
            s = finetune(args, f"{arm}_mag{pct}", ckpt, args.ft_subset, "magnitude", cargs, lr=args.ft_lr)
            tuned, _, _ = load_trained(s["checkpoint"])
            row.update(
                top1_finetuned=top1(tuned, test),
                sparsity_after_ft=compress.sparsity(tuned),
                checkpoint_finetuned=s["checkpoint"],
            )
        rows.append(row)
        write(rows, args)


def structured_rows(args, base: nn.Module, meta: dict, test, taylor: list[dict], rows: list[dict]) -> None:
    """Structured pruning (heads = MLP fraction) with each importance criterion, one-shot and fine-tuned."""
    from vitlab import compress
    from vitlab.compress.structured import importance, prune_structured
    from vitlab.engine import load_trained

    for crit in args.criteria:
        for pct in args.fractions:
            model = copy.deepcopy(base)
            scores = importance(model, taylor if crit == "taylor" else None, criterion=crit)
            report = prune_structured(model, heads=pct / 100, mlp=pct / 100, scores=scores)
            kwargs = {"heads": pct / 100, "mlp": pct / 100, "importance_criterion": crit}
            compress.record_surgery(model, "compress", "structured", kwargs, report)
            path = save(model, meta, Path(args.runs) / "oneshot" / f"none_struct_{crit}{pct}.safetensors")
            s = finetune(args, f"none_struct_{crit}{pct}", path, args.ft_subset, lr=args.ft_lr)
            tuned, _, _ = load_trained(s["checkpoint"])
            rows.append(
                dict(
                    arm="none",
                    method=f"structured ({crit})",
                    setting=f"heads=mlp={pct}%",
                    sparsity=1 - report["params_after"] / report["params_before"],
                    params=report["params_after"],
                    top1_oneshot=top1(model, test),
                    top1_finetuned=top1(tuned, test),
                    checkpoint_oneshot=path,
                    checkpoint_finetuned=s["checkpoint"],
                )
            )
            write(rows, args)


def _value(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def write(rows: list[dict], args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        w.writerows([{c: r.get(c) for c in COLS} for r in rows])

    def fmt(v):
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    shown = [c for c in COLS if not c.startswith("checkpoint")]
    header = (
        "# Sparse then Prune: attention-sparsity regulariser, magnitude and structured pruning\n\n"
        f"Host: `{args.host}` ({args.meta['model']}, {args.meta['img_size']} px Fashion-MNIST), "
        f"{args.host_top1:.2f}% top-1. Top-1 on {args.test_subset or 10000} test images (seed {args.seed}; one seed "
        f"only). Arms fine-tune the host 1 epoch on {args.train_subset} training images (lr {args.lr:g}, cosine, "
        f"batch {args.batch_size}): `none`, `last` (attn_sparsity weight {args.weight:g}, last block: official "
        "code), `all` (every block: the paper)"
        + (
            f", `all_strong` (every block, weight {args.strong_weight:g}, to show the penalty's direction)"
            if args.strong_weight
            else ""
        )
        + ". `sparsity`: fraction of Linear/Conv weights zeroed (magnitude; "
        "classifier kept dense) or fraction of parameters removed (structured). `top1_finetuned`: after a 1-epoch "
        f"fine-tune on {args.ft_subset} images, lr {args.ft_lr:g} (magnitude: mask kept, `sparsity_after_ft` "
        "checks it). "
        "`attn_entropy_last`: mean entropy (nats) of the last block's attention rows on 64 test images "
        "(uniform over 50 tokens = 3.91). **Unstructured (magnitude) zeros give no speed-up on dense kernels: "
        "same params and img/s as dense**; structured pruning really removes parameters (img/s: measured by "
        "`benchmarks/compression.py` from the checkpoints in the CSV). Structured Taylor importance uses "
        f"{args.taylor_batches} training batches. Recipe sizes are cut to fit a shared 2-core CPU: one top-1 has a "
        f"standard error of about {100 * (0.2 * 0.8 / (args.test_subset or 10000)) ** 0.5:.1f} points at 80%.\n\n"
        f"Command: `{' '.join(sys.argv)}`; torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average {os.getloadavg()[0]:.1f}."
    )
    lines = [header, "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in shown) + " |" for r in rows]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(lines[-1], flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    arms = list(dict.fromkeys(r["arm"] for r in rows if r["arm"] != "host"))
    for arm, color in zip(arms, ("C0", "C1", "C2", "C5"), strict=False):
        dense = next(r for r in rows if r["arm"] == arm and r["sparsity"] == 0.0)
        mag = [dense, *[r for r in rows if r["arm"] == arm and r["method"].startswith("magnitude")]]
        ax.plot(
            [100 * r["sparsity"] for r in mag],
            [r["top1_oneshot"] for r in mag],
            "-o",
            color=color,
            label=f"{arm}: one-shot",
        )
        ft = [r for r in mag if r.get("top1_finetuned") is not None]
        ax.plot(
            [100 * r["sparsity"] for r in ft],
            [r["top1_finetuned"] for r in ft],
            "--s",
            color=color,
            label=f"{arm}: + fine-tune (mask kept)",
        )
    ax.set(xlabel="weights zeroed (%)", ylabel="top-1 (%)", title="global magnitude pruning (regulariser arms)")
    ax.legend(fontsize=7)
    for crit, color in (("l1", "C3"), ("taylor", "C4")):
        st = [r for r in rows if r["method"] == f"structured ({crit})"]
        if st:
            bx.plot(
                [100 * r["sparsity"] for r in st],
                [r["top1_oneshot"] for r in st],
                "-o",
                color=color,
                label=f"{crit}: one-shot",
            )
            bx.plot(
                [100 * r["sparsity"] for r in st],
                [r["top1_finetuned"] for r in st],
                "--s",
                color=color,
                label=f"{crit}: + fine-tune",
            )
    dense = next(r for r in rows if r["arm"] == "none" and r["sparsity"] == 0.0)
    bx.axhline(dense["top1_oneshot"], color="gray", ls=":", label="unpruned (arm none)")
    bx.set(xlabel="parameters removed (%)", ylabel="top-1 (%)", title="structured heads + MLP channels (arm none)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
