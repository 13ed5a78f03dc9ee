"""4M (``fourm``) on FMNIST-Scenes-3D at 32 px: one all-to-all model against single-pair models, Dirichlet vs uniform.

A small-scale demonstration of 4M's components (issue 19, paper 42), not a reproduction of its numbers. Data:
FMNIST-Scenes-3D (32 px, 1-3 items at 2-8 m), modalities rgb, depth, semseg (8x8 FSQ tokens each), caption and
boxes-as-text. The three dense tokenizers are trained once (seed 0, ``--tok-steps``) and frozen; every row below
uses them. Rows, each trained for the same ``--steps`` steps at the same batch and the same budgets (48 input and
48 target tokens: the same compute per step): single-pair RGB->semseg, single-pair RGB->depth, 4M all-to-all with
Dirichlet(0.5) budgets, 4M with uniform masking. Evaluated on held-out scenes (any-to-any, tokens generated from
the full source modality): RGB->semseg mIoU (tokens decoded to a class map; parallel argmax and 4-step iterative
unmasking), RGB->depth AbsRel (decoded, valid pixels), semseg->RGB token accuracy, caption->semseg mIoU. The
"tokenizer" row decodes the true tokens: the ceiling any token predictor can reach.

    python benchmarks/fourm.py --threads 1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from task_fit import cell, warmup_cosine, write_csv  # shared table helpers (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data.synthetic.fmnist_scenes_3d import generate_fmnist_scenes_3d
from vitlab.tasks import create_task_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENC = {"embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
COMMON = {"img_size": 32, "backbone_kwargs": ENC, "dec_depth": 4, "dec_heads": 4, "mlp_ratio": 2.0, "max_items": 3}
ROWS = {
    "single-pair rgb->semseg": {"pair": ("rgb", "semseg")},
    "single-pair rgb->depth": {"pair": ("rgb", "depth")},
    "4M all-to-all (Dirichlet)": {"masking": "dirichlet"},
    "4M uniform masking": {"masking": "uniform"},
}
COLUMNS = ["seg_miou", "seg_miou_iter", "depth_absrel", "sem2rgb_acc", "cap2seg_miou", "train_s"]


def load(split: str, n: int) -> dict:
    """Scenes as stacked tensors: image (normalised), semantic, depth, boxes and labels (lists)."""
    scenes = generate_fmnist_scenes_3d(split, n, seed=0, canvas=32, max_items=3, depth_range=(2.0, 8.0))
    items = [scenes[i] for i in range(len(scenes))]
    mean, std = torch.tensor(scenes.mean).view(1, -1, 1, 1), torch.tensor(scenes.std).view(1, -1, 1, 1)
    image = (torch.stack([s["image"] for s in items]).float() / 255 - mean) / std
    return {
        "image": image,
        "semantic": torch.stack([s["semantic"] for s in items]),
        "depth": torch.stack([s["depth"] for s in items]),
        "boxes": [s["boxes"] for s in items],
        "labels": [s["labels"] for s in items],
        "mean": mean,
        "std": std,
    }


def tokenize(model, data: dict, chunk: int = 250) -> dict:
    out: dict[str, list] = {}
    for i in range(0, len(data["image"]), chunk):
        part = {k: data[k][i : i + chunk] for k in ("semantic", "depth", "boxes", "labels")}
        for m, t in model.tokenize(data["image"][i : i + chunk], **part).items():
            out.setdefault(m, []).append(t)
    return {m: torch.cat(t) for m, t in out.items()}


def fit(model, tokens: dict, steps: int, batch: int, lr: float, seed: int) -> float:
    """AdamW with warm-up and cosine decay on pre-tokenized data; returns the wall time (s)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = warmup_cosine(opt, steps, max(1, steps // 10))
    n = len(next(iter(tokens.values())))
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = model.loss(model.forward_tokens({m: t[idx] for m, t in tokens.items()}), {})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 11) -> float:
    from torchmetrics.functional.classification import multiclass_jaccard_index

    return 100 * float(multiclass_jaccard_index(pred, target, num_classes, average="macro"))


def absrel(pred: torch.Tensor, target: torch.Tensor) -> float:
    valid = target > 0
    return float(((pred[valid] - target[valid]).abs() / target[valid]).mean())


@torch.no_grad()
def evaluate(model, tokens: dict, data: dict, directions: set, chunk: int = 250) -> dict:
    model.eval()
    res: dict[str, float] = {}

    def gen(src: str, tgt: str, steps: int = 1) -> torch.Tensor:
        n = len(tokens[src])
        return torch.cat([model.generate({src: tokens[src][i : i + chunk]}, tgt, steps=steps)
                          for i in range(0, n, chunk)])  # fmt: skip

    if "rgb->semseg" in directions:
        res["seg_miou"] = miou(model.detokenize("semseg", gen("rgb", "semseg")), data["semantic"])
        if model.pair is None:
            res["seg_miou_iter"] = miou(model.detokenize("semseg", gen("rgb", "semseg", 4)), data["semantic"])
    if "rgb->depth" in directions:
        res["depth_absrel"] = absrel(model.detokenize("depth", gen("rgb", "depth")), data["depth"])
    if "semseg->rgb" in directions:
        res["sem2rgb_acc"] = 100 * float((gen("semseg", "rgb") == tokens["rgb"]).float().mean())
    if "caption->semseg" in directions:
        res["cap2seg_miou"] = miou(model.detokenize("semseg", gen("caption", "semseg")), data["semantic"])
    return res


def sample_grid(model, tokens: dict, data: dict, path: Path, count: int = 8) -> None:
    """Rows: test scenes; columns: rgb | semseg true, true tokens decoded, from rgb, from caption | depth true, from
    rgb | rgb from semseg (generated with 4 unmasking steps)."""
    import numpy as np
    from PIL import Image

    from vitlab.engine.task_inference import _palette

    model.eval()
    t = {m: v[:count] for m, v in tokens.items()}
    with torch.no_grad():
        seg_tok = model.detokenize("semseg", t["semseg"])  # the tokenizer's reconstruction: the ceiling
        seg_rgb = model.detokenize("semseg", model.generate({"rgb": t["rgb"]}, "semseg", steps=4))
        seg_cap = model.detokenize("semseg", model.generate({"caption": t["caption"]}, "semseg", steps=4))
        dep = model.detokenize("depth", model.generate({"rgb": t["rgb"]}, "depth", steps=4))
        rgb_sem = model.detokenize("rgb", model.generate({"semseg": t["semseg"]}, "rgb", steps=4))
    palette = _palette(11)

    def grey(x: torch.Tensor) -> np.ndarray:
        x = ((x * data["std"][0] + data["mean"][0]).clamp(0, 1) * 255).byte()[0].numpy()
        return np.stack([x] * 3, -1)

    def colour_depth(d: torch.Tensor) -> np.ndarray:
        v = torch.where(d > 0, 2.0 / d.clamp(min=1e-3), torch.zeros_like(d)).clamp(0, 1)
        return np.stack([(v * 255).byte().numpy()] * 3, -1)

    rows = []
    for i in range(count):
        tiles = [grey(data["image"][i]), palette[data["semantic"][i].numpy()], palette[seg_tok[i].numpy()],
                 palette[seg_rgb[i].numpy()],
                 palette[seg_cap[i].numpy()], colour_depth(data["depth"][i]), colour_depth(dep[i]),
                 grey(rgb_sem[i])]  # fmt: skip
        rows.append(np.concatenate([np.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=255) for x in tiles], 1))
    grid = np.concatenate(rows, 0).repeat(3, 0).repeat(3, 1)
    Image.fromarray(grid.astype(np.uint8)).save(path)


