"""ShiftAddViT on Fashion-MNIST: top-1, share of tokens on the shift expert, and counted multiplications.

Trains timm's ``pvt_v2_b0`` (the paper's smallest host) briefly at 32 px (the smallest size its four /2 stages
after a /4 stem take; 56 px costs 3x more CPU), then, following the paper's recipe
(fine-tune the MSA model, convert, fine-tune), converts copies of it with ``compress.apply(model, "shiftadd",
...)`` and fine-tunes every row, the unconverted host included, with the same small budget:

- MSA (the host), fine-tuned on as the control;
- +binary attention (stages 1-3; the last keeps softmax MSA), dense MLPs;
- +shift MLPs everywhere (every fc1/fc2 is a power-of-two linear);
- +MoE {multiply, shift} on every fc1/fc2 with the paper's latency-aware balance loss;
- the same MoE with plain cv² balancing, and with the released setting (top-1 NaiveGate, no balance loss).

For each row: top-1 on a test subset, the share of MoE tokens routed to the shift expert (test set, eval mode)
and the op-count model of ``vitlab.bench.opcount`` (multiplications / additions / shifts per image, and the
energy model). Wall-clock is not measured: PyTorch on a CPU runs shift weights as float multiplications, so no
speed-up can show here. Writes ``benchmarks/results/shiftadd.{csv,md}`` (rewritten after every row) and each
scored model as a vitlab checkpoint under ``runs/compression/shiftadd/``.

    nice -n 10 .venv/bin/python benchmarks/shiftadd.py
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab import compress
from vitlab.bench.opcount import count_ops, energy_pj
from vitlab.compress.shiftadd import expert_counts
from vitlab.data.fashion_mnist import load_fashion_mnist
from vitlab.engine.checkpoint import save_weights

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = {  # label -> shiftadd keywords (None: the unconverted host)
    "MSA (host)": None,
    "+binary attention": {"attention": "binary", "mlp": "dense"},
    "+shift MLP everywhere": {"attention": "binary", "mlp": "shift"},
    "+MoE(mult, shift), latency-aware loss": {"attention": "binary", "mlp": "moe", "balance": "latency"},
    "+MoE(mult, shift), released (no loss)": {"attention": "binary", "mlp": "moe", "balance": "released"},
    "+MoE(mult, shift), plain cv2 loss": {"attention": "binary", "mlp": "moe", "balance": "cv2"},
}
FIELDS = ["row", "top1_converted", "top1", "shift_share", "mults_M", "adds_M", "shifts_M", "energy_uJ", "params"]
FIELDS += ["checkpoint"]


def batches(split: str, n: int, size: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` images of a Fashion-MNIST split (seeded subset), normalised and resized to ``size``, in batches."""
    ds = load_fashion_mnist(split=split)
    idx = torch.randperm(len(ds.targets), generator=torch.Generator().manual_seed(seed))[:n]
    x = (ds.images[idx].float() / 255 - ds.mean[0]) / ds.std[0]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = ds.targets[idx]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def train(model: nn.Module, data: list, epochs: int, lr: float, seed: int) -> float:
    """AdamW with a cosine schedule; the compression's aux losses (MoE balance) are added. Returns seconds."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * len(data)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0 = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for i in order.tolist():
            x, y = data[i]
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            loss = loss + sum(compress.aux_losses(model).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.time() - t0


@torch.no_grad()
def score(model: nn.Module, data: list) -> dict[str, float]:
    """Top-1, shift-expert share and per-image op counts over ``data`` (eval mode)."""
    model.eval()
    correct, total, routed = 0, 0, torch.zeros(2)
    with count_ops(model) as ops:
        for x, y in data:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
            counts = expert_counts(model)
            if counts is not None:
                routed += counts
    per = ops.per_image()
    share = float(routed[1] / routed.sum()) if routed.sum() > 0 else float("nan")
    return {
        "top1": round(100 * correct / total, 2),
        "shift_share": round(share, 3) if not math.isnan(share) else "",
        "mults_M": round(per["mults"] / 1e6, 2),
        "adds_M": round(per["adds"] / 1e6, 2),
        "shifts_M": round(per["shifts"] / 1e6, 2),
        "energy_uJ": round(energy_pj(per) / 1e6, 1),
    }


def load_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild a checkpoint written here (pvt_v2_b0 plus its surgery record) in eval mode."""
    from vitlab.engine.inference import load_trained

    return load_trained(path)[0]


