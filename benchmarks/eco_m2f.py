"""ECO-M2F on FMNIST-Scenes: panoptic quality against measured encoder GFLOPs, fixed depths 2..6 vs the gate.

Step A trains the parent (Mask2Former-lite whose 6-layer deformable encoder may exit after 2..6 layers, one exit
drawn per step with probability proportional to its depth) through the console script, as a user would::

    vitlab train --task eco_m2f --backbone tiny_vit_1m_28 --dataset fmnist_scenes --img-size 64 ...

Steps B and C then run here in Python on the trained run: the per-image PQ of every training scene at every exit
(measured once), for each beta the labels ``argmax_k (PQ_k - beta k)`` and a gate trained on them. Every row is
scored on the test scenes: the five fixed depths, and the gate at each beta (each image runs to the exit its gate
picks). Encoder GFLOPs are measured with ``FlopCounterMode`` on the encoder layers (and the gate) per image.
Writes ``benchmarks/results/eco_m2f.{csv,md,png}``: the table, and a plot of PQ vs encoder GFLOPs beside the exit
the gate picks against the number of objects in the scene.

    .venv/bin/python benchmarks/eco_m2f.py          # about 20 minutes on 2 quiet cores
    .venv/bin/python benchmarks/eco_m2f.py --train-scenes 200 --test-scenes 64 --label-scenes 64 --epochs 0.5 \\
        --betas 0 0.05 --results /tmp/eco_m2f_smoke   # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab.bench import describe_machine
from vitlab.data.loader import BatchLoader
from vitlab.data.synthetic import make_dataset
from vitlab.engine.inference import load_trained
from vitlab.tasks.segmentation.eco_m2f import (
    encoder_flops,
    exit_qualities,
    gate_features,
    label_exits,
    train_gate,
)

RESULTS = Path(__file__).resolve().parent / "results"


def train_parent(out: Path, args: argparse.Namespace) -> tuple[Path, list[str], float]:
    """Step A through ``vitlab train``; returns the run directory, the command and its wall time."""
    vitlab = Path(sys.executable).parent / "vitlab"
    cmd = [
        str(vitlab),
        "train",
        "--task",
        "eco_m2f",
        "--backbone",
        args.backbone,
        "--out",
        str(out),
        "--name",
        "parent",
    ]
    cmd += ["--dataset", "fmnist_scenes", "--img-size", str(args.img_size), "--epochs", str(args.epochs)]
    cmd += ["--train-subset", str(args.train_scenes), "--test-subset", str(args.test_scenes)]
    cmd += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--clip-grad", "1.0"]
    cmd += ["--seed", str(args.seed), "--log-every", "50"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out / "parent", cmd, time.perf_counter() - t0


@torch.no_grad()
def score(model, scenes, meta, exit, batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    """The model's test summary with ``exit`` (an int or "gate"), and the exit each scene took."""
    model.eval()
    model.exit = exit
    metrics = model.build_metrics()
    loader = BatchLoader(scenes, batch_size, shuffle=False, mean=meta["mean"], std=meta["std"])
    exits = []
    for batch in loader.iter_batches(0):
        out = model(batch["image"])
        model.update_metrics(metrics, out, batch)
        exits.append(out["exit"])
    return model.summarize_metrics(metrics), torch.cat(exits)


