"""ECO-M2F on FMNIST-Scenes: panoptic quality against measured encoder GFLOPs, fixed depths 2..6 vs the gate.

Step A trains the parent (Mask2Former-lite whose 6-layer deformable encoder may exit after 2..6 layers, one exit
drawn per step with probability proportional to its depth) through the console script, as a user would::

    vitlab train --task eco_m2f --backbone tiny_vit_1m_28 --backbone-args ... --dataset fmnist_scenes ...

Steps B and C then run here in Python on the trained run: the per-image PQ of every labelled training scene at
every exit (measured once), for each beta the labels ``argmax_k (PQ_k - beta k)`` and a gate trained on them. Every
row is scored on the test scenes: the five fixed depths, and the gate at each beta (each image runs to the exit its
gate picks). Encoder GFLOPs are measured with ``FlopCounterMode`` on the encoder layers (and the gate) per image.
With ``--seeds`` the whole recipe (data draw, step A, B and C) runs once per seed and the table gives the mean and
half the range over seeds. Writes ``benchmarks/results/eco_m2f.{csv,md,png}`` after every finished row: the table,
and a plot of PQ vs encoder GFLOPs beside the exit the gate picks against the number of objects in the scene.

The default recipe is the committed one (``PILOTS`` records the settings tried to make the encoder's depth matter)::

    .venv/bin/python benchmarks/eco_m2f.py --threads 1 --seeds 0 1    # about 40 minutes a seed on 1 thread
    .venv/bin/python benchmarks/eco_m2f.py --train-scenes 200 --test-scenes 64 --label-scenes 64 --epochs 0.5 \\
        --betas 0 0.05 --results /tmp/eco_m2f_smoke   # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
METRICS = ("pq", "sq", "rq", "miou", "mean_exit", "enc_gflops", "enc_cost_vs_full", "pq_vs_fixed_same_cost")
# how the recipe was chosen: one step-A model per pilot, test PQ at every exit (seed 0, 1 thread, shared machine)
PILOT_ROWS = (  # pilot, setting, optimizer steps, test PQ at exits 2/3/4/5/6, mIoU at exits 2 / 6, PQ(6) - PQ(2)
    ("reference (the committed seed 0)", "default backbone, 4000 scenes, 8 epochs", 2000,
     "25.23 / 24.68 / 25.13 / 25.67 / 25.68", "33.17 / 32.96", "+0.45"),
    ("P1", "weak backbone, 2000 scenes, 4 epochs (4.5 min)", 500,
     "6.45 at every exit (no thing passes the 0.8 object threshold)", "19.25 / 19.67", "0.00"),
    ("P2", "weak backbone, 4000 scenes, 8 epochs; read at epoch 3", 750,
     "6.35 at every exit (200 test scenes)", "25.74 / 24.24", "0.00"),
    ("P2", "same run, read at epoch 5, then stopped (no sign of a gap)", 1250,
     "11.41 / 11.91 / 11.67 / 11.34 / 11.62 (200 test scenes)", "27.72 / 26.75", "+0.21"),
    ("P3", "weak backbone + `--task-args '{\"decoder_layers\": 2}'` (the queries see only the two coarsest levels, so "
     "the encoder must carry the rest); read at epoch 6", 1500,
     "7.01 / 7.27 / 7.48 / 7.52 / 7.70 (200 test scenes)", "28.36 / 28.61", "+0.69"),
    ("P3", "same run, full 8 epochs (18 min), 500 test scenes", 2000,
     "8.91 / 8.78 / 9.27 / 9.24 / 9.36", "28.03 / 28.31", "+0.45"),
)  # fmt: skip
PILOTS = "\n".join(
    [
        "## Pilots: looking for a setting where the encoder's depth matters (seed 0, 1 thread, machine shared)",
        "",
        "Each pilot trains one step-A parent; one parent gives PQ at every exit. The aim was PQ(6) - PQ(2) >= 2 "
        "points, so that the gate has something to trade. None reached it, so the table above keeps the original "
        'recipe (default `tiny_vit_1m_28`, 6 decoder layers) with a second seed. "weak backbone": `--backbone-args '
        '\'{"depths": [1, 1, 1], "embed_dims": [16, 32, 48], "num_heads": [1, 2, 3]}\'` (0.17 M backbone '
        "parameters instead of 1.32 M).",
        "",
        "| pilot | setting | steps | test PQ at exits 2 / 3 / 4 / 5 / 6 | mIoU at 2 / 6 | PQ(6) - PQ(2) |",
        "|---|---|---:|---|---|---:|",
        *(f"| {' | '.join(map(str, row))} |" for row in PILOT_ROWS),
        "",
        "P3's gate, trained as for the main table, sent 499-500 of 500 test images to exit 2 at every beta (step-B "
        "labels at beta 0: 900 / 26 / 16 / 23 / 35 of 1000). Reading: on 64 px FMNIST-Scenes each item is "
        "recognised from its own pixels, and the 6-layer masked-attention decoder leaves the deformable encoder "
        "little context work; a weaker backbone or decoder lowers PQ (and slows training) without opening a depth "
        "gap at a CPU budget of 2000 steps. Not tried for lack of time: more items per scene (`vitlab train` has no "
        "flag for it), a frozen backbone, a narrower encoder, longer training.",
    ]
)


def train_parent(out: Path, args: argparse.Namespace, seed: int) -> tuple[Path, list[str], float]:
    """Step A through ``vitlab train``; returns the run directory, the command and its wall time."""
    vitlab = Path(sys.executable).parent / "vitlab"
    cmd = [str(vitlab), "train", "--task", "eco_m2f", "--backbone", args.backbone, "--out", str(out)]
    cmd += ["--name", "parent"]
    if args.backbone_args:
        cmd += ["--backbone-args", args.backbone_args]
    if args.task_args:
        cmd += ["--task-args", args.task_args]
    cmd += ["--dataset", "fmnist_scenes", "--img-size", str(args.img_size), "--epochs", str(args.epochs)]
    cmd += ["--train-subset", str(args.train_scenes), "--test-subset", str(args.test_scenes)]
    cmd += ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--clip-grad", "1.0"]
    cmd += ["--seed", str(seed), "--log-every", "50"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
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


class Report:
    """Every finished row of every seed; rewrites the csv, markdown and plot after each one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows, self.seeds = args, [], {}  # seeds: seed -> its facts (wall times, picks, ...)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def aggregate(self) -> list[dict]:
        """One row per table row: mean and half range over the seeds that have it."""
        out = []
        for name in dict.fromkeys(r["row"] for r in self.rows):
            group = [r for r in self.rows if r["row"] == name]
            agg = {"row": name, "beta": group[0]["beta"], "seeds": [r["seed"] for r in group]}
            for k in METRICS:
                v = torch.tensor([float(r[k]) for r in group], dtype=torch.float64)
                agg[k], agg[k + "_hr"] = float(v.mean()), float(v.max() - v.min()) / 2
            agg["exit_histogram"] = [sum(h) for h in zip(*(r["exit_histogram"] for r in group), strict=True)]
            if "label_histogram" in group[0]:
                agg["label_histogram"] = [sum(h) for h in zip(*(r["label_histogram"] for r in group), strict=True)]
                agg["gate_train_acc"] = sum(r["gate_train_acc"] for r in group) / len(group)
            out.append(agg)
        return out

    def write(self) -> None:
        args = self.args
        args.results.mkdir(parents=True, exist_ok=True)
        machine = describe_machine()
        keys = ["row", "seed", "beta", *METRICS, "exit_histogram", "label_histogram", "gate_train_acc", "gate_loss"]
        with open(args.results / "eco_m2f.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*keys, "machine", "torch"])
            writer.writeheader()
            for r in self.rows:
                out = {k: " ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k, "") for k in keys}
                writer.writerow({**out, "machine": machine.get("cpu", ""), "torch": machine.get("torch", "")})
            for a in self.aggregate():  # the table's figures: seed "mean" and "half_range"
                for tag, suffix in (("mean", ""), ("half_range", "_hr")):
                    writer.writerow(
                        {"row": a["row"], "seed": tag, "beta": a["beta"], **{k: a[k + suffix] for k in METRICS}}
                    )
        (args.results / "eco_m2f.md").write_text(self.markdown(machine) + "\n")
        if self.seeds and any(s.get("picks") for s in self.seeds.values()):
            self.plot()

    def markdown(self, machine: dict) -> str:
        args, seeds = self.args, self.seeds
        first = next(iter(seeds.values()), {})
        walls = ", ".join(f"seed {s}: {f['train_wall'] / 60:.1f} min" for s, f in seeds.items() if "train_wall" in f)
        full_pq = ", ".join(
            f"{f['summary'].get('test_pq', float('nan')):.2f}" for f in seeds.values() if "summary" in f
        )
        step_b = ", ".join(f"{f['step_b']:.0f} s" for f in seeds.values() if "step_b" in f)
        flops = first.get("flops", {})
        per_exit = ", ".join(f"{k}: {v / 1e6:.2f}" for k, v in flops.items())
        done = sorted({r["seed"] for r in self.rows})
        lines = [
            "# ECO-M2F on FMNIST-Scenes: PQ vs encoder GFLOPs, fixed depths against the gate",
            "",
            f"Data: per seed, {args.train_scenes} training / {args.test_scenes} test scenes of FMNIST-Scenes at "
            f"{args.img_size} px drawn with that seed (1-6 Fashion-MNIST items; 10 thing classes, background as the "
            "one stuff class).",
            f"Step A: `{args.backbone}` with backbone args `{args.backbone_args or '{}'}` + Mask2Former-lite (64 wide, "
            f"6-layer deformable encoder with exits after 2..6 layers, 6 decoder layers, 16 queries; task args "
            f"`{args.task_args or '{}'}`), {args.epochs:g} epochs, batch {args.batch_size}, AdamW lr {args.lr:g}, "
            "gradient clipping 1.0; one exit per step, drawn with probability proportional to its depth. Training "
            f"wall time ({args.threads} thread(s), machine shared with other jobs): {walls or '-'}; test PQ at the "
            f"full depth at the end of training: {full_pq or '-'}.",
            f"Step B: per-image {args.quality.upper()} at every exit on the first {args.label_scenes} training scenes "
            f"({step_b or '-'}), labels argmax_k (q_k - beta k) with q in 0..1. Step C: one linear layer on the pooled "
            f"encoder input of the coarsest level, cross-entropy, {args.gate_epochs} epochs (AdamW lr 0.01), per beta.",
            f"Encoder MFLOPs per image (FlopCounterMode on the encoder layers, deformable sampling included): "
            f"{per_exit or '-'}.",
            f"Seeds done: {', '.join(map(str, done)) or '-'} of {', '.join(map(str, sorted({*done, *args.seeds})))}; "
            "figures are the "
            "mean ± half the range over the seeds done (a row's seeds in the last column). "
            f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
            f"torch {machine.get('torch', '?')}. Date: {time.strftime('%Y-%m-%d')}.",
            *([args.note] if args.note else []),
            *(
                [
                    f"Seeds {', '.join(map(str, sorted(set(done) - set(seeds))))} come from an earlier run "
                    f"(`--keep-rows {args.keep_rows}`); the exit-by-objects table and plot cover the seeds run "
                    f"here ({', '.join(map(str, seeds)) or '-'})."
                ]
                if args.keep_rows
                else []
            ),
            "",
            "| row | test PQ | SQ | RQ | mIoU | mean exit | exits 2..6 (test, all seeds) | encoder GFLOPs | vs full | "
            "PQ vs fixed at same cost | step-B labels 2..6 | gate train acc | seeds |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---|",
        ]

        def pm(a: dict, k: str, fmt: str) -> str:
            return f"{a[k]:{fmt}} ± {a[k + '_hr']:.2f}" if len(a["seeds"]) > 1 else f"{a[k]:{fmt}}"

        for a in self.aggregate():
            labels = " ".join(map(str, a.get("label_histogram", []))) or "-"
            acc = f"{a['gate_train_acc']:.1f}" if "gate_train_acc" in a else "-"
            lines.append(
                f"| {a['row']} | {pm(a, 'pq', '.2f')} | {pm(a, 'sq', '.2f')} | {pm(a, 'rq', '.2f')} "
                f"| {pm(a, 'miou', '.2f')} | {a['mean_exit']:.2f} | {' '.join(map(str, a['exit_histogram']))} "
                f"| {a['enc_gflops']:.4f} | {a['enc_cost_vs_full']:.2f} | {pm(a, 'pq_vs_fixed_same_cost', '+.2f')} "
                f"| {labels} | {acc} | {' '.join(map(str, a['seeds']))} |"
            )
        lines += self.exit_by_objects()
        command = next((f["command"] for f in seeds.values() if "command" in f), "")
        lines += ["", "Produced by:", "", f"    {' '.join(sys.argv).replace(sys.executable, 'python')}"]
        lines += ["", "Step A command (first seed):", "", f"    {command}"]
        if PILOTS.strip():
            lines += ["", PILOTS.strip()]
        return "\n".join(lines)

    def exit_by_objects(self) -> list[str]:
        """Mean exit the gate picks (test) and the step-B label (train), by objects in the scene, pooled over seeds."""
        facts = [f for f in self.seeds.values() if f.get("picks")]
        if not facts:
            return []
        counts = sorted(set(torch.cat([f["objects"] for f in facts]).tolist()))
        lines = [
            "",
            "Mean exit by objects in the scene (all seeds pooled; gate on test scenes / step-B label on the "
            "labelled training scenes):",
            "",
            "| beta | " + " | ".join(f"{n} obj" for n in counts) + " |",
            "|---|" + "---:|" * len(counts),
        ]
        for beta in facts[0]["picks"]:
            if not all(beta in f["picks"] for f in facts):
                continue
            picks = torch.cat([f["picks"][beta] for f in facts]).float()
            objects = torch.cat([f["objects"] for f in facts])
            labels = torch.cat([f["oracle"][beta] for f in facts]).float()
            train_objects = torch.cat([f["train_objects"] for f in facts])
            cells = []
            for n in counts:
                g = picks[objects == n].mean().item() if bool((objects == n).any()) else float("nan")
                o = labels[train_objects == n].mean().item() if bool((train_objects == n).any()) else float("nan")
                cells.append(f"{g:.2f} / {o:.2f}")
            lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
        return lines

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        agg = self.aggregate()
        fixed = [a for a in agg if a["beta"] == ""]
        gates = [a for a in agg if a["beta"] != ""]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        ax1.errorbar([a["enc_gflops"] for a in fixed], [a["pq"] for a in fixed], yerr=[a["pq_hr"] for a in fixed],
                     fmt="o-", color="gray", capsize=3, label="fixed depth")  # fmt: skip
        for a in fixed:
            ax1.annotate(a["row"].split()[-1], (a["enc_gflops"], a["pq"]), textcoords="offset points",
                         xytext=(4, -10), fontsize=8)  # fmt: skip
        ax1.errorbar([a["enc_gflops"] for a in gates], [a["pq"] for a in gates], yerr=[a["pq_hr"] for a in gates],
                     xerr=[a["enc_gflops_hr"] for a in gates], fmt="s", color="C3", capsize=3,
                     label="gate (beta sweep)")  # fmt: skip
        for a in gates:
            ax1.annotate(f"{a['beta']:g}", (a["enc_gflops"], a["pq"]), textcoords="offset points", xytext=(4, 4),
                         fontsize=8)  # fmt: skip
        n = len({r["seed"] for r in self.rows})
        ax1.set(xlabel="encoder GFLOPs per image (measured)", ylabel="test PQ (%)",
                title=f"PQ vs encoder cost (mean ± half range, {n} seed{'s' * (n > 1)})")  # fmt: skip
        ax1.legend()
        facts = [f for f in self.seeds.values() if f.get("picks")]
        objects = torch.cat([f["objects"] for f in facts])
        train_objects = torch.cat([f["train_objects"] for f in facts])
        counts = sorted(set(objects.tolist()))
        exits = facts[0]["exits"]
        for i, beta in enumerate(facts[0]["picks"]):
            if not all(beta in f["picks"] for f in facts):
                continue
            chosen = torch.cat([f["picks"][beta] for f in facts]).float()
            labels = torch.cat([f["oracle"][beta] for f in facts]).float()
            ax2.plot(counts, [chosen[objects == c].mean().item() for c in counts], "o-", color=f"C{i}",
                     label=f"gate, beta {beta:g}")  # fmt: skip
            ref = [labels[train_objects == c].mean().item() if bool((train_objects == c).any()) else float("nan")
                   for c in counts]  # fmt: skip
            ax2.plot(counts, ref, ":", color=f"C{i}", alpha=0.7)
        ax2.set(xlabel="objects in the scene", ylabel="mean exit (encoder layers run)",
                title=f"chosen exit vs objects (seeds {' '.join(map(str, self.seeds))} pooled)")  # fmt: skip
        ax2.set_ylim(exits[0] - 0.2, exits[-1] + 0.2)
        ax2.legend(fontsize=7, title="dotted: step-B labels (train)", title_fontsize=7)
        fig.tight_layout()
        fig.savefig(self.args.results / "eco_m2f.png", dpi=120)
        plt.close(fig)


def run_seed(args: argparse.Namespace, seed: int, report: Report) -> None:
    """Steps A, B and C with one seed; every scored row goes to ``report`` as soon as it is done."""
    torch.manual_seed(seed)
    facts = report.seeds.setdefault(seed, {})
    with tempfile.TemporaryDirectory() as tmp:
        run, cmd, facts["train_wall"] = train_parent(Path(tmp), args, seed)
        facts["summary"] = json.loads((run / "summary.json").read_text())
        model, meta, _ = load_trained(run)
    facts["command"] = "vitlab train " + " ".join(f"'{c}'" if c.startswith("{") else c for c in cmd[2:]).replace(
        str(Path(cmd[cmd.index("--out") + 1])), "runs"
    )
    train = make_dataset("fmnist_scenes", split="train", n=args.train_scenes, seed=seed, canvas=args.img_size)
    labelled = train.subset(torch.arange(min(args.label_scenes, len(train))))
    test = make_dataset("fmnist_scenes", split="test", n=args.test_scenes, seed=seed, canvas=args.img_size)
    norm = {"mean": meta["mean"], "std": meta["std"]}
    facts["flops"] = flops = encoder_flops(model)
    full = flops[model.exits[-1]]
    facts["exits"] = model.exits

    fixed: list[dict] = []
    for k in model.exits:
        s, _ = score(model, test, meta, k)
        row = {"row": f"fixed depth {k}", "seed": seed, "beta": "", "enc_gflops": flops[k] / 1e9, **s}
        row["enc_cost_vs_full"], row["pq_vs_fixed_same_cost"] = flops[k] / full, 0.0
        fixed.append(row)
        report.add(row)

    t0 = time.perf_counter()
    qualities = exit_qualities(model, labelled, metric=args.quality, **norm)  # step B, measured once
    facts["step_b"] = time.perf_counter() - t0
    features = gate_features(model, labelled, **norm)
    facts.update(picks={}, oracle={}, objects=test.num_instances(), train_objects=labelled.num_instances())
    for beta in args.betas:
        labels = label_exits(model, labelled, beta, qualities=qualities)
        history = train_gate(model, labelled, labels, features=features, epochs=args.gate_epochs, seed=seed)
        with torch.no_grad():
            accuracy = (model.gate(features).argmax(-1) + model.exits[0] == labels).float().mean()
        s, exits = score(model, test, meta, "gate")
        facts["picks"][beta], facts["oracle"][beta] = exits, labels
        cost = sum(flops[k] * int((exits == k).sum()) for k in model.exits) / len(exits) + flops["gate"]
        row = {"row": f"gate, beta {beta:g}", "seed": seed, "beta": beta, "enc_gflops": cost / 1e9, **s}
        row |= {"label_histogram": [int((labels == k).sum()) for k in model.exits]}
        row |= {"gate_train_acc": 100 * float(accuracy), "gate_loss": history[-1], "enc_cost_vs_full": cost / full}
        row["pq_vs_fixed_same_cost"] = row["pq"] - _at_same_cost(row["enc_gflops"], fixed)
        report.add(row)


def load_rows(path: Path) -> list[dict]:
    """The per-seed rows of an earlier ``eco_m2f.csv`` (a file without a seed column holds seed 0)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            seed = r.get("seed", "0")
            if not seed.lstrip("-").isdigit():
                continue  # an aggregate line
            row = {"row": r["row"], "seed": int(seed), "beta": float(r["beta"]) if r["beta"] else ""}
            row |= {k: float(r[k]) for k in METRICS}
            for k in ("exit_histogram", "label_histogram"):
                if r.get(k):
                    row[k] = [int(v) for v in r[k].split()]
            for k in ("gate_train_acc", "gate_loss"):
                if r.get(k):
                    row[k] = float(r[k])
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny_vit_1m_28")
    parser.add_argument("--backbone-args", default="", help="the backbone's keywords as JSON (vitlab train's)")
    parser.add_argument("--task-args", default="", help="the task model's keywords as JSON (vitlab train's)")
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full run (steps A-C) per seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here and in the training subprocess")
    parser.add_argument(
        "--keep-rows",
        type=Path,
        default=None,
        help="an earlier eco_m2f.csv whose per-seed rows join the table (same recipe; its seeds are not rerun)",
    )
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. what else ran meanwhile)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where eco_m2f.{csv,md,png} go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report(args)
    if args.keep_rows:
        report.rows += load_rows(args.keep_rows)
    for seed in args.seeds:
        run_seed(args, seed, report)
    print((args.results / "eco_m2f.md").read_text())


if __name__ == "__main__":
    main()