def merge_previous(path: Path, rows: dict) -> dict:
    """``rows`` plus the runs of an earlier CSV of this script whose (row, seed) this run did not make."""
    import csv

    merged: dict[str, list] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            seed = int(r.pop("seed"))
            name = r.pop("row")
            if any(run["seed"] == seed for run in rows.get(name, [])):
                continue
            merged.setdefault(name, []).append({"seed": seed, **{k: float(v) if v else None for k, v in r.items()}})
    for name, runs in rows.items():
        merged.setdefault(name, []).extend(runs)
    return merged


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("seg_miou", "RGB->semseg mIoU"), ("depth_absrel", "RGB->depth AbsRel"),
               ("sem2rgb_acc", "semseg->RGB token acc %"), ("cap2seg_miou", "caption->semseg mIoU")]  # fmt: skip
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        names = [n for n, runs in rows.items() if any(r.get(key) is not None for r in runs)]
        vals = [[r[key] for r in rows[n] if r.get(key) is not None] for n in names]
        ax.bar(range(len(names)), [sum(v) / len(v) for v in vals], color="tab:blue")
        for j, v in enumerate(vals):
            ax.scatter([j] * len(v), v, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--tok-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="appended to the row names (e.g. a longer run's step count)")
    ap.add_argument("--append", action="store_true", help="merge with the runs of other seeds in --out's CSV")
    ap.add_argument(
        "--tok-cache", type=Path, default=None, help="load the tokenizers from here if it exists, else save"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train, test = load("train", args.n_train), load("test", args.n_test)
    print(f"data {time.perf_counter() - t_start:.0f}s", flush=True)

    torch.manual_seed(0)
    base = create_task_model("fourm", "vit_nano_patch4_28", **COMMON)
    t0 = time.perf_counter()
    if args.tok_cache is not None and args.tok_cache.exists():
        base.tokenizers.load_state_dict(torch.load(args.tok_cache, weights_only=True))
        tok_s = float("nan")
    else:
        tok_loss = base.fit_tokenizers(train, args.tok_steps, batch=args.batch, seed=0)
        tok_s = time.perf_counter() - t0
        print(f"tokenizers {tok_s:.0f}s, final losses {tok_loss}", flush=True)
        if args.tok_cache is not None:
            torch.save(base.tokenizers.state_dict(), args.tok_cache)
    tok_state = base.tokenizers.state_dict()
    train_tok, test_tok = tokenize(base, train), tokenize(base, test)
    ceiling = {
        "seg_miou": miou(base.detokenize("semseg", test_tok["semseg"]), test["semantic"]),
        "depth_absrel": absrel(base.detokenize("depth", test_tok["depth"]), test["depth"]),
        "sem2rgb_acc": 100.0,
        "cap2seg_miou": None,
        "train_s": tok_s,
        "seed": 0,
    }
    ceiling["seg_miou_iter"] = ceiling["seg_miou"]
    rows = {"tokenizer (true tokens decoded)": [ceiling]}
    print(f"ceiling {ceiling}", flush=True)
    last = None
    for name in args.rows:
        kw = ROWS[name]
        label = f"{name} {args.tag}".strip()
        rows[label] = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = create_task_model("fourm", "vit_nano_patch4_28", **COMMON, **kw)
            model.tokenizers.load_state_dict(tok_state)
            train_s = fit(model, train_tok, args.steps, args.batch, args.lr, seed)
            pair = kw.get("pair")
            dirs = (
                {f"{pair[0]}->{pair[1]}"} if pair else {"rgb->semseg", "rgb->depth", "semseg->rgb", "caption->semseg"}
            )
            res = {**evaluate(model, test_tok, test, dirs), "train_s": train_s, "seed": seed}
            rows[label].append(res)
            print(label, res, flush=True)
            if pair is None and kw.get("masking") == "dirichlet":
                last = model
    stem = args.out / "fourm"
    if args.append and stem.with_suffix(".csv").exists():
        rows = merge_previous(stem.with_suffix(".csv"), rows)
    write_csv(stem.with_suffix(".csv"), rows, COLUMNS)
    plot(rows, stem.with_suffix(".png"))
    if last is not None:
        sample_grid(last, test_tok, test, args.out / "fourm_samples.png")
    digits = {"depth_absrel": 3}
    lines = [
        "# 4M (fourm) on FMNIST-Scenes-3D, 32 px: any-to-any vs single-pair models",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {describe_machine()}; {args.threads} thread(s), "
        "shared 2-core machine (timings are loaded-machine wall times).  ",
        f"Seeds: {sorted({r['seed'] for runs in rows.values() for r in runs})} (mean ± half range); "
        f"{args.steps} steps, batch {args.batch}, AdamW lr {args.lr}; "
        f"{args.n_train} train / {args.n_test} test scenes; tokenizers {args.tok_steps} steps (seed 0, frozen); "
        f"total wall time {time.perf_counter() - t_start:.0f} s.",
        "",
        "| row | RGB->semseg mIoU (1 step) | RGB->semseg mIoU (4 steps) | RGB->depth AbsRel | semseg->RGB token acc % "
        "| caption->semseg mIoU | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], digits.get(k, 1)) for k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "READING (filled in by hand after the run)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
