"""DUSt3R global alignment (paper 37; DUSt3R Sec. 3.4) on Render3D 4-view scenes: exact pairs + noise, a briefly
trained Dust3R's pairs, and the identity-pose floor.

Every test scene (``make_dataset('render3d', split='test', views=4, size=32)``) gives the 12 directed pairs of its 4
views. Rows:

- ``floor``: every camera at the origin with the identity pose (``init="identity"``, no iterations): each view's
  own-frame ground-truth pointmap stacked as if all cameras coincided; its focal error is that of one constant focal
  length (the test scenes' mean). ``dust3r_floor``: the same with the Dust3R's own-frame predictions (and the focal
  fitted on them): the floor the dust3r rows must beat. ``random_cameras``: Haar-random rotations and Gaussian
  centres (pose columns only): the centre error a guess gets after the similarity fit.
- ``gt_s{sigma}_{param}``: exact pairs (each in its first view's frame, times a random scale ``exp(N(0, 1))``) plus
  Gaussian noise of ``sigma`` times the pair's mean point distance on every coordinate, unit confidence; aligned
  with ``param`` = ``depth_pose`` or ``pointmaps`` (300 Adam steps), or ``mst`` (the spanning-tree initialisation
  alone, no iterations: what the optimisation adds over chaining a tree of pairs).
- ``gt_bad_edge_{equal,low}``: exact pairs but both directions of the pair {0, 1} corrupted (view 1's points turned
  30 deg about their centroid + 5% noise), with the same confidence as the others or 1e-3 (depth_pose).
- ``dust3r_{param}``: the pairs predicted by a small Dust3R (benchmarks/pointmaps.py's configuration) trained from
  scratch for ``--train-steps`` steps on 2-view Render3D pairs (or loaded with ``--checkpoint``), its confidences as
  weights; ``dust3r_noconf``: the same with unit confidences; ``dust3r_logconf``: with log-confidences (the
  model's ``1 + exp(c)`` is heavy-tailed); ``dust3r_mst``: the initialisation alone (all depth_pose but the
  ``pointmaps`` row).
- Focal errors of the ``mst`` rows are those of the initial fit on the own-frame pairs (exact pairs: 0).

Metrics (``global_align.alignment_errors``): relative rotation error (deg, mean over view pairs), camera-centre error
after the best similarity (divided by the mean distance of the true centres to their centroid: 1.0 = all centres at
one point), world pointmap error after the best similarity (divided by the mean distance of the true points to their
centroid), focal error (% , mean |f / f_true - 1|), and the alignment's wall time per scene.

    nice -n 10 .venv/bin/python benchmarks/global_align.py --threads 1 --scenes 10 --seeds 0 1

writes ``benchmarks/results/global_align.{csv,md}`` (per-scene rows in the CSV).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

from pointmaps import BACKBONE, ENCODER, build, load_pairs, train_one  # same model and recipe as pointmaps.py
from task_fit import cell
from vitlab.bench import describe_machine
from vitlab.data.synthetic import make_dataset
from vitlab.layers.camera import axis_angle_to_matrix, pose_from_rt, random_rotation
from vitlab.tasks.multiview.global_align import (
    alignment_errors,
    all_edges,
    global_align,
    pairs_from_world,
    predict_pairs,
)

COLUMNS = ["rot_err_deg", "centre_err", "pointmap_err", "focal_err_pct", "loss", "align_s"]
DIRECTED = [e for i, j in all_edges(4) for e in ((i, j), (j, i))]


def measure(pairs_or_fn, scene, **kw) -> dict[str, float]:
    start = time.perf_counter()
    result = pairs_or_fn(**kw) if callable(pairs_or_fn) else global_align(pairs_or_fn, **kw)
    seconds = time.perf_counter() - start
    err = alignment_errors(result, scene["pointmap"], scene["cam_to_world"], scene["valid"])
    err["focal_err_pct"] = 100 * float((result.focal / scene["K"][:, 0, 0] - 1).abs().mean())
    return {**err, "loss": result.loss, "align_s": seconds}


def random_cameras(scene, g: torch.Generator) -> dict[str, float]:
    """Pose errors of Haar-random rotations and Gaussian-random centres: what a guess scores after the similarity fit
    of 4 centres (the floor's 1.0 is an upper bound: 4 coinciding centres)."""
    c2w = pose_from_rt(random_rotation(4, g), torch.randn(4, 3, generator=g, dtype=torch.float64).float())
    fake = SimpleNamespace(cam_to_world=c2w, pointmaps=scene["pointmap"])
    err = alignment_errors(fake, scene["pointmap"], scene["cam_to_world"], scene["valid"])
    return {"rot_err_deg": err["rot_err_deg"], "centre_err": err["centre_err"]}


def noisy_pairs(scene, sigma: float, g: torch.Generator) -> dict:
    scales = torch.exp(torch.randn(len(DIRECTED), generator=g))
    pairs = pairs_from_world(scene["pointmap"], scene["cam_to_world"], scene["valid"], DIRECTED, scales)
    for pair in pairs.values():
        pts = pair["pointmap"]
        spread = pts[pair["valid"]].norm(dim=-1).mean()
        pair["pointmap"] = pts + sigma * spread * torch.randn(pts.shape, generator=g)
    return pairs


def bad_edge_pairs(scene, conf: float, g: torch.Generator) -> dict:
    pairs = noisy_pairs(scene, 0.0, g)
    R = axis_angle_to_matrix(torch.tensor([0.0, 30 * torch.pi / 180, 0.0]))
    for key in ((0, 1), (1, 0)):
        pts, valid = pairs[key]["pointmap"].clone(), pairs[key]["valid"]
        slot = 1 if key == (0, 1) else 0  # view 1's points
        centre = pts[slot][valid[slot]].mean(0)
        pts[slot] = (pts[slot] - centre) @ R.T + centre
        pts = pts + 0.05 * pts[valid].norm(dim=-1).mean() * torch.randn(pts.shape, generator=g)
        pairs[key] = {**pairs[key], "pointmap": pts, "confidence": torch.full(pts.shape[:3], conf)}
    return pairs


def get_model(args, seed: int):
    train, mean, std = load_pairs("train", args.n, args.size)
    recipe = SimpleNamespace(lr=1e-3, steps=args.train_steps, batch=16, size=args.size, views=2)
    if args.checkpoint:
        torch.manual_seed(seed)
        model = build({"dec_depth": 2}, recipe)
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
        return model.eval(), mean, std, 0.0
    model, seconds = train_one({"dec_depth": 2}, train, recipe, seed)
    if args.save_checkpoint:
        torch.save(model.state_dict(), f"{args.save_checkpoint}.seed{seed}.pt")
    return model, mean, std, seconds


def write(runs: list[dict], args, meta: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "global_align.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", "scene", *COLUMNS])
        for r in runs:
            w.writerow([r["row"], r["seed"], r["scene"], *(r.get(k) for k in COLUMNS)])
    labels = list(dict.fromkeys(r["row"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    lines = [
        "# DUSt3R global alignment (paper 37, DUSt3R Sec. 3.4) on Render3D 4-view scenes",
        "",
        f"Date {meta['date']}, torch {torch.__version__}. Command: `python benchmarks/global_align.py "
        f"{' '.join(sys.argv[1:])}`. Data: {args.scenes} Render3D test scenes (`make_dataset('render3d', "
        f"split='test', views=4, size={args.size})`: FoV 40-75 deg per view, views up to 60 deg of azimuth from "
        "view 1), all 12 directed pairs per scene. Alignment: `global_align` (Euclidean residuals weighted by "
        f"confidence, prod sigma_e = 1, maximum-spanning-tree init, Adam lr 0.01 cosine, {args.niter} iterations). "
        "Rows: see the script docstring (gt_s = exact pairs with random per-pair scales + Gaussian noise of s x the "
        "pair's mean point distance; mst = the spanning-tree initialisation alone; floor = all cameras at the origin). "
        f"Dust3R: `{BACKBONE}` {ENCODER} encoder, 2 x 2 cross-decoder blocks of width 64, linear heads, trained "
        f"{args.train_steps} steps (batch 16, AdamW 1e-3, from scratch, pointmaps.py's recipe) on {args.n} 2-view "
        f"train pairs; train s per seed: {meta['train_s']}. Seeds {seeds}: the pair scales and noise draws (gt rows) "
        "and the Dust3R initialisation and batch order (dust3r rows). Each cell: the mean over scenes, then mean ± half"
        " the range over seeds. Errors: rot = mean relative rotation error over the 6 view pairs (deg); centre = "
        "camera-centre error after the best similarity / mean distance of the true centres to their centroid; "
        "pointmap = world-point error after the best similarity / mean distance of the true points to their centroid;"
        " focal = mean |f / f_true - 1| (%). Align s: wall time of one scene's alignment, loaded shared CPU "
        f"({args.threads} thread). Machine: {machine}.",
        "",
        "| row | rot err ° | centre err | pointmap err | focal err % | final loss | align s / scene |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    digits = {"rot_err_deg": 2, "centre_err": 3, "pointmap_err": 3, "focal_err_pct": 2, "loss": 4, "align_s": 2}
    for label in labels:
        per_seed = {k: [] for k in COLUMNS}
        for seed in seeds:
            mine = [r for r in runs if r["row"] == label and r["seed"] == seed]
            for k in COLUMNS:
                if mine:
                    values = [r[k] for r in mine if r.get(k) is not None]
                    per_seed[k] += [statistics.fmean(values)] if values else []
        cells = " | ".join(cell(per_seed[k], digits[k]) for k in COLUMNS)
        lines.append(f"| {label} | {cells} |")
    path = args.out / "global_align.md"
    old = path.read_text() if path.exists() else ""
    reading = old[old.index("\n## Reading") :] if "\n## Reading" in old else ""
    path.write_text("\n".join(lines) + "\n" + reading)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--scenes", type=int, default=10)
    p.add_argument("--niter", type=int, default=300)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n", type=int, default=2000, help="2-view training pairs of the Dust3R")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--checkpoint", type=str, default="", help="a Dust3R state dict (pointmaps.py's configuration)")
    p.add_argument("--save-checkpoint", type=str, default="", help="prefix to save the trained Dust3R state dicts")
    p.add_argument("--no-dust3r", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = make_dataset("render3d", split="test", n=args.scenes, views=4, size=args.size)
    scenes = [data[i] for i in range(args.scenes)]
    mean_focal = data.K[: args.scenes, :, 0, 0].mean()  # the floor's focal: one constant (the test scenes' mean)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "train_s": []}
    runs: list[dict] = []

    def add(row: str, seed: int, i: int, values: dict) -> None:
        runs.append({"row": row, "seed": seed, "scene": i, **values})

    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        for i, scene in enumerate(scenes):
            floor = measure(noisy_pairs(scene, 0.0, g), scene, init="identity", niter=0)
            floor["focal_err_pct"] = 100 * float((mean_focal / scene["K"][:, 0, 0] - 1).abs().mean())
            add("floor", seed, i, floor)
            add("random_cameras", seed, i, random_cameras(scene, g))
            for sigma in args.noise:
                pairs = noisy_pairs(scene, sigma, g)
                add(f"gt_s{sigma:g}_mst", seed, i, measure(pairs, scene, niter=0))
                for param in ("depth_pose", "pointmaps"):
                    add(f"gt_s{sigma:g}_{param}", seed, i, measure(pairs, scene, parameterisation=param,
                                                                   niter=args.niter))  # fmt: skip
            for label, conf in (("equal", 1.0), ("low", 1e-3)):
                add(f"gt_bad_edge_{label}", seed, i, measure(bad_edge_pairs(scene, conf, g), scene, niter=args.niter))
            print(f"seed {seed} scene {i}: gt rows done", flush=True)
        write(runs, args, meta)
    if not args.no_dust3r:
        for seed in args.seeds:
            model, mean, std, seconds = get_model(args, seed)
            meta["train_s"].append(round(seconds))
            m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
            for i, scene in enumerate(scenes):
                images = (scene["views"].float() / 255 - m) / s
                pairs = predict_pairs(model, images)
                unit = {k: {**v, "confidence": torch.ones_like(v["confidence"])} for k, v in pairs.items()}
                add("dust3r_floor", seed, i, measure(pairs, scene, init="identity", niter=0))
                add("dust3r_mst", seed, i, measure(pairs, scene, niter=0))
                for param in ("depth_pose", "pointmaps"):
                    add(f"dust3r_{param}", seed, i, measure(pairs, scene, parameterisation=param, niter=args.niter))
                add("dust3r_noconf", seed, i, measure(unit, scene, niter=args.niter))
                logc = {k: {**v, "confidence": v["confidence"].log()} for k, v in pairs.items()}
                add("dust3r_logconf", seed, i, measure(logc, scene, niter=args.niter))
            print(f"seed {seed}: dust3r rows done", flush=True)
            write(runs, args, meta)


if __name__ == "__main__":
    main()
