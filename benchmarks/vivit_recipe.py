"""The ViViT training recipe of paper 33 (arXiv:2306.04822) on camera-motion videos: full fine-tuning against a
frozen spatial encoder with a random temporal transformer, with the token adapter, with the adapter and the temporal
transformer initialised from the spatial encoder's last blocks, and an order-blind frame-averaging control.

Every row starts from the same pretrained spatial encoder (``runs/compression/host_vit_micro_s0``: vit_micro_patch4_28
trained on Fashion-MNIST, its classifier head dropped) and trains the same steps on the same batches of
``camera_motion_videos`` (8 frames of 28 px, label "motion", 11 classes: static and five time-reversed pairs).
Columns: top-1 on the test clips; the reversal-pair accuracy (test clips of the ten paired classes: how often the true
class outscores its time-reversed partner; chance 50%); training seconds per epoch; peak training memory, the most
bytes of tensors alive at once during one training step (forward, backward, AdamW step; ``bench/memory.py``'s
``LiveTensorBytes`` with autograd on, weights and the input batch not counted, gradients and optimiser state counted);
trainable parameters. Writes ``benchmarks/results/vivit_recipe.{csv,md,png}``, rewritten after every row.

    .venv/bin/python benchmarks/vivit_recipe.py --threads 2 --epochs 20   # accuracy and timing passes
    .venv/bin/python benchmarks/vivit_recipe.py --n 64 --test-n 32 --epochs 0.2 --timing-steps 2 --out /tmp/vr  # smoke
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
from pathlib import Path

import torch

from task_fit import cell, train  # the shared loop (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.bench.memory import LiveTensorBytes
from vitlab.data.loader import BatchLoader
from vitlab.data.synthetic import make_dataset
from vitlab.engine.inference import load_trained
from vitlab.tasks import create_task_model

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"
HOST = ROOT / "runs" / "compression" / "host_vit_micro_s0"
BACKBONE = "vit_micro_patch4_28"
FULL = "full fine-tuning (spatial trained, temporal random)"
# per row: vivit_fe arguments and its learning rate (full fine-tuning of the encoder at 1e-3 stayed at chance)
ROWS = {
    FULL: {"lr": 3e-4},
    "frozen spatial + random temporal": {"freeze_spatial": True},
    "frozen + adapter": {"freeze_spatial": True, "adapter": True},
    "frozen + adapter + temporal init from spatial": {"freeze_spatial": True, "adapter": True,
                                                      "temporal_init": "spatial"},
    "control: frozen, frame averaging (temporal_depth 0)": {"freeze_spatial": True, "temporal_depth": 0},
}  # fmt: skip
ACCURACY = ("top1", "pair_acc", "trainable_m")
TIMING = ("epoch_s", "peak_mb")
COLUMNS = (*ACCURACY, *TIMING, "time_ratio", "mem_ratio", "top1_diff")


def build(kw: dict, args, host_state: dict[str, torch.Tensor], seed: int):
    """A vivit_fe model with the pretrained spatial encoder loaded (and copied into the temporal blocks if asked)."""
    kw = {k: v for k, v in kw.items() if k != "lr"}
    torch.manual_seed(seed)
    model = create_task_model(
        "vivit_fe", BACKBONE, img_size=args.img, num_frames=args.frames, **{"temporal_depth": args.temporal_depth, **kw}
    )
    model.spatial.backbone.load_state_dict(host_state, strict=True)
    assert torch.equal(model.spatial.backbone.patch_embed.proj.weight, host_state["patch_embed.proj.weight"])
    if kw.get("temporal_init") == "spatial":  # the copy made at construction was of the random encoder: redo it
        blocks = model.spatial.backbone.blocks
        for src, dst in zip(blocks[-len(model.temporal.blocks) :], model.temporal.blocks, strict=True):
            dst.load_state_dict(src.state_dict())
        last = f"blocks.{len(blocks) - 1}.attn.qkv.weight"
        assert torch.equal(model.temporal.blocks[-1].attn.qkv.weight, host_state[last])
    return model


class OnTokens(torch.nn.Module):
    """A frozen-spatial vivit_fe on its encoder's cached tokens: the same trainable modules, the same arithmetic."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.temporal(m.frames_from_tokens(tokens)))

    def loss(self, out, batch):
        return self.model.loss(out, batch)

    def forward_kwargs(self, batch) -> dict:
        return {}