def _at_same_cost(gflops: float, fixed: list[dict]) -> float:
    """The fixed-depth PQ linearly interpolated at ``gflops`` (the fixed rows' curve)."""
    xs, ys = [r["enc_gflops"] for r in fixed], [r["pq"] for r in fixed]
    if gflops <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if gflops <= x1:
            return y0 + (y1 - y0) * (gflops - x0) / (x1 - x0)
    return ys[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny_vit_1m_28")
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--test-scenes", type=int, default=500)
    parser.add_argument("--label-scenes", type=int, default=1000, help="training scenes that steps B and C use")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--quality", choices=("pq", "miou"), default="pq", help="step B's per-image quality")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.002, 0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--gate-epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. what else ran meanwhile)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where eco_m2f.{csv,md,png} go")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        run, cmd, train_wall = train_parent(Path(tmp), args)
        summary = json.loads((run / "summary.json").read_text())
        model, meta, _ = load_trained(run)
    train = make_dataset("fmnist_scenes", split="train", n=args.train_scenes, seed=args.seed, canvas=args.img_size)
    labelled = train.subset(torch.arange(min(args.label_scenes, len(train))))
    test = make_dataset("fmnist_scenes", split="test", n=args.test_scenes, seed=args.seed, canvas=args.img_size)
    norm = {"mean": meta["mean"], "std": meta["std"]}
    flops = encoder_flops(model)
    full = flops[model.exits[-1]]

    t0 = time.perf_counter()
    qualities = exit_qualities(model, labelled, metric=args.quality, **norm)  # step B, measured once
    step_b = time.perf_counter() - t0
    features = gate_features(model, labelled, **norm)

    rows: list[dict] = []
    for k in model.exits:
        s, _ = score(model, test, meta, k)
        rows.append({"row": f"fixed depth {k}", "beta": "", "enc_gflops": flops[k] / 1e9, **s})
    fixed = list(rows)
    picks: dict[float, torch.Tensor] = {}
    oracle: dict[float, torch.Tensor] = {}
    for beta in args.betas:
        labels = label_exits(model, labelled, beta, qualities=qualities)
        oracle[beta] = labels
        history = train_gate(model, labelled, labels, features=features, epochs=args.gate_epochs, seed=args.seed)
        with torch.no_grad():
            accuracy = (model.gate(features).argmax(-1) + model.exits[0] == labels).float().mean()
        s, exits = score(model, test, meta, "gate")
        picks[beta] = exits
        cost = sum(flops[k] * int((exits == k).sum()) for k in model.exits) / len(exits) + flops["gate"]
        label_hist = [int((labels == k).sum()) for k in model.exits]
        rows.append(
            {"row": f"gate, beta {beta:g}", "beta": beta, "enc_gflops": cost / 1e9, **s,
             "label_histogram": label_hist, "gate_train_acc": 100 * float(accuracy), "gate_loss": history[-1]}
        )  # fmt: skip
    for r in rows:
        r["enc_cost_vs_full"] = r["enc_gflops"] * 1e9 / full
        r["pq_vs_fixed_same_cost"] = r["pq"] - _at_same_cost(r["enc_gflops"], fixed)
    objects = test.num_instances()
    write_tables(rows, args, summary, cmd, train_wall, step_b, flops)
    plot(rows, fixed, picks, objects, oracle, train.num_instances()[: len(labelled)], model.exits, args)


def write_tables(rows, args, summary, cmd, train_wall, step_b, flops) -> None:
    machine = describe_machine()
    args.results.mkdir(parents=True, exist_ok=True)
    keys = ["row", "beta", "pq", "sq", "rq", "miou", "mean_exit", "exit_histogram", "enc_gflops", "enc_cost_vs_full"]
    keys += ["pq_vs_fixed_same_cost", "label_histogram", "gate_train_acc", "gate_loss"]
    with open(args.results / "eco_m2f.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*keys, "machine", "torch"])
        writer.writeheader()
        for r in rows:
            out = {k: " ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k, "") for k in keys}
            writer.writerow({**out, "machine": machine.get("cpu", ""), "torch": machine.get("torch", "")})
    command = "vitlab train " + " ".join(cmd[2:]).replace(str(Path(cmd[cmd.index("--out") + 1])), "runs")
    per_exit = ", ".join(f"{k}: {v / 1e6:.2f}" for k, v in flops.items())
    lines = [
        "# ECO-M2F on FMNIST-Scenes: PQ vs encoder GFLOPs, fixed depths against the gate",
        "",
        f"Data: {args.train_scenes} training / {args.test_scenes} test scenes of FMNIST-Scenes at {args.img_size} px "
        "(1-6 Fashion-MNIST items; 10 thing classes, background as the one stuff class).",
        f"Step A: `{args.backbone}` + Mask2Former-lite (64 wide, 6-layer deformable encoder with exits after 2..6 "
        f"layers, 6 decoder layers, 16 queries), {args.epochs:g} epochs, batch {args.batch_size}, AdamW lr "
        f"{args.lr:g}, gradient clipping 1.0; one exit per step, drawn with probability proportional to its depth "
        f"({train_wall / 60:.1f} min; last test PQ at the full depth {summary.get('test_pq', float('nan')):.2f}).",
        f"Step B: per-image {args.quality.upper()} at every exit on the first {args.label_scenes} training scenes "
        f"({step_b:.0f} s), labels argmax_k (q_k - beta k) with q in 0..1. Step C: one linear layer on the pooled "
        f"encoder input of the coarsest level, cross-entropy, {args.gate_epochs} epochs (AdamW lr 0.01), per beta.",
        f"Encoder MFLOPs per image (FlopCounterMode on the encoder layers, deformable sampling included): {per_exit}.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; torch {machine.get('torch', '?')}. "
        f"Date: {time.strftime('%Y-%m-%d')}. Produced by `python benchmarks/eco_m2f.py`; seed {args.seed}.",
        *([args.note] if args.note else []),
        "",
        "| row | test PQ | SQ | RQ | mIoU | mean exit | exits 2..6 (test) | encoder GFLOPs | vs full | PQ vs fixed at "
        "same cost | step-B labels 2..6 | gate train acc |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        labels = " ".join(map(str, r.get("label_histogram", []))) or "-"
        acc = f"{r['gate_train_acc']:.1f}" if "gate_train_acc" in r else "-"
        lines.append(
            f"| {r['row']} | {r['pq']:.2f} | {r['sq']:.2f} | {r['rq']:.2f} | {r['miou']:.2f} | {r['mean_exit']:.2f} "
            f"| {' '.join(map(str, r['exit_histogram']))} | {r['enc_gflops']:.4f} | {r['enc_cost_vs_full']:.2f} "
            f"| {r['pq_vs_fixed_same_cost']:+.2f} | {labels} | {acc} |"
        )
    lines += ["", "Step A command:", "", f"    {command}"]
    (args.results / "eco_m2f.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows, fixed, picks, objects, oracle, train_objects, exits, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot([r["enc_gflops"] for r in fixed], [r["pq"] for r in fixed], "o-", color="gray", label="fixed depth")
    for r, k in zip(fixed, exits, strict=True):
        ax1.annotate(str(k), (r["enc_gflops"], r["pq"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    gates = [r for r in rows if r["beta"] != ""]
    ax1.plot([r["enc_gflops"] for r in gates], [r["pq"] for r in gates], "s", color="C3", label="gate (beta sweep)")
    for r in gates:
        ax1.annotate(
            f"{r['beta']:g}", (r["enc_gflops"], r["pq"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax1.set(xlabel="encoder GFLOPs per image (measured)", ylabel="test PQ (%)", title="PQ vs encoder cost")
    ax1.legend()
    counts = sorted(set(objects.tolist()))
    for i, (beta, chosen) in enumerate(picks.items()):
        means = [chosen[objects == n].float().mean().item() for n in counts]
        ax2.plot(counts, means, "o-", color=f"C{i}", label=f"gate, beta {beta:g}")
        labels = oracle[beta]
        ref = [labels[train_objects == n].float().mean().item() if bool((train_objects == n).any()) else float("nan")
               for n in counts]  # fmt: skip
        ax2.plot(counts, ref, ":", color=f"C{i}", alpha=0.7)
    ax2.set(xlabel="objects in the scene", ylabel="mean exit (encoder layers run)", title="chosen exit vs objects")
    ax2.set_ylim(exits[0] - 0.2, exits[-1] + 0.2)
    ax2.legend(fontsize=7, title="dotted: step-B labels (train)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(args.results / "eco_m2f.png", dpi=120)


if __name__ == "__main__":
    main()
