"""Path Ensemble (arXiv:2308.06548) on Fashion-MNIST: does the path view help a deeper narrow ViT?

Trains ``vit_micro_patch4_28`` (128 wide) at depth 12 and 24 from scratch, with the same small budget, as:
baseline; +EnsembleScale; +path pruning (direct outputs of the first depth/3 blocks and the input path cut);
+self-distillation (final output -> every earlier block's representation through the shared norm + head);
all three. Each row is scored on the Fashion-MNIST test split and saved as a vitlab checkpoint (surgery record in
its metadata) under ``runs/compression/path_ensemble/``. Then, for the 24-layer baseline and "all": the path-removal
table (top-1 drop when one direct term leaves the output stream) as a heat map, and feature spectra (FFT amplitude
over the token grid: energy share above half the Nyquist radius, per block and for the output stream).

Writes ``benchmarks/results/path_ensemble.{csv,md,png}`` and ``path_ensemble.spectra.png``.

    nice -n 10 .venv/bin/python benchmarks/path_ensemble.py                  # the committed table
    .venv/bin/python benchmarks/path_ensemble.py --train-subset 2000 --epochs 1 --depths 12 --out /tmp/pe  # smoke

The 24-layer checkpoints are ``vit_micro_patch4_28`` built with ``depth=24``; their metadata carries
``model_args`` for that, which ``load_trained`` reads (as ``vitlab train --model-args`` writes it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "vit_micro_patch4_28"
CONFIGS = ("baseline", "+ensemble_scale", "+path_pruning", "+self_distill", "all")


def _compress_args(config: str, depth: int, args: argparse.Namespace) -> dict | None:
    es = {"ensemble_scale": True}
    prune = {"prune_direct": depth // 3}
    sd = {"self_distill": args.self_distill, "distill_temperature": args.temperature}
    return {
        "baseline": None,
        "+ensemble_scale": es,
        "+path_pruning": {"ensemble_scale": False, **prune},
        "+self_distill": {"ensemble_scale": False, **sd},
        "all": {**es, **prune, **sd},
    }[config]


def _data(args: argparse.Namespace):
    from vitlab.data import BatchLoader, load_fashion_mnist

    train = load_fashion_mnist(split="train").subset(args.train_subset, seed=0)
    test = load_fashion_mnist(split="test")
    if args.test_subset and args.test_subset < len(test):
        test = test.subset(args.test_subset, seed=0)
    return train, list(BatchLoader(test, 500, shuffle=False))


def _top1(model: torch.nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
    return 100.0 * hits / sum(len(y) for _, y in batches)


def train_one(depth: int, config: str, seed: int, train_set, args: argparse.Namespace) -> torch.nn.Module:
    """Same recipe for every row: AdamW, warmup + cosine, label smoothing, grad clipping (vitlab train's defaults)."""
    from timm.optim import create_optimizer_v2

    import vitlab
    from vitlab import compress
    from vitlab.data import BatchLoader

    torch.manual_seed(seed)
    model = vitlab.create_model(MODEL, depth=depth)
    kwargs = _compress_args(config, depth, args)
    if kwargs is not None:
        compress.apply(model, "path_ensemble", **kwargs)
    opt = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=0.05)  # 1-D params (scales) not decayed
    loader = BatchLoader(train_set, args.batch_size, shuffle=True, seed=seed, drop_last=True)
    total = len(loader) * args.epochs
    warmup = max(1, int(0.1 * total))
    step = 0
    model.train()
    for epoch in range(args.epochs):
        for x, y in loader.iter_epoch(epoch):
            lr = args.lr * (step + 1) / warmup if step < warmup else (
                1e-5 + 0.5 * (args.lr - 1e-5) * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            )  # fmt: skip
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            aux = compress.aux_losses(model)
            loss = loss + sum(aux.values()) if aux else loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
    return model.eval()


def _save(model: torch.nn.Module, depth: int, name: str, args: argparse.Namespace, extra: dict) -> Path:
    from vitlab.compress import surgery_of
    from vitlab.engine.checkpoint import save_weights

    meta = {"model": MODEL, "num_classes": 10, "in_chans": 1, "img_size": 28, "surgery": surgery_of(model), **extra}
    if depth != 12:
        meta["model_args"] = {"depth": depth}
    return save_weights(model, Path(args.runs) / f"{name}.safetensors", meta)


def _write(rows: list[dict], header: list[str], args: argparse.Namespace, extra: str = "") -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "path_ensemble.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = [
        "depth",
        "config",
        "compress_args",
        *[k for k in rows[0] if k.startswith("top1")],
        "gap_vs_12_baseline",
        "train_min",
    ]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "path_ensemble.md").write_text("\n".join(lines) + "\n" + extra)


def _analysis(models: dict[str, torch.nn.Module], batches, args: argparse.Namespace) -> str:
    from vitlab.compress.path_analysis import feature_spectra, path_contributions, plot_path_contributions, plot_spectra

    out = Path(args.out)
    tables = {name: path_contributions(m, batches) for name, m in models.items()}
    spectra = {name: feature_spectra(m, batches) for name, m in models.items()}
    plot_path_contributions(tables, out / "path_ensemble.png")
    plot_spectra(spectra, out / "path_ensemble.spectra.png")
    (out / "path_ensemble.analysis.json").write_text(json.dumps({"paths": tables, "spectra": spectra}, indent=1))
    text = ["", "## Path removal and spectra (24 layers)", ""]
    for name, rows in tables.items():
        direct = [r for r in rows if r["direct"]]
        worst = sorted(direct, key=lambda r: r["drop"])[:3]
        best = sorted(direct, key=lambda r: -r["drop"])[:3]
        neg = sum(r["drop"] < 0 for r in direct)
        text.append(
            f"- {name}: base top-1 {rows[0]['base_top1']}%; {neg}/{len(direct)} direct terms lower top-1 (removing "
            f"them helps); largest drops {[(r['layer'], r['path'], r['drop']) for r in best]}; most negative "
            f"{[(r['layer'], r['path'], r['drop']) for r in worst]}"
        )
    text += ["", "| model | stream | layer | high-band energy share | log amp high - log DC |", "|---|---|---|---|---|"]
    for name, rows in spectra.items():
        for r in rows:
            if r["stream"] == "output" or r["layer"] % 6 == 5 or r["layer"] == 0:
                text.append(f"| {name} | {r['stream']} | {r['layer']} | {r['high_frac']} | {r['dlog_amp_high']} |")
    text += ["", "![path removal](path_ensemble.png)", "", "![spectra](path_ensemble.spectra.png)", ""]
    return "\n".join(text)


