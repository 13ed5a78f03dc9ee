"""ViT-ResNAS on Fashion-MNIST 28 px: searched vs random architectures of equal MACs after the same retraining.

1. Train the 3-stage nano supernet (``vitlab.engine.search_run.SPACES["nano"]``: widths up to 64/128/256, heads,
   MLP widths and the second block of each stage searched) with multi-architecture sampling on a training subset.
2. Evolutionary search under a MAC budget, scored by the supernet's sub-networks on a held-out split of the
   training images.
3. Retrain from scratch, with one short recipe: the searched network, ``--randoms`` random networks within
   ``--tol`` of its MACs, and (ablation) the searched network with a plain strided-conv reduction (equal MACs).

Writes ``benchmarks/results/vit_resnas.{csv,md}`` after every row and each retrained model as a vitlab checkpoint
under ``runs/compression/vit_resnas/`` (path in the CSV). Run:
``nice -n 10 .venv/bin/python benchmarks/vit_resnas.py``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import random
import sys
import time
from pathlib import Path

import torch

from vitlab.engine.search_run import (
    SPACES,
    SearchRunConfig,
    evaluate,
    export_config,
    load_split,
    sample_near,
    save_model,
    train_model,
    train_supernet,
)
from vitlab.models.vit_resnas import ViTResNAS
from vitlab.search import EvolutionConfig, Supernet, evolutionary_search

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["row", "reduction", "mmacs", "params_k", "supernet_val_top1", "top1", "network_def", "checkpoint"]


def _write(rows: list[dict], header: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [
        *header,
        "",
        "| row | reduction | MMACs | params (k) | supernet held-out top-1 | retrained test top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sv = f"{r['supernet_val_top1']:.2f}" if r["supernet_val_top1"] != "" else "-"
        lines.append(
            f"| {r['row']} | {r['reduction']} | {r['mmacs']:.3f} | {r['params_k']:.1f} | {sv} | {r['top1']:.2f} |"
        )
    lines += ["", "Architectures (official `network_def` form) are in the CSV."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--val-subset", type=int, default=1000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3, help="supernet epochs")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--retrain-epochs", type=int, default=3)
    p.add_argument("--budget-mmacs", type=float, default=8.0)
    p.add_argument("--population", type=int, default=24)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--parents", type=int, default=6)
    p.add_argument("--mutations", type=int, default=6)
    p.add_argument("--crossovers", type=int, default=6)
    p.add_argument("--randoms", type=int, default=2)
    p.add_argument("--tol", type=float, default=0.03, help="MAC tolerance of the random architectures")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vit_resnas"))
    p.add_argument("--runs", default=str(ROOT / "runs/compression/vit_resnas"))
    a = p.parse_args()
    torch.set_num_threads(2)
    t_start = time.time()
    evo = EvolutionConfig(a.population, a.iterations, a.parents, a.mutations, a.crossovers, 0.3, a.seed)
    cfg = SearchRunConfig(
        budget_mmacs=a.budget_mmacs,
        train_subset=a.train_subset,
        val_subset=a.val_subset,
        test_subset=a.test_subset,
        epochs=a.epochs,
        warmup_epochs=a.warmup_epochs,
        retrain_epochs=a.retrain_epochs,
        evolution=evo,
        seed=a.seed,
    )
    space, out, runs = SPACES["nano"], Path(a.out), Path(a.runs)
    header = [
        "# ViT-ResNAS (arXiv:2109.00642): searched vs random architectures at equal MACs, Fashion-MNIST 28 px",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Date {datetime.date.today()}, torch {torch.__version__}, seed {a.seed} (one seed), CPU (2 shared cores).  ",
        f"Data: {a.train_subset} training images (supernet and retraining), a disjoint held-out {a.val_subset} "
        f"training images (search score), {a.test_subset} test images (top-1 below); no augmentation.  ",
        f"Supernet: `SPACES['nano']` (largest = `vit_resnas_nano_28`, {space.macs(space.largest()) / 1e6:.2f} MMACs; "
        f"smallest {space.macs(space.smallest()) / 1e6:.2f}), {a.epochs} epochs of multi-architecture training "
        f"({cfg.batch_size // cfg.example_per_arch} sub-networks x {cfg.example_per_arch} images per step, "
        f"{a.warmup_epochs} warm-up epoch of progressive unlocking), AdamW lr {cfg.lr}, cosine.  ",
        f"Search: budget {a.budget_mmacs} MMACs; population {a.population}, {a.iterations} iterations, {a.parents} "
        f"parents, {a.mutations} mutations, {a.crossovers} crossovers, mutation prob 0.3 (paper: 500/20/75/75/75).  ",
        f"Retraining: every row from scratch, {a.retrain_epochs} epochs, same recipe; random rows within "
        f"{a.tol:.0%} of the searched MACs. MACs counted as `vitlab.bench` counts them.  ",
        "A tiny CPU budget (minutes, not the paper's GPU-days): differences of a point or two are within seed noise.",
    ]
    train, val, test = load_split(a.train_subset, a.val_subset, a.test_subset, a.seed)
    supernet = train_supernet(Supernet(space), train, cfg, print)
    t0 = time.time()
    result = evolutionary_search(
        space, lambda arch: evaluate(supernet.extract(arch), val), int(a.budget_mmacs * 1e6), evo
    )
    print(f"search: {len(result.history)} scored in {time.time() - t0:.0f}s, best {result.score:.2f} at {result.macs}")
    rng = random.Random(a.seed + 1)
    todo = [("searched (EA)", result.best, "residual")]
    todo += [(f"random {i + 1}", sample_near(space, result.macs, a.tol, rng), "residual") for i in range(a.randoms)]
    if not a.no_ablation:
        todo.append(("searched, plain strided-conv reduction (ablation)", result.best, "conv"))
    rows: list[dict] = []
    for i, (name, arch, reduction) in enumerate(todo):
        config = export_config(space, arch, reduction)
        model = ViTResNAS(space.to_spec(arch), img_size=28, in_chans=1, num_classes=10, reduction=reduction)
        sv = evaluate(supernet.extract(arch), val) if reduction == "residual" else ""
        top1 = evaluate(train_model(model, train, a.retrain_epochs, cfg.batch_size, cfg.lr, a.seed, print), test)
        ckpt = save_model(model, runs / f"row{i}_{reduction}.safetensors", config, top1)
        rows.append(
            {
                "row": name,
                "reduction": reduction,
                "mmacs": config["macs"] / 1e6,
                "params_k": sum(p.numel() for p in model.parameters()) / 1e3,
                "supernet_val_top1": sv,
                "top1": top1,
                "network_def": str(config["model_args"]["network_def"]),
                "checkpoint": str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else str(ckpt),
            }
        )
        print(rows[-1])
        _write(rows, [*header, f"Elapsed so far: {(time.time() - t_start) / 60:.1f} min."], out)


if __name__ == "__main__":
    main()