def write(rows: list[dict], args: argparse.Namespace, header: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "shiftadd.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [header, "", "| " + " | ".join(FIELDS[:-1]) + " |", "|" + "---|" * (len(FIELDS) - 1)]
    lines += ["| " + " | ".join(str(r[k]) for k in FIELDS[:-1]) + " |" for r in rows]
    (RESULTS / "shiftadd.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=32, help="32 is the smallest pvt_v2_b0 takes (/32)")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--host-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per row")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="host training; fine-tuning uses half")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 wastes least on a shared machine)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--out", default="runs/compression/shiftadd")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_data = batches("train", args.train_subset, args.img_size, args.batch_size, args.seed)
    test_data = batches("test", args.test_subset, args.img_size, 250, args.seed)
    torch.manual_seed(args.seed)
    host = timm.create_model("pvt_v2_b0", num_classes=10, in_chans=1)
    host_s = train(host, train_data, args.host_epochs, args.lr, args.seed)
    print(f"host trained in {host_s:.0f} s", flush=True)
    header = (
        "# ShiftAddViT on Fashion-MNIST (pvt_v2_b0)\n\n"
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"timm {timm.__version__}, CPU, seed {args.seed}.\n"
        f"Data: Fashion-MNIST resized to {args.img_size} px; {args.train_subset} training images (seeded subset), "
        f"{args.test_subset} test images. Host: timm `pvt_v2_b0` trained {args.host_epochs} epochs (AdamW lr "
        f"{args.lr}, cosine, batch {args.batch_size}, label smoothing 0.1); every row (the host included, as the "
        f"control) is then fine-tuned {args.epochs} epoch(s) at lr {args.lr / 2} from those weights; the MoE "
        "balance loss is added with weight 0.01 (summed over the 16 mixtures).\n"
        "top1_converted: right after conversion, before fine-tuning. shift_share: fraction of MoE tokens sent to "
        "the shift expert on the test subset (eval, no router noise). "
        "Op counts per image: matmul-class ops only (Linear, Conv, attention products; LayerNorm, GELU, softmax "
        "not counted); energy model 3.7 pJ/mult, 0.9 pJ/add, 0.13 pJ/shift (45 nm figures). These are counts, "
        "not speed: PyTorch on a CPU executes shift weights as float multiplications, so no wall-clock gain "
        "shows here (the paper's speed-ups need its TVM kernels on GPUs). The binary attention drops PVT's "
        "spatial-reduction conv, so at this resolution its stages cost more than the host's heavily reduced MSA."
    )
    rows: list[dict] = []
    for label in args.rows:
        kwargs = ROWS[label]
        model = copy.deepcopy(host)
        if kwargs is not None:
            compress.apply(model, "shiftadd", **kwargs)
        converted = score(model, test_data)["top1"]  # before fine-tuning: what the conversion alone costs
        secs = train(model, train_data, args.epochs, args.lr / 2, args.seed + 1)
        res = {"top1_converted": converted, **score(model, test_data)}
        name = "host" if kwargs is None else "_".join(str(v) for v in kwargs.values())
        ckpt = out / f"{name}.safetensors"
        meta = {
            "model": "pvt_v2_b0",
            "num_classes": 10,
            "in_chans": 1,
            "img_size": args.img_size,
            "surgery": compress.surgery_of(model),
        }
        save_weights(model, ckpt, meta)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"row": label, **res, "params": params, "checkpoint": str(ckpt)})
        print(f"{label}: {res} ({secs:.0f} s fine-tune)", flush=True)
        write(rows, args, header)


if __name__ == "__main__":
    main()