class CachedTokens:
    """The batches a shuffled ``BatchLoader`` of the clips gives (same indices per epoch), as cached tokens."""

    def __init__(self, loader: BatchLoader, tokens: torch.Tensor, motion: torch.Tensor) -> None:
        self.loader, self.tokens, self.motion = loader, tokens, motion

    def __len__(self) -> int:
        return len(self.loader)

    def iter_batches(self, epoch: int):
        for idx in self.loader._batch_indices(epoch, 0):
            yield {"image": self.tokens[idx], "motion": self.motion[idx]}


@torch.no_grad()
def encode(model, data, batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's tokens (N, T, P + N, D) and the motion labels of ``data``, in order."""
    model.eval()
    out = [(model.spatial(b["image"]), b["motion"]) for b in BatchLoader(data, batch, shuffle=False).iter_batches(0)]
    return torch.cat([t for t, _ in out]), torch.cat([y for _, y in out])


def peak_train_mb(model, batch: dict, lr: float) -> float:
    """Most MB of tensors alive at once in one training step (forward, backward, AdamW step) of a copy of ``model``."""
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    with LiveTensorBytes() as mode:
        loss = model.loss(model(batch["image"]), batch)["loss"]
        loss.backward()
        optimizer.step()
        del loss
    return mode.peak / 2**20


@torch.no_grad()
def evaluate(model, batches, reverse_of: list[int]) -> tuple[float, float]:
    """Top-1 (%) and the reversal-pair accuracy (%): on clips of paired classes, true logit > its reverse's."""
    model.eval()
    reverse = torch.tensor(reverse_of)
    correct = total = pair_right = pair_total = 0
    for b in batches:
        logits, y = model(b["image"]), b["motion"]
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        partner = reverse[y]
        paired = (partner >= 0) & (partner != y)
        rows = torch.arange(len(y))[paired]
        pair_right += int((logits[rows, y[paired]] > logits[rows, partner[paired]]).sum())
        pair_total += int(paired.sum())
    return 100 * correct / total, 100 * pair_right / max(1, pair_total)


def accuracy_pass(args, host_state, seed: int, rows: dict) -> None:
    """Train every asked row for ``args.epochs``; frozen rows train on cached encoder tokens (checked identical)."""
    kw = {"seed": seed, "frames": args.frames, "size": args.img}
    train_set, test_set = (make_dataset("camera_motion_videos", split=s, n=n, **kw)
                           for s, n in (("train", args.n), ("test", args.test_n)))  # fmt: skip
    for data in (train_set, test_set):  # the encoder sees frames normalised as its Fashion-MNIST images were
        data.mean, data.std = args.norm
    cache = None
    for label, task_kw in ROWS.items():
        if args.rows and not any(r in label for r in args.rows):
            continue
        model = build(task_kw, args, host_state, seed)
        lr = task_kw.get("lr", args.lr)
        test_batches = BatchLoader(test_set, 100, shuffle=False).iter_batches
        if task_kw.get("freeze_spatial") and not args.no_cache:
            if cache is None:
                cache = encode(model, train_set), encode(model, test_set)
            (tr_tok, tr_y), (te_tok, te_y) = cache
            fast = OnTokens(model)
            probe = next(BatchLoader(test_set, 8, shuffle=False).iter_batches(0))
            model.eval()
            torch.testing.assert_close(fast(te_tok[:8]), model(probe["image"]), rtol=1e-4, atol=1e-4)
            loader = CachedTokens(BatchLoader(train_set, args.batch, shuffle=True, seed=seed), tr_tok, tr_y)
            train(fast, train_set, args.epochs, lr, args.batch, seed, loader=loader)
            chunks = [{"image": te_tok[i : i + 100], "motion": te_y[i : i + 100]} for i in range(0, len(te_y), 100)]
            top1, pair = evaluate(fast, chunks, test_set.reverse_of)
        else:
            train(model, train_set, args.epochs, lr, args.batch, seed)
            top1, pair = evaluate(model, test_batches(0), test_set.reverse_of)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row = {"seed": seed, "top1": top1, "pair_acc": pair, "trainable_m": trainable}
        rows[label] = [r for r in rows.get(label, []) if r["seed"] != seed] + [row]
        print(f"seed {seed} {label}: top1 {top1:.1f}, pair {pair:.1f}", flush=True)
        write(rows, args)


def timing_pass(args, host_state, rows: dict) -> None:
    """Seconds per epoch (``args.timing_steps`` steps with the encoder in the loop) and peak memory of every row."""
    kw = {"seed": 0, "frames": args.frames, "size": args.img}
    train_set = make_dataset("camera_motion_videos", split="train", n=args.n, **kw)
    train_set.mean, train_set.std = args.norm
    probe = next(iter(BatchLoader(train_set, args.batch, shuffle=True, seed=0).iter_batches(0)))
    for label, task_kw in ROWS.items():
        if args.rows and not any(r in label for r in args.rows):
            continue
        lr = task_kw.get("lr", args.lr)
        model = build(task_kw, args, host_state, 0)
        peak = peak_train_mb(model, probe, lr)
        secs = train(model, train_set, 0, lr, args.batch, 0, steps=args.timing_steps)
        epoch_s = secs / args.timing_steps * len(BatchLoader(train_set, args.batch))
        for r in rows.setdefault(label, [{"seed": 0}]):
            r |= {"epoch_s": epoch_s, "peak_mb": peak}
        print(f"{label}: {epoch_s:.1f} s/epoch, {peak:.1f} MB", flush=True)
        write(rows, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500, help="training clips")
    ap.add_argument("--test-n", type=int, default=500, help="test clips")
    ap.add_argument("--img", type=int, default=28)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--temporal-depth", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="rows without their own lr (the frozen ones)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-steps", type=int, default=20)
    ap.add_argument("--passes", nargs="+", default=["accuracy", "timing"], choices=["accuracy", "timing"])
    ap.add_argument("--no-cache", action="store_true", help="frozen rows run the encoder every step (slower)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--rows", nargs="+", default=[], help="run only the rows whose label holds one of these; the "
                    "other rows come from the existing CSV")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    host, meta, _ = load_trained(HOST)
    if meta["model"] != BACKBONE or meta["img_size"] != args.img:
        raise SystemExit(f"{HOST} holds {meta['model']} at {meta['img_size']} px; expected {BACKBONE} at {args.img}")
    args.norm = tuple(meta["mean"]), tuple(meta["std"])
    host_state = {k: v for k, v in host.state_dict().items() if not k.startswith("head.")}
    rows = read_csv(args.out / "vivit_recipe.csv") if args.rows else {}
    rows = {label: runs for label, runs in rows.items() if label in ROWS}
    if "accuracy" in args.passes:
        for seed in args.seeds:
            accuracy_pass(args, host_state, seed, rows)
    if "timing" in args.passes:
        timing_pass(args, host_state, rows)


def read_csv(path: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    if path.exists():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                row = {"seed": int(r["seed"])} | {k: float(r[k]) for k in (*ACCURACY, *TIMING) if r.get(k)}
                rows.setdefault(r["row"], []).append(row)
    return rows


def add_ratios(rows: dict[str, list[dict]]) -> None:
    """Time and memory against the full fine-tuning row; top-1 against its run of the same seed."""
    full = rows.get(FULL, [])
    timed = next((r for r in full if "epoch_s" in r), None)
    for runs in rows.values():
        for row in runs:
            if timed and "epoch_s" in row:
                row |= {"time_ratio": row["epoch_s"] / timed["epoch_s"], "mem_ratio": row["peak_mb"] / timed["peak_mb"]}
            same = next((r for r in full if r["seed"] == row["seed"] and "top1" in r), None)
            if same and "top1" in row:
                row["top1_diff"] = row["top1"] - same["top1"]


def write(rows: dict[str, list[dict]], args) -> None:
    add_ratios(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "vivit_recipe.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", *COLUMNS])
        for label, runs in rows.items():
            for r in runs:
                w.writerow([label, r["seed"], *(r.get(k) for k in COLUMNS)])
    order = {label: i for i, label in enumerate(ROWS)}
    rows = dict(sorted(rows.items(), key=lambda item: order.get(item[0], len(order))))
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs if "top1" in r})
    machine = describe_machine()
    lines = [
        "# ViViT factorised encoder: the frozen-spatial training recipe (paper 33) on camera-motion videos",
        "",
        f"Data: `camera_motion_videos`, {args.n} training / {args.test_n} test clips of {args.frames} frames at "
        f"{args.img} px, label `motion` (11 classes: static + 5 time-reversed pairs; chance 9.1% top-1, 50% on the "
        f"pair distinction), frames normalised with the encoder's Fashion-MNIST statistics. Model `vivit_fe`: "
        f"spatial encoder `{BACKBONE}` (128 wide, 12 blocks) pretrained on Fashion-MNIST "
        f"(`runs/compression/host_vit_micro_s0`, 81% top-1; head dropped), CLS token per frame, temporal "
        f"transformer of {args.temporal_depth} blocks (128 wide). Every row: same pretrained encoder, same batches, "
        f"{args.epochs:g} epochs, batch {args.batch}, AdamW (wd 0.05, warmup 10% + cosine, clip 1), lr 3e-4 for full "
        f"fine-tuning (1e-3 stayed at chance in an earlier run) and {args.lr} for the frozen rows. Frozen rows train "
        "on the frozen encoder's tokens computed once (the encoder runs in eval mode without gradient and the loader "
        "does not augment, so the arithmetic is that of the encoder in the loop; the script checks the logits agree). "
        f"Seeds {seeds}" + (" (one seed: differences of a few points may be noise)" if len(seeds) == 1
                            else ": mean ± half the range") + ". "
        "Pair acc.: on test clips of the ten paired classes, how often the true class's logit beats its time "
        "reversal's. Time per epoch: a separate timing pass, "
        f"{args.timing_steps} training steps per row with the encoder in the loop, {args.threads} torch threads. "
        "Peak memory: most MB of tensors alive at once in one training step (forward, backward, AdamW "
        "step) measured with `bench/memory.py`'s `LiveTensorBytes` (weights and input not counted; activations, "
        "gradients and optimiser state counted). Ratios are to the full fine-tuning row, top-1 differences to its "
        "run of the same seed. Machine: "
        + ", ".join(f"{k}={v}" for k, v in machine.items())
        + f". Command: `python benchmarks/vivit_recipe.py {' '.join(sys.argv[1:])}`.",
        "",
        "| row | top-1 % | pair acc. % | trainable M | train s/epoch | peak train MB | time / full | memory / full "
        "| top-1 - full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    digits = {"trainable_m": 3, "time_ratio": 2, "mem_ratio": 2}
    for label, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], digits.get(k, 1), sign=k == "top1_diff") for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    path = args.out / "vivit_recipe.md"
    reading = _reading(path)
    (path).write_text("\n".join(lines) + "\n" + reading)
    plot(rows, args.out / "vivit_recipe.png")


def _reading(path: Path) -> str:
    """Keep a hand-written "## Reading" section of an earlier markdown when the table is rewritten."""
    if not path.exists():
        return ""
    text = path.read_text()
    i = text.find("\n## Reading")
    return text[i:] if i >= 0 else ""


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    short = [label.split(" (")[0].replace("control: ", "") for label in labels]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in zip(
        axes, ("top1", "epoch_s", "peak_mb"), ("test top-1 %", "train s / epoch", "peak train MB"), strict=True
    ):
        means = [statistics.fmean([r[key] for r in rows[label] if key in r] or [0.0]) for label in labels]
        ax.barh(range(len(labels)), means, color=["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"])
        ax.set_yticks(range(len(labels)), short if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for i, m in enumerate(means):
            ax.text(m, i, f" {m:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
