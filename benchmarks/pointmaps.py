"""Feed-forward pointmaps (paper 37): DUSt3R-style pairs and VGGT-style frames on Render3D, the real Middlebury pair.

Rows: ``full`` (dust3r: cross-attending decoders, confidence-weighted loss), ``no_cross`` (decoders without
cross-attention), ``no_conf`` (plain normalised Euclidean loss); ``vggt`` (``--views`` frames, alternating frame-wise
and global attention) and ``vggt_no_global`` (frame-wise only); the heads: ``full_dpt`` and ``vggt_dpt`` (DPT heads on
the tapped decoder layers instead of linear ones), ``vggt_iter3`` (3 camera-head iterations), ``vggt_tracks`` (the
tracking head on a 4 x 4 grid of frame-1 queries: track error in px on visible points of frames 2.., visibility
accuracy). Each row trains its model from scratch on the
same Render3D samples (one seed = one initialisation and batch order) and reports on held-out samples: the
scale-invariant pointmap error, depth AbsRel / delta < 1.25 (median-aligned) and the rotation error (dust3r: view 2's
relative rotation by Procrustes; vggt: its camera head); then each dust3r model runs on the Middlebury "Motorcycle"
pair (``data/stereo.py``), centre square resized to the model's size, depth median-aligned, errors on
valid-disparity pixels. A constant depth (median-aligned) is the floor every depth figure is compared with, "no
relative rotation" the floor of the rotation error, "no motion" (every query stays where it is, always visible) the
floor of the tracks. ``--spread`` narrows the views' azimuth range (Render3D's ``spread``, default 60 deg),
``--camera-weight`` sets the vggt rows' camera-loss weight, ``--name`` the result files' stem.

    nice -n 5 .venv/bin/python benchmarks/pointmaps.py --threads 1 --steps 400 --seeds 0 1

writes ``benchmarks/results/pointmaps.{csv,md,png}`` (``--name``) after every finished run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from task_fit import cell, warmup_cosine  # the shared table cell (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data.stereo import load_middlebury_pair
from vitlab.data.synthetic import make_dataset
from vitlab.tasks import create_task_model
from vitlab.tasks.multiview import frames_from_render3d, pairs_from_render3d
from vitlab.tasks.multiview.croco import load_croco
from vitlab.tasks.multiview.geometry import depth_errors, rotation_angle_deg, track_ground_truth
from vitlab.tasks.multiview.heads import query_grid

ROWS = {"full": {}, "no_cross": {"cross_view": False}, "no_conf": {"confidence": False},
        "vggt": {"task": "vggt"}, "vggt_no_global": {"task": "vggt", "global_attention": False},
        "full_dpt": {"head": "dpt"}, "vggt_dpt": {"task": "vggt", "head": "dpt"},
        "vggt_iter3": {"task": "vggt", "camera_iters": 3},
        "vggt_tracks": {"task": "vggt", "track_queries": 16}}  # fmt: skip
COLUMNS = ["pointmap_err", "depth_absrel", "depth_delta1", "rot_err_deg", "fov_err_deg", "track_err_px",
           "track_vis_acc", "mb_absrel", "mb_delta1", "train_s"]  # fmt: skip
TRACK_QUERIES = 16
BACKBONE = "vit_micro_patch4_28"
ENCODER = {"embed_dim": 64, "depth": 4, "num_heads": 2}


def load_pairs(
    split: str, n: int, size: int, stats=None, views: int = 2, spread: float = 60.0, fov=(40.0, 75.0), **render
):  # the default fov is Render3D's: the same samples and cache key as before it was an argument here
    data = make_dataset("render3d", split=split, n=n, views=views, size=size, spread=spread, fov=fov, **render)
    mean, std = stats or (data.mean, data.std)
    to_batch = pairs_from_render3d if views == 2 else frames_from_render3d
    batch = to_batch(data.collate([data[i] for i in range(len(data))]), mean, std)
    return batch, mean, std


def _slice(batch: dict, index) -> dict:
    return {k: v[index] for k, v in batch.items()}


def build(kw: dict, args):
    kw = {"head": "linear", **kw}  # rows name their head: linear unless `_dpt`, whatever the task's default
    task = kw.pop("task", "dust3r")
    if task == "vggt":  # the same widths: aggregator 64 wide, dec_depth frame/global pairs
        depth = kw.pop("dec_depth")
        kw = {**kw, "num_frames": args.views, "dim": 64, "depth": depth, "camera_weight": args.camera_weight}
    return create_task_model(task, BACKBONE, img_size=args.size, backbone_kwargs=ENCODER, **kw)


def train_one(kw: dict, train: dict, args, seed: int, init: dict | None = None):
    """Train a row's model for ``args.steps`` steps; ``init``: a CroCo-pretrained dust3r state to start from
    (``croco.load_croco``: everything but the heads, which keep this seed's initialisation)."""
    torch.manual_seed(seed)
    model = build(kw, args)
    if init is not None:
        load_croco(model, init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = warmup_cosine(opt, args.steps, max(1, args.steps // 20))
    g = torch.Generator().manual_seed(seed)
    n = train["image"].shape[0]
    order = torch.randperm(n, generator=g)
    model.train()
    start, pos = time.perf_counter(), 0
    for step in range(args.steps):
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        batch = _slice(train, order[pos : pos + args.batch])
        pos += args.batch
        loss = model.loss(model(batch["image"]), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, args.steps // 5) == 0:
            print(f"  step {step} loss {loss.item():.4f}", flush=True)
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def evaluate(model, test: dict, args) -> dict[str, float]:
    metrics = model.build_metrics()
    for i in range(0, test["image"].shape[0], 50):
        batch = _slice(test, slice(i, i + 50))
        model.update_metrics(metrics, model(batch["image"]), batch)
    return model.summarize_metrics(metrics)


@torch.no_grad()
def middlebury(model, pair: dict, mean, std) -> dict[str, float]:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    image = ((pair["images"].float() / 255 - m) / s)[None]
    depth = model(image)["pointmap"][:, 0, ..., 2]
    absrel, delta = depth_errors(depth, pair["depth"][None], pair["valid"][None])
    return {"mb_absrel": absrel.item(), "mb_delta1": 100 * delta.item()}


def track_floor(test: dict, size: int) -> dict[str, float]:
    """Tracks of "no motion": every query stays at its frame-1 pixel and is called visible (frames 2..)."""
    queries = query_grid(TRACK_QUERIES, size)
    uv, visible, ok = track_ground_truth(queries, test["depth"], test["valid"], test["K"], test["cam_to_world"])
    uv, visible = uv[:, 1:], visible[:, 1:]
    w = visible.float()
    err = ((queries - uv).norm(dim=-1) * w).sum((1, 2)) / w.sum((1, 2))
    m = ok[:, None].expand_as(visible).float()
    acc = 100 * (w * m).sum((1, 2)) / m.sum((1, 2))
    return {"track_err_px": err[err.isfinite()].mean().item(), "track_vis_acc": acc[acc.isfinite()].mean().item()}


def floors(test: dict, pair: dict | None) -> dict[str, float]:
    """Depth errors of a constant depth (median-aligned) and the rotation error of "no rotation": what to beat."""
    gt, valid = test["depth"], test["valid"]  # every view (vggt's depth metric); dust3r's is view 1's
    gt, valid = (gt[:, 0], valid[:, 0]) if gt.shape[1] == 2 else (gt.flatten(1), valid.flatten(1))
    absrel, delta = depth_errors(torch.ones_like(gt), gt, valid)
    c2w = test["cam_to_world"]
    rel = c2w[:, :1, :3, :3].transpose(-1, -2) @ c2w[:, 1:, :3, :3]  # identity guess: the true relative angles
    if pair is None:
        return {"depth_absrel": absrel.mean().item(), "depth_delta1": 100 * delta.mean().item(),
                "rot_err_deg": rotation_angle_deg(torch.eye(3), rel).mean().item()}  # fmt: skip
    mb_absrel, mb_delta = depth_errors(torch.ones_like(pair["depth"])[None], pair["depth"][None], pair["valid"][None])
    return {"depth_absrel": absrel.mean().item(), "depth_delta1": 100 * delta.mean().item(),
            "rot_err_deg": rotation_angle_deg(torch.eye(3), rel).mean().item(),
            "mb_absrel": mb_absrel.item(), "mb_delta1": 100 * mb_delta.item()}  # fmt: skip


def single_view_floor(test: dict) -> dict[str, float]:
    """Rotation error of the best guess from single-view cues: every camera's pitch and roll relative to gravity
    (the ground and walls show them in one image) exact, its azimuth change left out. Render3D's cameras orbit the
    scene (z-up world), so what is left is the yaw (azimuth) change, which only a cross-view match can tell."""
    c2w = test["cam_to_world"].double()
    R1, R = c2w[:, :1, :3, :3], c2w[:, 1:, :3, :3]
    fwd = c2w[..., :3, 2]  # the optical axes in the world
    yaw = torch.atan2(fwd[..., 1], fwd[..., 0])
    d = (yaw[:, 1:] - yaw[:, :1])[..., None, None]
    c, s, zero, one = torch.cos(d), torch.sin(d), torch.zeros_like(d), torch.ones_like(d)
    Rz = torch.cat([torch.cat([c, -s, zero], -1), torch.cat([s, c, zero], -1), torch.cat([zero, zero, one], -1)], -2)
    guess = R1.transpose(-1, -2) @ Rz.transpose(-1, -2) @ R  # the true relative rotation with the yaw change undone
    return {"rot_err_deg": rotation_angle_deg(guess, R1.transpose(-1, -2) @ R).mean().item()}


def _floor_row(name: str, floor: dict) -> str:
    keys = ("depth_absrel", "depth_delta1", "rot_err_deg", "fov_err_deg", "track_err_px", "track_vis_acc",
            "mb_absrel", "mb_delta1")  # fmt: skip
    cells = " | ".join(cell([floor.get(k)], 3 if "absrel" in k else 1) for k in keys)
    return f"| {name} | - | - | {cells} | - |"


def write(rows: dict[str, list[dict]], floors_: dict[str, dict], args, meta: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {label: rows[label] for label in ROWS if label in rows}
    with open(args.out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", *COLUMNS])
        for task, floor in floors_.items():
            w.writerow([f"floor_{task}", "", *(floor.get(k) for k in COLUMNS)])
        for label, runs in rows.items():
            for r in runs:
                w.writerow([label, r["seed"], *(r.get(k) for k in COLUMNS)])
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    lines = [
        "# Feed-forward pointmaps (paper 37): DUSt3R-style pairs, VGGT-style frames, the Middlebury Motorcycle pair",
        "",
        f"Date {meta['date']}, torch {torch.__version__}. Command: `python benchmarks/pointmaps.py "
        f"{' '.join(sys.argv[1:])}`. Data: Render3D (`make_dataset('render3d', size={args.size})`: textured "
        f"boxes on a textured ground inside walls, orbit cameras, FoV 40-75 deg, views up to {args.spread:g} deg of "
        f"azimuth from view 1), {args.n} training / {args.test_n} test samples at {args.size} px, 2 views "
        f"for the dust3r rows, "
        f"{args.views} for the vggt rows. Encoder `{BACKBONE}` {ENCODER} (patch 4, its own learned position embedding) "
        f"shared by the views; dust3r: decoders 2 x {args.dec_depth} blocks of width 64 with 2-D RoPE, linear heads "
        f"(`_dpt` rows: DPT heads, fusion width 32, on the encoder tokens and every block), pts_mode exp; vggt: "
        f"{args.dec_depth} frame/global block pairs of width 64, camera token + 2 registers, linear depth/pointmap "
        f"heads (`vggt_dpt`: DPT on each pair's concatenated outputs), MLP camera head (`vggt_iter3`: 2 refinement "
        f"iterations), camera-loss weight {args.camera_weight:g}. Parameters (M): {meta['params']}. Training: "
        f"{args.steps} "
        f"steps, batch {args.batch}, AdamW lr {args.lr} (wd 0.05, warmup 5% + cosine, clip 1), from scratch. "
        f"Seeds {seeds} (n = seeds per row; mean ± half the range where n > 1). "
        "Metrics on valid pixels of the test samples: pointmap err = sum |s* P - G| / sum |G| over all views (s* the "
        "least-squares scale). Depth, median-aligned: dust3r view 1 (z of its pointmap), vggt every view (its depth "
        "head). Rot err: dust3r, view 2's true relative rotation vs the one Procrustes (Umeyama, with scale) fits "
        "from its true camera-frame points to its predicted points in view 1's frame; vggt, its camera head's "
        "rotation of views 2.. relative to view 1 vs the truth. FoV err: vggt's camera head, mean of both FoVs. "
        "Middlebury (mb, dust3r rows only: vggt is built for "
        f"{args.views} frames): the trained model on the real pair (`load_middlebury_pair({args.size})`: centre "
        "500x500 square resized, normalised with Render3D's statistics), view-1 depth median-aligned, on "
        "valid-disparity pixels. Floors: a constant depth (median-aligned), \"no relative rotation\", the "
        "single-view rotation floor (each camera's pitch and roll exact, no azimuth change: the best that cues of "
        "one image can give, as Render3D's cameras orbit a z-up scene) and, for tracks, \"no motion\" (every "
        "query stays put and is called visible). Train s: "
        f"wall time of the training loop ({args.threads} thread(s), machine shared with other jobs). Machine: "
        f"{machine}."
        + (f" Runs kept from an earlier run of this script, same settings (`--keep`): {', '.join(meta['kept'])}."
           if meta.get("kept") else ""),
        "",
        "| row | n | pointmap err | depth AbsRel | depth δ<1.25 % | rot err ° | FoV err ° | track err px | track vis % "
        "| mb AbsRel | mb δ<1.25 % | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(_floor_row(f"floor ({task}: {f['_what']})", f) for task, f in floors_.items()),
    ]  # fmt: skip
    digits = {"pointmap_err": 3, "depth_absrel": 3, "mb_absrel": 3, "train_s": 0, "track_err_px": 2}
    for label, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], digits.get(k, 1)) for k in COLUMNS]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    path = args.out / f"{args.name}.md"
    path.write_text("\n".join(lines) + "\n" + _reading(path))
    plot(rows, floors_, args.out / f"{args.name}.png")


def _reading(path: Path) -> str:
    """Keep a hand-written "## Reading" section of an earlier markdown when the table is rewritten."""
    text = path.read_text() if path.exists() else ""
    return text[text.index("\n## Reading") :] if "\n## Reading" in text else ""


def plot(rows: dict[str, list[dict]], floors_: dict[str, dict], path: Path) -> None:
    panels = [("pointmap_err", "pointmap err (lower better)"), ("depth_absrel", "Render3D depth AbsRel"),
              ("rot_err_deg", "rotation err (deg)"), ("mb_absrel", "Middlebury depth AbsRel (dust3r)")]  # fmt: skip

    def floor_lines(key: str) -> list[tuple[float, str]]:
        what = "constant depth" if "rot" not in key else None
        return [(floor[key], f"{what or ('single-view' if 'single' in task else 'identity')} ({task})")
                for task, floor in floors_.items() if key in floor]  # fmt: skip

    bar_panels(rows, panels, floor_lines, path)


def bar_panels(rows: dict[str, list[dict]], panels: list[tuple[str, str]], floor_lines, path: Path) -> None:
    """One panel per metric: a bar per row (the mean over seeds, each seed a dot) and ``floor_lines(key)`` ->
    ``[(value, label)]`` as horizontal lines. Shared by ``pointmaps_croco.py``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0))
    labels = list(rows)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, label in enumerate(labels):
            values = [r[key] for r in rows[label] if r.get(key) is not None]
            if values:
                ax.bar(i, statistics.fmean(values), color=f"C{i}")
                ax.plot([i] * len(values), values, "k.", ms=4)
        for j, (value, name) in enumerate(floor_lines(key)):
            ax.axhline(value, color="gray", ls=("--", ":", "-.")[j % 3], lw=1, label=name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_csv(path: Path, columns: list[str] = COLUMNS) -> dict[str, list[dict]]:
    """Runs of an earlier CSV of this script (floors, which have no seed, left out), for ``--keep``."""
    rows: dict[str, list[dict]] = {}
    if path.exists():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["seed"] != "":
                    values = {k: float(r[k]) for k in columns if r.get(k) not in (None, "")}
                    rows.setdefault(r["row"], []).append({"seed": int(r["seed"]), **values})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dec-depth", type=int, default=2)
    p.add_argument("--views", type=int, default=4, help="frames per sample of the vggt rows")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spread", type=float, default=60.0, help="Render3D's azimuth spread of the views (degrees)")
    p.add_argument("--camera-weight", type=float, default=1.0, help="the vggt rows' camera-loss weight")
    p.add_argument("--name", default="pointmaps", help="stem of the result files in --out")
    p.add_argument("--keep", action="store_true", help="keep the runs already in the CSV (same settings) and skip them")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, mean, std = load_pairs("train", args.n, args.size, spread=args.spread)
    test, _, _ = load_pairs("test", args.test_n, args.size, (mean, std), spread=args.spread)
    pair = load_middlebury_pair(args.size)
    data = {"dust3r": (train, test)}
    floors_ = {
        "dust3r": floors(test, pair) | {"_what": "constant depth, identity rotation"},
        "dust3r single-view": single_view_floor(test) | {"_what": "pitch and roll known, no azimuth change"},
    }
    rows = read_csv(args.out / f"{args.name}.csv") if args.keep else {}
    if any(ROWS[r].get("task") == "vggt" for r in [*args.rows, *rows]):
        train_v, _, _ = load_pairs("train", args.n, args.size, (mean, std), args.views, args.spread)
        test_v, _, _ = load_pairs("test", args.test_n, args.size, (mean, std), args.views, args.spread)
        data["vggt"] = (train_v, test_v)
        what = "constant depth, identity rotation, no motion"
        floors_["vggt"] = floors(test_v, None) | track_floor(test_v, args.size) | {"_what": what}
        floors_["vggt single-view"] = single_view_floor(test_v) | {"_what": "pitch and roll known, no azimuth change"}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "params": {}}
    for task in data:
        model = build({"task": task, "dec_depth": args.dec_depth}, args)
        meta["params"][task] = round(sum(q.numel() for q in model.parameters()) / 1e6, 3)
    meta["kept"] = sorted(f"{label} seed {r['seed']}" for label, runs in rows.items() for r in runs)
    for seed in args.seeds:
        for label in args.rows:
            if any(r["seed"] == seed for r in rows.get(label, [])):
                continue  # kept from an earlier run
            print(f"{label} seed {seed}", flush=True)
            task = ROWS[label].get("task", "dust3r")
            train_t, test_t = data[task]
            model, seconds = train_one({**ROWS[label], "dec_depth": args.dec_depth}, train_t, args, seed)
            result = {"seed": seed, **evaluate(model, test_t, args)}
            if task == "dust3r":
                result |= middlebury(model, pair, mean, std)
            result["train_s"] = seconds
            print(f"  {result}", flush=True)
            rows.setdefault(label, []).append(result)
            write(rows, floors_, args, meta)


if __name__ == "__main__":
    main()
