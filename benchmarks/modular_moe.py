"""The modular multi-task MoE ViT (arXiv:2306.17165) on heterogeneous data: separate dense models, one shared dense
model, the task-routed MoE without and with the mutual-information loss, per-task extracted sub-models, and
adaptation to a held-out task by training a few experts.

Data (``data.multitask``): Fashion-MNIST classification, FMNIST-Scenes segmentation and item counting on other
scenes, one task per batch, 32 px; the held-out task is the class of a scene's largest item. Every joint model
trains the same steps on the same batches; each separate model trains on its own task's batches of that schedule
(so it sees the same data of its task). Active MFLOPs: one image's forward for one task, ``torch.utils.flop_counter``
with the MoE attention in its sparse (active-only) form. Writes ``benchmarks/results/modular_moe.{csv,md,png}``.

    .venv/bin/python benchmarks/modular_moe.py --threads 1           # 2 seeds, about 50 min on one shared core
    .venv/bin/python benchmarks/modular_moe.py --n 64 --test-n 32 --epochs 1 --adapt-steps 2 --seeds 0 \
        --out /tmp/mm                                                 # a smoke run (a minute)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from task_fit import cell, train, write_csv  # shared loop and table helpers (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data.loader import BatchLoader
from vitlab.data.multitask import MULTITASK_TASKS, MultiTaskDataset, make_fmnist_multitask
from vitlab.layers.task_moe import MoEAttention, mutual_information, task_routed_modules
from vitlab.tasks import create_task_model

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "vit_nano_patch4_28"
TASKS = ("fashion", "scenes", "count")
HELD_OUT = "largest"


@torch.no_grad()
def evaluate(model, data: MultiTaskDataset, batch: int = 128) -> dict[str, float]:
    model.eval()
    metrics = model.build_metrics()
    for b in BatchLoader(data, batch, shuffle=False).iter_batches(0):
        model.update_metrics(metrics, model(b["image"], **model.forward_kwargs(b)), b)
    return model.summarize_metrics(metrics)


@torch.no_grad()
def count_routing(model, data: MultiTaskDataset, batch: int = 128) -> None:
    model.eval()
    model.reset_routing_counts()
    for b in BatchLoader(data, batch, shuffle=False).iter_batches(0):
        model(b["image"], **model.forward_kwargs(b))


def active_mflops(model, task: str, img: int) -> float:
    for m in task_routed_modules(model):
        if isinstance(m, MoEAttention):
            m.compute = "sparse"
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 1, img, img), tasks=(task,))
    for m in task_routed_modules(model):
        if isinstance(m, MoEAttention):
            m.compute = "dense"
    return counter.get_total_flops() / 1e6


def params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def usage_matrix(model, tasks) -> tuple[torch.Tensor, float]:
    """(tasks, layers x experts) routing shares from the last counts, and the mean per-layer I(T; E) in nats."""
    rows, mis = [], []
    for counts in model.routing_counts():
        cond = counts / counts.sum(1, keepdim=True).clamp(min=1)
        rows.append(cond[: len(tasks)])
        mis.append(float(mutual_information(cond[: len(tasks)])))
    return torch.cat(rows, 1), statistics.fmean(mis)


def part(data: MultiTaskDataset, name: str) -> MultiTaskDataset:
    return MultiTaskDataset([p for p in data.parts if p.name == name], data.mean, data.std, name=name)


def run_seed(seed: int, args, train_set, test_set, held_train, held_test, record) -> None:
    specs = [MULTITASK_TASKS[t] for t in TASKS]
    common = {"img_size": args.img, "tasks": specs}
    fit = lambda m, d: train(m, d, args.epochs, args.lr, args.batch, seed)  # noqa: E731

    # separate dense models: each on its own task's batches of the joint schedule
    scores, secs, params, flops = {}, 0.0, 0.0, []
    for t in TASKS:
        torch.manual_seed(seed)
        m = create_task_model("modular_moe", BACKBONE, **common | {"tasks": [MULTITASK_TASKS[t]]}, moe=False)
        secs += fit(m, part(train_set, t))
        scores[t] = evaluate(m, part(test_set, t))[t]
        params += params_m(m)
        flops.append(active_mflops(m, t, args.img))
    record("separate dense models (one per task)", seed, scores, params, statistics.fmean(flops), secs)

    torch.manual_seed(seed)
    dense = create_task_model("modular_moe", BACKBONE, **common, moe=False)
    secs = fit(dense, train_set)
    record("one shared dense model", seed, evaluate(dense, test_set), params_m(dense),
           statistics.fmean(active_mflops(dense, t, args.img) for t in TASKS), secs)  # fmt: skip

    moes = {}
    for label, mi in (("MoE, balance loss only", 0.0), ("MoE + mutual-information loss", args.mi_weight)):
        torch.manual_seed(seed)
        m = create_task_model("modular_moe", BACKBONE, **common, mi_weight=mi, balance_weight=args.balance_weight)
        secs = fit(m, train_set)
        res = evaluate(m, test_set)
        count_routing(m, train_set)
        matrix, mi_nats = usage_matrix(m, TASKS)
        moes[label] = (m, matrix, mi_nats)
        record(label, seed, res, params_m(m), statistics.fmean(active_mflops(m, t, args.img) for t in TASKS), secs,
               mi_nats)  # fmt: skip

    moe = moes["MoE + mutual-information loss"][0]
    scores, sizes, flops = {}, [], []
    for t in TASKS:
        count_routing(moe, part(train_set, t))
        sub = moe.extract(t, threshold=args.threshold)
        scores[t] = evaluate(sub, part(test_set, t))[t]
        sizes.append(params_m(sub))
        flops.append(active_mflops(sub, t, args.img))
    record(f"extracted per task (>= {args.threshold:.0%} of routing)", seed, scores, statistics.fmean(sizes),
           statistics.fmean(flops), 0.0)  # fmt: skip

    # adaptation to the held-out task: new router gates and head, optionally a few experts per layer
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    for label, n_experts in (("adapt: new gates + head", 0), (f"adapt: + {args.adapt_experts} experts/layer", -1)):
        m = create_task_model("modular_moe", BACKBONE, **common, mi_weight=args.mi_weight)
        m.load_state_dict(state)
        m.add_task(MULTITASK_TASKS[HELD_OUT])
        count_routing(m, part(held_train, HELD_OUT))
        if n_experts:
            m.unfreeze_top_experts(HELD_OUT, args.adapt_experts)
        torch.manual_seed(seed)
        secs = train(m, held_train, 0, args.lr, args.batch, seed, steps=args.adapt_steps)
        trained = sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
        record(label, seed, evaluate(m, held_test), trained, active_mflops(m, HELD_OUT, args.img), secs)
    torch.manual_seed(seed)
    scratch = create_task_model("modular_moe", BACKBONE, img_size=args.img, tasks=[MULTITASK_TASKS[HELD_OUT]],
                                moe=False)  # fmt: skip
    secs = train(scratch, held_train, 0, args.lr, args.batch, seed, steps=args.adapt_steps)
    record("held-out task: dense from scratch", seed, evaluate(scratch, held_test), params_m(scratch),
           active_mflops(scratch, HELD_OUT, args.img), secs)  # fmt: skip
    return {label: (matrix, mi) for label, (_, matrix, mi) in moes.items()}


COLUMNS = ("params_m", "active_mflops", *TASKS, "mean", HELD_OUT, "mutual_info", "train_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500, help="training items per task")
    ap.add_argument("--test-n", type=int, default=500, help="test items per task")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mi-weight", type=float, default=0.5)
    ap.add_argument("--balance-weight", type=float, default=0.01)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--adapt-steps", type=int, default=100)
    ap.add_argument("--adapt-experts", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, list[dict]] = {}
    matrices = {}

    def record(label, seed, scores, params, mflops, secs, mi=None):
        row = {"seed": seed, "params_m": params, "active_mflops": mflops, "train_s": secs, "mutual_info": mi}
        row |= {k: v for k, v in scores.items() if k in (*TASKS, HELD_OUT)}
        present = [row[t] for t in TASKS if t in row]
        row["mean"] = statistics.fmean(present) if len(present) == len(TASKS) else None
        rows.setdefault(label, []).append(row)
        print(f"seed {seed} {label}: " + ", ".join(f"{k}={row.get(k)}" for k in COLUMNS), flush=True)
        write(rows, matrices, args)

    for seed in args.seeds:
        kw = {"seed": seed, "canvas": args.img}
        train_set = make_fmnist_multitask("train", n=args.n, tasks=TASKS, **kw)
        test_set = make_fmnist_multitask("test", n=args.test_n, tasks=TASKS, **kw)
        held_train = make_fmnist_multitask("train", n=args.n // 2, tasks=(HELD_OUT,), **kw)
        held_test = make_fmnist_multitask("test", n=args.test_n, tasks=(HELD_OUT,), **kw)
        # one normalisation for every model and task: the joint training set's
        for d in (test_set, held_train, held_test):
            d.mean, d.std = train_set.mean, train_set.std
        matrices[seed] = run_seed(seed, args, train_set, test_set, held_train, held_test, record)
        write(rows, matrices, args)


def write(rows: dict[str, list[dict]], matrices: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "modular_moe.csv", rows, COLUMNS)
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs})
    lines = [
        "# Modular multi-task MoE ViT on heterogeneous data (Fashion-MNIST + FMNIST-Scenes)",
        "",
        f"Tasks, one per batch: fashion (Fashion-MNIST top-1 %), scenes (FMNIST-Scenes segmentation mIoU %), count "
        f"(items in a scene, 7 classes, top-1 %); {args.n} training / {args.test_n} test items per task at "
        f"{args.img} px. Backbone `{BACKBONE}` (128 wide, 6 blocks, 4 heads) from scratch; MoE: every block's "
        "attention as 8 one-head experts (top-4, shared key/value) and MLP as 8 experts of half width (top-2), "
        f"noisy task-conditioned routers, balance loss {args.balance_weight}, MI weight {args.mi_weight}. "
        f"{args.epochs:g} epochs, batch {args.batch}, AdamW lr {args.lr} (wd 0.05, warmup + cosine, clip 1). "
        f"Extraction keeps the experts with >= {args.threshold:.0%} of a task's routed tokens (at least k). "
        f"Held-out task `{HELD_OUT}` (class of a scene's largest item, {args.n // 2} training scenes): "
        f"{args.adapt_steps} steps from the MI model. Seeds {seeds}: mean ± half the range. Params (M): whole "
        "model(s); for extracted rows the mean per-task model; for adaptation rows the trained parameters. "
        "Mutual info: mean over the MoE layers of I(task; expert) of the top-k routing counts on the training "
        "data (nats, at most ln 3 = 1.10). Machine: "
        + ", ".join(f"{k}={v}" for k, v in describe_machine().items())
        + f"; {args.threads} thread(s). Command: `python benchmarks/modular_moe.py {' '.join(sys.argv[1:])}`.",
        "",
        "| row | params (M) | active MFLOPs | fashion | scenes | count | mean | held-out | mutual info | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], 2 if k in ("params_m", "mutual_info") else 1) for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (args.out / "modular_moe.md").write_text("\n".join(lines) + "\n")
    if matrices:
        plot(matrices, args.out / "modular_moe.png")


def plot(matrices: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(matrices)
    labels = list(matrices[seed])
    fig, axes = plt.subplots(len(labels), 1, figsize=(12, 1.6 * len(labels) + 0.6), squeeze=False)
    for ax, label in zip(axes[:, 0], labels, strict=True):
        matrix, mi = matrices[seed][label]
        ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=float(matrix.max()))
        ax.set_yticks(range(len(TASKS)), TASKS)
        ax.set_title(f"{label} (seed {seed}): I(task; expert) = {mi:.2f} nats per layer", fontsize=9)
        ax.set_xlabel("MoE layer (attention, MLP alternating; 8 experts each) x expert", fontsize=8)
        ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
