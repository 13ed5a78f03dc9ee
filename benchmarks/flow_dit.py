"""flow_dit on Fashion-MNIST: a small DiT trained by flow matching for a few minutes, scored by a classifier.

A small-scale demonstration (issue 19, shared part 1), not a reproduction of any paper's numbers. Per seed: a
``flow_dit`` model (DiT on ``vit_micro_patch4_28``'s layout shrunk to 64 wide x 4 blocks, 28 px, patch 4) trains
for ``--steps`` steps of the shared loop (``task_fit.train``); its class-conditional samples (Euler, ``--ode-steps``
steps, with and without classifier-free guidance) and those of the same model untrained (the floor) are scored by
the pretrained Fashion-MNIST classifier ``runs/compression/host_vit_micro_s0`` (vit_micro_patch4_28, 81% top-1):
its accuracy on the samples (does a class-c sample look like class c?) and the Fréchet distance of its pre-logit
features (128-d) between the samples and real test images (FID's formula on another network: "FD-cls").
The real test images themselves give the ceiling (accuracy) and the estimator's floor (FD between two disjoint
sets of real test images of the same size).

    python benchmarks/flow_dit.py --threads 1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from task_fit import cell, train, write_csv  # shared loop and table helpers (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data import load_fashion_mnist
from vitlab.data.loader import BatchLoader
from vitlab.engine.inference import load_trained
from vitlab.engine.task_objective import TaskObjective
from vitlab.tasks import create_task_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOST = ROOT / "runs" / "compression" / "host_vit_micro_s0"
DIT = {"embed_dim": 64, "depth": 4, "num_heads": 4}
COLUMNS = ["acc", "fd", "flow_loss", "train_s"]


def features(classifier, images: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images -> (pre-logit features (N, D), predicted classes (N,))."""
    feats, preds = [], []
    with torch.inference_mode():
        for x in images.split(batch):
            f = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
            feats.append(f.double())
            preds.append(classifier.get_classifier()(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (N, D): FID's formula."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(cov_a cov_b) = sum of sqrt eigenvalues of the symmetric sqrt(cov_a) cov_b sqrt(cov_a)
    w, v = torch.linalg.eigh(cov_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def balanced_test(data, per_class: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` normalised test images per class, starting at the ``offset``-th of each class."""
    loader = BatchLoader(data, 10_000, shuffle=False)
    batch = next(iter(loader.iter_batches(0)))
    idx = torch.cat([(batch["label"] == c).nonzero()[offset : offset + per_class, 0] for c in range(10)])
    return batch["image"][idx], batch["label"][idx]


def flow_loss(model, data, n: int = 2000) -> float:
    """The held-out flow loss (the task's metric: fixed times and noise) on the first ``n`` test images."""
    loader = BatchLoader(data.subset(n, seed=0) if n < len(data) else data, 250, shuffle=False)
    return float(
        TaskObjective(model).evaluate(model, loader.iter_batches(0), torch.device("cpu"), _no_amp)["flow_loss"]
    )


class _no_amp:  # noqa: N801  (a context manager factory, as the engine's ``amp`` argument)
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def score(model, classifier, real_feats, labels, cfg, args, seed) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    x = model.sample(len(labels), labels, steps=args.ode_steps, cfg=cfg, generator=g)
    feats, preds = features(classifier, x)
    return {"acc": 100 * float((preds == labels).float().mean()), "fd": frechet(feats, real_feats), "samples": x}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps per seed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cfg", type=float, default=3.0, help="the guided rows' guidance scale")
    ap.add_argument("--ode-steps", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=100, help="samples (and real test images) per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the existing CSV's rows of other seeds (add a seed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classifier, meta, _ = load_trained(HOST)
    train_set, test_set = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    real, real_labels = balanced_test(test_set, args.per_class, 0)
    other, _ = balanced_test(test_set, args.per_class, args.per_class)
    real_feats, real_preds = features(classifier, real)
    rows: dict[str, list[dict]] = {
        "real test images (ceiling; FD: two disjoint real sets)": [
            {"seed": "-", "acc": 100 * float((real_preds == real_labels).float().mean()),
             "fd": frechet(features(classifier, other)[0], real_feats)}
        ]
    }  # fmt: skip
    if args.keep:
        for label, runs in read_csv(args.out / "flow_dit.csv").items():
            if not label.startswith("real"):
                rows[label] = [r for r in runs if r["seed"] not in args.seeds]
    labels = torch.arange(10).repeat_interleave(args.per_class)
    grids = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = create_task_model("flow_dit", backbone_kwargs=DIT).eval()
        for label, cfg in (("untrained (floor), cfg 1", 1.0),):
            res = score(model, classifier, real_feats, labels, cfg, args, seed)
            rows.setdefault(label, []).append({"seed": seed, **res, "flow_loss": flow_loss(model, test_set)})
            grids.setdefault(label, res["samples"])
        write(rows, args)
        secs = train(model, train_set, 0, args.lr, args.batch, seed, steps=args.steps)
        model.eval()
        loss = flow_loss(model, test_set)
        for cfg in (1.0, args.cfg):
            label = f"trained, cfg {cfg:g}"
            res = score(model, classifier, real_feats, labels, cfg, args, seed)
            rows.setdefault(label, []).append({"seed": seed, **res, "flow_loss": loss, "train_s": secs})
            grids.setdefault(label, res["samples"])
            print(
                f"seed {seed} {label}: acc {res['acc']:.1f} fd {res['fd']:.2f} loss {loss:.4f} {secs:.0f}s", flush=True
            )
            write(rows, args)
        if seed == args.seeds[0] and not args.keep:  # the picture shows the first seed of a fresh table
            plot(grids, meta, args, seed)


def read_csv(path: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    if path.exists():
        with open(path) as f:
            for r in csv.DictReader(f):
                values = {k: float(r[k]) for k in COLUMNS if r.get(k)}
                seed = int(r["seed"]) if r["seed"].isdigit() else r["seed"]
                rows.setdefault(r["row"], []).append({"seed": seed, **values})
    return rows


def write(rows: dict[str, list[dict]], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "flow_dit.csv", rows, COLUMNS)
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs if r["seed"] != "-"})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    lines = [
        "# flow_dit: a small DiT trained by flow matching on Fashion-MNIST (a small-scale demonstration)",
        "",
        f"Date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}. Model `flow_dit` on "
        f"`vit_micro_patch4_28` shrunk to {DIT} (28 px, patch 4, 49 tokens + CLS; "
        f"{sum(p.numel() for p in create_task_model('flow_dit', backbone_kwargs=DIT).parameters()) / 1e6:.2f} M "
        f"parameters), class-conditional, label dropout 0.1, logit-normal t. Training: {args.steps} steps of batch "
        f"{args.batch} on the 60,000 Fashion-MNIST training images (no augmentation; AdamW lr {args.lr}, wd 0.05, "
        f"warmup 10% + cosine, clip 1; no EMA), {args.threads} torch thread(s), machine shared with other jobs. "
        f"Samples: {args.per_class} per class, Euler with {args.ode_steps} steps from the same seeded noise; "
        f"guidance `v_null + w (v_class - v_null)`. Scored by the Fashion-MNIST classifier "
        f"`runs/compression/host_vit_micro_s0` (vit_micro_patch4_28, 81.4% test top-1): acc = how often it "
        f"assigns a sample the class it was generated for (chance 10%); FD-cls = Fréchet distance of its 128-d "
        f"pre-logit features between the samples and {10 * args.per_class} real test images (FID's formula on "
        f"this classifier's features, not Inception: lower is better, comparable only inside this table). Flow "
        f"loss: the task's deterministic held-out metric (2,000 test images, 8 fixed t's, seeded noise). Seeds "
        f"{seeds}" + (": one seed, no spread" if len(seeds) == 1 else ": mean ± half the range") + ". Machine: "
        f"{machine}. Command: `python benchmarks/flow_dit.py {' '.join(sys.argv[1:])}`.",
        "",
        "| row | class acc. % | FD-cls | flow loss | train s (1 thread, machine shared with other jobs) |",
        "|---|---:|---:|---:|---:|",
    ]
    digits = {"fd": 2, "flow_loss": 4, "train_s": 0}
    for label, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], digits.get(k, 1)) for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    path = args.out / "flow_dit.md"
    text = path.read_text() if path.exists() else ""
    reading = text[text.find("\n## Reading") :] if "\n## Reading" in text else ""
    path.write_text("\n".join(lines) + "\n" + reading)


def plot(grids: dict[str, torch.Tensor], meta: dict, args, seed: int) -> None:
    """Sample grids (a row per class, 10 per row) of ``seed``: untrained, trained cfg 1, trained cfg w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.6))
    for ax, (label, x) in zip(list(getattr(axes, "flat", [axes])), grids.items(), strict=True):
        pick = x.view(10, -1, *x.shape[1:])[:, :10].flatten(0, 1)
        pick = (pick * meta["std"][0] + meta["mean"][0]).clamp(0, 1)
        ax.imshow(make_grid(pick, nrow=10, padding=1, pad_value=1.0).permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    title = f"flow_dit samples on Fashion-MNIST, one row per class, seed {seed} (a small-scale demonstration)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out / "flow_dit.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - t0:.0f}s")
