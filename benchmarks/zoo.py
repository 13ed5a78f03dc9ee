"""The model zoo table: every backbone family's reference variant side by side on this machine.

Per family (a paper of kind B): its smallest registered variant at 224 px (240 for CrossViT, 256 for
CI2P-ViT) that carries reference figures. Columns: params, GMACs, CPU img/s at batch 32 (heavy models at a
small batch, stated) and batch-1 latency, with timm's own implementation timed interleaved in the same run
where vitlab reaches a timm model; share of the float32 matmul peak measured in the same run; Fashion-MNIST
top-1 of the same variant after a short recipe (1 channel, small images; cached per model under
``runs/zoo/`` so a re-run only trains what is new).
Writes ``benchmarks/results/zoo.{csv,md}`` and the Pareto plot ``zoo.png`` (top-1 against img/s).

    .venv/bin/python benchmarks/zoo.py                       # speed + accuracy (trains what is not cached)
    .venv/bin/python benchmarks/zoo.py --no-train            # speed only
    .venv/bin/python benchmarks/zoo.py --models cvt_13_224 swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vitlab.bench import (
    BenchRow,
    Timing,
    allocator_setting,
    bench_models,
    count_flops,
    count_flops_meta,
    count_params,
    describe_machine,
    matmul_peak_gflops,
    measure_latency,
)
from vitlab.bench.speed import prepare_forward, time_interleaved
from vitlab.cli import reexec_with_tuned_allocator
from vitlab.engine import RunConfig, train
from vitlab.models import VARIANTS, create_model, get_variant

RESULTS = Path(__file__).resolve().parent / "results"
HIERARCHICAL_TARGET = "swin_tiny_patch4_window7_224"  # every hierarchical model should reach its peak share


def reference_models() -> list[str]:
    """Per backbone paper, its smallest 224-256 px variant with reference params/FLOPs."""
    best: dict[int, tuple[float, str]] = {}
    for name, spec in VARIANTS.items():
        if "B" not in spec.paper.kind or not 224 <= spec.img_size <= 256 or spec.ref_params_m is None:
            continue
        key = spec.paper.number
        if key not in best or spec.ref_params_m < best[key][0]:
            best[key] = (spec.ref_params_m, name)
    return [best[k][1] for k in sorted(best)]


def has_deploy_form(name: str) -> bool:
    """Whether ``name`` is a reparameterisable model (``reparameterize()``), meant to be run in its deploy form."""
    with torch.device("meta"):
        return callable(getattr(create_model(name), "reparameterize", None))


def bench_deploy_form(name: str, batch_size: int) -> BenchRow:
    """Params, FLOPs and speed of ``name`` after ``reparameterize()``: the form a user deploys it in."""
    spec = get_variant(name)
    input_size = (spec.in_chans, spec.img_size, spec.img_size)
    model = create_model(name).eval()
    model.reparameterize()
    flops = count_flops(model, input_size)
    step, _ = prepare_forward(model, input_size, batch_size)
    (seconds,) = time_interleaved([step], warmup=2, repeats=5, min_seconds=2.0)
    timing = Timing(batch_size, seconds, warmup=2)
    return BenchRow(
        model=name,
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        batch_size=batch_size,
        device="cpu",
        amp=False,
        compile=False,
        channels_last=False,
        params_m=count_params(model) / 1e6,
        gflops=flops / 1e9,
        gmacs=flops / 2e9,
        img_per_s=timing.img_per_s,
        img_per_s_min=timing.img_per_s_min,
        img_per_s_max=timing.img_per_s_max,
        latency_ms=measure_latency(model, input_size, min_seconds=2.0).latency_ms,
        note="deploy form (reparameterize())",
    )


def train_accuracy(name: str, args: argparse.Namespace) -> dict | None:
    """Fashion-MNIST test top-1 of ``name`` after the short recipe; cached in ``runs/zoo/<name>``.

    Models costing more than ``--train-max-gmacs`` per image at the training size are not trained here.
    """
    run = Path(args.runs) / name
    summary = run / "summary.json"
    if not summary.exists():
        if not args.train:
            return None
        try:
            gmacs = count_flops_meta(name, img_size=args.train_img_size, in_chans=1) / 2e9
        except Exception as e:  # e.g. a model that cannot be built for the small training size
            return {
                "top1": f"not trained (cannot run at {args.train_img_size} px: {type(e).__name__})",
                "train_seconds": "",
            }
        if gmacs > args.train_max_gmacs:
            return {"top1": f"not trained ({gmacs:.2f} GMACs/img at {args.train_img_size} px)", "train_seconds": ""}
        cfg = RunConfig()
        cfg.model.model, cfg.model.img_size = name, args.train_img_size
        cfg.data.train_subset, cfg.optim.epochs = args.train_subset, args.train_epochs
        cfg.out, cfg.name = str(Path(args.runs)), name
        t0 = time.perf_counter()
        try:
            train(cfg)
        except Exception as e:  # one family failing must not lose the others' rows
            print(f"training {name} failed: {e}")
            return {"top1": f"training failed: {type(e).__name__}", "train_seconds": ""}
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s")
    data = json.loads(summary.read_text())
    return {"top1": round(data["test_top1"], 2), "train_seconds": round(data["train_seconds"])}


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both)."""
    return [i for i, (x, y) in enumerate(points) if not any(a >= x and b >= y and (a, b) != (x, y) for a, b in points)]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if isinstance(r["fmnist_top1"], float)]
    pts = [(r["img_per_s"], r["fmnist_top1"]) for r in trained]
    names = [r["model"] for r in trained]
    fig, ax = plt.subplots(figsize=(8, 5))
    if pts:
        front = sorted(pareto(pts), key=lambda i: pts[i][0])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", label="Pareto front")
        for (x, y), n in zip(pts, names, strict=True):
            ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("CPU img/s at the model's input size (log)")
    ax.set_ylabel("Fashion-MNIST top-1 (%) after the short recipe")
    ax.set_title("vitlab zoo: reference variant per family")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="default: one reference variant per family")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-epochs", type=float, default=1.0)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--train-img-size", type=int, default=32)
    parser.add_argument("--train-max-gmacs", type=float, default=0.5, help="skip training heavier models (per image)")
    parser.add_argument("--heavy-gmacs", type=float, default=40.0, help="time models above this at --heavy-batch")
    parser.add_argument("--heavy-batch", type=int, default=4)
    parser.add_argument("--runs", default="runs/zoo")
    parser.add_argument("--reuse-speed", action="store_true", help="use the timings saved by the last run")
    parser.add_argument("--out", default=str(RESULTS / "zoo"))
    args = parser.parse_args()
    reexec_with_tuned_allocator([sys.executable, *sys.argv])  # DESIGN.md: up to 2x on CPU
    names = args.models or reference_models()
    for n in names:
        get_variant(n)  # unknown names fail before anything runs
    speed_cache = Path(args.runs) / "speed.json"
    if args.reuse_speed and speed_cache.exists():  # re-draw the table after training without re-timing
        cached = json.loads(speed_cache.read_text())
        peak = cached["matmul_peak_gflops"]
        rows_b = [BenchRow(**r) for r in cached["rows"] if r["model"] in names]
    else:
        peak = matmul_peak_gflops()
        rows_b = []
        for n in names:  # one at a time: very heavy models are timed at a smaller batch (stated in the table)
            heavy = count_flops_meta(n) / 2e9 > args.heavy_gmacs
            batch = args.heavy_batch if heavy else args.batch_size
            if has_deploy_form(n):  # reparameterisable models run (and are counted) in their deploy form
                print(f"{n}: deploy form")
                rows_b.append(bench_deploy_form(n, batch))
            else:
                rows_b += bench_models([n], batch_size=batch, baseline="timm", progress=print)
        peak = max(peak, matmul_peak_gflops())  # measured on both sides: a busy machine shows as a gap
        speed_cache.parent.mkdir(parents=True, exist_ok=True)
        speed_cache.write_text(json.dumps({"matmul_peak_gflops": peak, "rows": [asdict(r) for r in rows_b]}))
    rows = []
    for b in rows_b:
        spec = get_variant(b.model)
        acc = train_accuracy(b.model, args)
        rows.append(
            {
                "model": b.model,
                "paper": f"#{spec.paper.number} {spec.paper.title.split(':')[0]}",
                "source": "timm" if spec.timm_native else "vitlab" + (", deploy form" if "deploy" in b.note else ""),
                "topology": "isotropic" if spec.isotropic else "hierarchical/other",
                "batch": b.batch_size,
                "params_m": round(b.params_m, 2),
                "gmacs": round(b.gmacs, 2),
                "img_per_s": round(b.img_per_s, 1),
                "latency_ms": round(b.latency_ms, 1) if b.latency_ms else "",
                "pct_matmul_peak": round(100 * b.gflops * b.img_per_s / peak, 1),
                "timm_img_per_s": round(b.baseline_img_per_s, 1) if b.baseline_img_per_s else "",
                "ratio_vs_timm": round(b.ratio, 2) if b.ratio else "",
                "fmnist_top1": acc["top1"] if acc else "",
                "fmnist_train_s": acc["train_seconds"] if acc else "",
            }
        )
    machine = describe_machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    recipe = (
        f"{args.train_epochs:g} epoch(s) on {args.train_subset} training images at {args.train_img_size} px, "
        "1 channel, the quickstart optimiser (AdamW 2e-3, batch 128, cosine, label smoothing 0.1); full test set"
    )
    lines = [
        "# vitlab zoo: one reference variant per backbone family",
        "",
        f"Machine: {machine.get('cpu')} ({machine.get('cores')} cores), torch threads {machine.get('torch_threads')}; "
        f"allocator: {allocator_setting()}; torch {machine.get('torch')}, timm {machine.get('timm')}.",
        f"Matmul peak (float32 2048^3, measured before and after the timings): {peak:.0f} GFLOP/s. "
        f"Date: {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/zoo.py`.",
        "img/s at each model's own input size (224; CrossViT 240, CI2P-ViT 256), batch as listed; "
        "models with `reparameterize()` (FMViT) are timed and counted (params, GMACs) in their deploy form, "
        "reparameterised as a user runs them; "
        "latency at batch 1; ratio = vitlab / timm's implementation "
        "timed interleaved (timm-reached models). Fashion-MNIST top-1: " + recipe + ".",
        "",
        "| model | paper | source | params (M) | GMACs | batch | img/s | latency (ms) | % matmul peak | timm img/s "
        "| ratio | FMNIST top-1 | train (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['paper']} | {r['source']} | {r['params_m']} | {r['gmacs']} | {r['batch']} "
            f"| {r['img_per_s']} "
            f"| {r['latency_ms']} | {r['pct_matmul_peak']} | {r['timm_img_per_s']} | {r['ratio_vs_timm']} "
            f"| {r['fmnist_top1']} | {r['fmnist_train_s']} |"
        )
    swin = next((r for r in rows if r["model"] == HIERARCHICAL_TARGET), None)
    if swin:
        below = [
            r["model"] for r in rows if r["topology"] != "isotropic" and r["pct_matmul_peak"] < swin["pct_matmul_peak"]
        ]
        lines += [
            "",
            f"Hierarchical models below Swin-T's {swin['pct_matmul_peak']}% of peak: {', '.join(below) or 'none'}.",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
