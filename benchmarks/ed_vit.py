"""ED-ViT (arXiv:2410.11650): class-wise split of the shared vit_micro host into N = 2, 3, 5 pruned, distilled
sub-models plus a fusion head, served one process per sub-model (torch.distributed gloo on 127.0.0.1).

Rows: the unsplit host; per N, ED-ViT (Taylor importance on each part's own classes) and the uniform-pruning
ablation (the same structured fractions, importance of the host on all classes, so every part has the same size).
Columns: top-1 with the fusion MLP and with arg-max over the parts (ablation), parameters per process (largest part;
rank 0 also holds the fusion head), and latency per batch: each process's forward and end to end at rank 0
(broadcast, forwards, gather, fusion). Each split directory is saved under ``runs/compression/ed_vit/`` (every part
a vitlab checkpoint with its surgery record) and named in the CSV. Writes ``benchmarks/results/ed_vit.{csv,md}``,
rewritten after every row.

    .venv/bin/python benchmarks/ed_vit.py            # the recorded table (about 20-25 min on 2 busy cores)
    .venv/bin/python benchmarks/ed_vit.py --smoke    # wiring check in a few minutes (numbers meaningless)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "method",
    "parts",
    "importance",
    "train_images",
    "top1",
    "top1_argmax",
    "delta_top1",
    "params_per_process",
    "params_share_pct",
    "params_total",
    "fits_40pct",
    "part_ms",
    "end_to_end_ms",
    "single_process_ms",
    "served_equals_single",
    "checkpoint",
]


def _median_ms(fn, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        fn(x)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def _serve(split_dir: Path, split, x: torch.Tensor, batch: int, repeats: int) -> tuple[list[float], float, bool]:
    """Median per-process forward ms and end-to-end ms of ``repeats`` served batches; served == one process?"""
    from vitlab.engine.split_serve import SplitServer

    xb = x[:batch]
    with SplitServer(split_dir, backend="gloo", timeout_s=120) as server:
        server.infer(xb)  # warm-up
        results = [server.infer(xb) for _ in range(repeats)]
    with torch.no_grad():
        same = torch.allclose(results[0].logits, split(xb), atol=1e-4, rtol=1e-4)
    parts = [
        round(1000 * statistics.median(r.part_seconds[i] for r in results), 2)
        for i in range(len(results[0].part_seconds))
    ]
    return parts, round(1000 * statistics.median(r.seconds for r in results), 2), bool(same)


def _write(rows: list[dict], header: list[str], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [*header, "", "| " + " | ".join(FIELDS[:-1]) + " |", "|" + "---|" * (len(FIELDS) - 1)]
    lines += ["| " + " | ".join(str(r[k]) for k in FIELDS[:-1]) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def merge(specs: list[str], stem: Path, note: str = "") -> None:
    """One table from several runs' CSVs (``path.csv:TRAIN_IMAGES``; the markdown beside the first gives the header)."""
    rows: list[dict] = []
    header: list[str] = []
    for spec in specs:
        path, train_images = spec.rsplit(":", 1)
        text = Path(path).with_suffix(".md").read_text()
        lines = text.split("\n| method")[0].rstrip().splitlines()
        header = header or lines
        header += [f"Merged from `{path}` ({train_images} training images): {lines[2]}"]
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["method"].startswith("host") and any(r["method"].startswith("host") for r in rows):
                    continue
                host = row["method"].startswith("host")
                row["train_images"] = "-" if host else row.get("train_images") or train_images
                rows.append(row)
    _write(rows, [*header, *([note] if note else [])], stem)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="runs/compression/host_vit_micro_s0")
    p.add_argument("--parts", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--importance", nargs="+", default=["own", "all"], choices=["own", "all"])
    p.add_argument("--heads", type=float, default=0.5)
    p.add_argument("--mlp", type=float, default=0.75)
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--test-subset", type=int, default=5000)
    p.add_argument("--distill-epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill-on", default="own", choices=["own", "all"])
    p.add_argument("--fusion-epochs", type=int, default=10)
    p.add_argument("--serve-batch", type=int, default=64)
    p.add_argument("--serve-repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/compression/ed_vit")
    p.add_argument("--results", default=str(RESULTS / "ed_vit"))
    p.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the wiring")
    p.add_argument("--merge", nargs="+", help="CSV:TRAIN_IMAGES of earlier runs: write one table of them and stop")
    p.add_argument("--note", default="", help="with --merge: a paragraph written above the table")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, Path(args.results), args.note)
        return
    if args.smoke:
        args.train_subset, args.test_subset, args.parts, args.serve_repeats = 600, 300, [2], 2
        args.runs, args.results = "/tmp/ed_vit_smoke/runs", "/tmp/ed_vit_smoke/ed_vit"

    from vitlab.compress.split import greedy_placement, param_bytes, param_count
    from vitlab.engine.split_run import build_split, evaluate_split, load_data, load_host, predict_logits, save_split

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    host, meta, run = load_host(args.host)
    x, y = load_data(meta, run, "train", args.train_subset, args.seed)
    tx, ty = load_data(meta, run, "test", args.test_subset, args.seed)
    teacher = predict_logits(host, x)
    host_top1 = round(100.0 * float((predict_logits(host, tx).argmax(1) == ty).float().mean()), 2)
    host_params, host_bytes = param_count(host), param_bytes(host)
    header = [
        "# ED-ViT: class-wise split of vit_micro_patch4_28 (Fashion-MNIST) into N sub-models",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"seed {args.seed}.",
        f"Host `{args.host}` ({host_params:,} params, top-1 {host_top1}% on these test images). Recipe per part: "
        f"structured pruning heads {args.heads} / MLP channels {args.mlp} of every block (Taylor importance on "
        f"{16 * 64} images), then {args.distill_epochs} epoch of soft distillation from the host on "
        f"{'its own classes' if args.distill_on == 'own' else 'all'} images of a {len(y)}-image training subset "
        f"(AdamW lr {args.lr}, batch 64); fusion MLP {args.fusion_epochs} epochs on the frozen parts' logits; "
        f"test on {len(ty)} test images.",
        "`importance` own = ED-ViT's class-wise importance; all = uniform pruning (host's importance on all classes, "
        "same fractions, equal size). `top1_argmax` = arg-max over the parts' logits (no fusion MLP). "
        "`params_per_process` = the largest part (rank 0 adds the fusion head's "
        "few hundred parameters); `fits_40pct` = greedy placement succeeded with one device per part of 40% of the "
        "host's bytes.",
        "**Latency columns were measured under heavy CPU contention (other jobs on the 2 shared cores); they show "
        "the wiring, not the speed: the lead re-runs timings on a quiet machine.** `part_ms`: median forward of "
        f"each process per batch of {args.serve_batch}; `end_to_end_ms`: rank 0's broadcast + forwards + gather + "
        "fusion; `single_process_ms`: the same model (host, or the whole split) in one process. No official code "
        "exists: a reconstruction (see `src/vitlab/compress/split.py`).",
    ]
    rows: list[dict] = []
    stem = Path(args.results)
    rows.append(
        {
            "method": "host (unsplit)",
            "parts": 1,
            "importance": "-",
            "train_images": "-",
            "top1": host_top1,
            "top1_argmax": host_top1,
            "delta_top1": 0.0,
            "params_per_process": host_params,
            "params_share_pct": 100.0,
            "params_total": host_params,
            "fits_40pct": False,
            "part_ms": "-",
            "end_to_end_ms": "-",
            "single_process_ms": _median_ms(host, tx[: args.serve_batch], args.serve_repeats),
            "served_equals_single": "-",
            "checkpoint": str(Path(args.host)),
        }
    )
    _write(rows, header, stem)
    for n in args.parts:
        for importance in args.importance:
            t0 = time.time()
            split, reports = build_split(
                host,
                x,
                y,
                n,
                heads=args.heads,
                mlp=args.mlp,
                importance=importance,
                distill_epochs=args.distill_epochs,
                distill_on=args.distill_on,
                lr=args.lr,
                fusion_epochs=args.fusion_epochs,
                teacher_logits=teacher,
                seed=args.seed,
                log=print,
            )
            scores = evaluate_split(split, tx, ty)
            budgets = [0.4 * host_bytes] * n
            try:
                placement, fits = greedy_placement([r["bytes"] for r in reports], budgets), True
            except ValueError:
                placement, fits = None, False
            out = Path(args.runs) / f"N{n}_{importance}"
            extra = {"scores": {"host_top1": host_top1, **scores}, "host_params": host_params, "part_reports": reports}
            save_split(split, out, meta, placement=placement, budgets=budgets if fits else None, extra=extra)
            largest = max(r["params"] for r in reports)
            part_ms, e2e, same = "-", "-", "-"
            if importance == "own":
                part_ms, e2e, same = _serve(out, split, tx, args.serve_batch, args.serve_repeats)
            rows.append(
                {
                    "method": "ED-ViT" if importance == "own" else "uniform pruning",
                    "parts": n,
                    "importance": importance,
                    "train_images": len(y),
                    "top1": scores["top1"],
                    "top1_argmax": scores["top1_argmax"],
                    "delta_top1": round(scores["top1"] - host_top1, 2),
                    "params_per_process": largest,
                    "params_share_pct": round(100 * largest / host_params, 1),
                    "params_total": sum(r["params"] for r in reports) + param_count(split.fusion),
                    "fits_40pct": fits,
                    "part_ms": part_ms,
                    "end_to_end_ms": e2e,
                    "single_process_ms": _median_ms(split, tx[: args.serve_batch], args.serve_repeats),
                    "served_equals_single": same,
                    "checkpoint": str(out),
                }
            )
            _write(rows, header, stem)
            print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    print(f"done in {time.time() - t_start:.0f} s; wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