def _job(depth: int, config: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score one (depth, config, seed) in a worker process (1 thread); returns its row fragment."""
    torch.set_num_threads(args.threads)
    train_set, test_batches = _data(args)
    t0 = time.time()
    path = Path(args.runs) / f"d{depth}_{config.strip('+')}_s{seed}.safetensors"
    if args.reuse and path.is_file():  # trained by an earlier invocation with the same recipe: score it again
        from vitlab.engine.checkpoint import read_metadata

        model, minutes = _load(str(path), depth), float(read_metadata(path).get("train_minutes", "nan"))
    else:
        model = train_one(depth, config, seed, train_set, args)
        minutes = (time.time() - t0) / 60
        path = _save(model, depth, path.stem, args, {"train_minutes": round(minutes, 2)})
    return {"top1": _top1(model, test_batches), "minutes": minutes, "checkpoint": str(path)}


def _load(path: str, depth: int) -> torch.nn.Module:
    """A saved row rebuilt (its depth from ``model_args``, its surgery replayed) by ``load_trained``."""
    from vitlab.engine.inference import load_trained

    return load_trained(path)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 24])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--small-configs", nargs="+", default=None, choices=CONFIGS, help="configs below the max depth")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="retrain rows whose checkpoint exists")
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--test-subset", type=int, default=2000, help="0: the whole test split (10000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--self-distill", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--analysis-images", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="rows trained in parallel worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--runs", default="runs/compression/path_ensemble")
    args = p.parse_args()
    header = [
        "# Path Ensemble (arXiv:2308.06548): 12- vs 24-layer narrow ViTs on Fashion-MNIST",
        "",
        f"`{' '.join(['python', *sys.argv])}`  ",
        f"{MODEL} (128 wide, mlp 2x) at depth 12 / 24, trained from scratch: {args.train_subset} training images, "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} wd 0.05, 10% warmup + cosine, label "
        f"smoothing 0.1, no augmentation; test top-1 on {args.test_subset or 10000} test images; seeds {args.seeds}. "
        f"Path pruning cuts depth//3 leading blocks (and the input path); self-distillation weight "
        f"{args.self_distill}, temperature {args.temperature}, exits after every block but the last "
        "(representation stream through the shared norm + head). A tiny budget (a few minutes of a contended 2-core "
        "CPU per row): all rows are far from converged, so differences of a point or two are within noise. "
        f"CPU, {args.jobs} worker(s) x {args.threads} thread(s), shared machine (accuracy only). "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    big = max(args.depths)
    small = args.configs if args.small_configs is None else args.small_configs
    # in the order the configs are given (most wanted first), the deepest first within one config
    jobs = [
        (d, c, s)
        for c in dict.fromkeys([*args.configs, *small])
        for d in sorted(args.depths, reverse=True)
        for s in args.seeds
        if c in (args.configs if d == big else small)
    ]
    done: dict[tuple[int, str, int], dict] = {}
    rows: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_job, *j, args): j for j in jobs}
        for fut in as_completed(futures):
            done[futures[fut]] = fut.result()
            print(json.dumps({"job": futures[fut], **done[futures[fut]]}), flush=True)
            rows = _rows(done, args)
            if rows:
                _write(rows, header, args)
    keep = {
        f"{big}L {c}": _load(done[(big, c, args.seeds[0])]["checkpoint"], big)
        for c in ("baseline", "all")
        if (big, c, args.seeds[0]) in done
    }
    if keep:
        torch.set_num_threads(args.threads * args.jobs)
        _, test_batches = _data(args)
        n = max(1, args.analysis_images // 500)
        _write(rows, header, args, _analysis(keep, test_batches[:n], args))


def _rows(done: dict[tuple[int, str, int], dict], args: argparse.Namespace) -> list[dict]:
    """The table so far: one row per (depth, config) whose seeds have all finished, in a fixed order."""
    rows = []
    for depth in args.depths:
        for config in CONFIGS:
            runs = [done.get((depth, config, s)) for s in args.seeds]
            if any(r is None for r in runs):
                continue
            accs = [r["top1"] for r in runs]
            rows.append({
                "depth": depth,
                "config": config,
                "compress_args": json.dumps(_compress_args(config, depth, args)),
                **{f"top1_s{s}": round(a, 2) for s, a in zip(args.seeds, accs, strict=True)},
                "top1_mean": round(sum(accs) / len(accs), 2),
                "train_min": round(sum(r["minutes"] for r in runs), 1),
                "checkpoint": ";".join(r["checkpoint"] for r in runs),
            })  # fmt: skip
    base12 = next((r["top1_mean"] for r in rows if r["depth"] == 12 and r["config"] == "baseline"), None)
    for r in rows:
        r["gap_vs_12_baseline"] = "" if base12 is None else round(r["top1_mean"] - base12, 2)
    return rows


if __name__ == "__main__":
    main()
