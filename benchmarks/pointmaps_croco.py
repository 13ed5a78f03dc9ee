"""Feed-forward pointmaps (paper 37): is the relative pose learnt from the other view? CroCo pretraining vs scratch.

DUSt3R starts from CroCo's cross-view completion (``vitlab.tasks.multiview.croco``). Rows (dust3r, linear heads,
the sizes of ``pointmaps.py``): ``scratch`` / ``scratch_no_cross`` (trained from scratch with / without the
decoders' cross-attention), ``croco`` / ``croco_no_cross`` (the same fine-tuning, same steps, same seed, from the
encoder, ``embed``, decoders and norms of a CroCo-pretrained model; the ``no_cross`` one drops the pretrained
cross-attention), ``vggt`` / ``vggt_no_global`` (2 frames, camera head; global attention on / off).

Besides ``pointmaps.py``'s metrics, the rotation error is split. Render3D's cameras orbit a z-up scene, so the
relative rotation = the azimuth change (yaw of the optical axes about world z: only a cross-view match tells it; one
image at a time carries nothing about it) + the rest (each camera's pitch and roll: single-image cues). From each
predicted relative rotation (dust3r: Procrustes of view 2's pointmap, vggt: its camera head) and view 1's true
camera: the predicted azimuth change ``dpred`` vs the true ``dtrue``: ``az err`` = mean |dpred - dtrue| (floor:
mean |dtrue|, the "no azimuth change" guess), ``az corr`` = Pearson correlation of dpred and dtrue over the test
pairs and ``az slope`` = the least-squares slope of dpred on dtrue (0 for any estimate blind to the other view,
1 when learnt), ``rest err`` = the rotation error left once the azimuth error is undone.

CroCo diagnostic (per seed): the masked-patch loss (normalised pixels: predicting 0 scores about 1) on the test pairs
with their own reference view (``pre match``) and with the reference view of another test scene (``pre shuffled``):
a gap means the decoder reads the masked content from the other view (cross-view matching), not only from the
visible patches of its own view.

    nice -n 10 .venv/bin/python benchmarks/pointmaps_croco.py --threads 1 --seeds 0 --pre-steps 1500 --steps 600

writes ``benchmarks/results/pointmaps_croco.{csv,md,png}`` (``--name``) after every finished run.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from pointmaps import ENCODER, bar_panels, build, evaluate, floors, load_pairs, read_csv, single_view_floor, train_one
from task_fit import cell, warmup_cosine
from vitlab.bench import describe_machine
from vitlab.layers.camera import invert_pose, transform_points
from vitlab.layers.pos_embed import apply_rope
from vitlab.tasks.multiview.croco import CroCoPretrainer
from vitlab.tasks.multiview.geometry import rotation_angle_deg, umeyama
from vitlab.tasks.multiview.vggt import quaternion_to_matrix

ROWS = {"scratch": {}, "scratch_no_cross": {"cross_view": False}, "croco": {"croco": True},
        "croco_no_cross": {"cross_view": False, "croco": True}, "vggt": {"task": "vggt"},
        "vggt_no_global": {"task": "vggt", "global_attention": False}}  # fmt: skip
COLUMNS = ["pointmap_err", "depth_absrel", "rot_err_deg", "az_err_deg", "az_corr", "az_slope", "rest_err_deg",
           "pts_az_err_deg", "pts_az_slope", "pre_match", "pre_shuffled", "pre_s", "train_s"]  # fmt: skip


def _yaw(v: torch.Tensor) -> torch.Tensor:
    return torch.atan2(v[..., 1], v[..., 0])


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def azimuth_parts(R_pred: torch.Tensor, c2w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per pair: predicted and true azimuth change (rad) and the rotation error left once the azimuth error is undone.

    ``R_pred`` (B, 3, 3) the predicted rotation of camera 2 -> camera 1; ``c2w`` (B, 2, 4, 4) the true cameras.
    """
    c2w = c2w.double()
    R1, R2, Rp = c2w[:, 0, :3, :3], c2w[:, 1, :3, :3], R_pred.double()
    d_true = _wrap(_yaw(R2[..., 2]) - _yaw(R1[..., 2]))  # optical axes (third columns) in the world
    d_pred = _wrap(_yaw((R1 @ Rp)[..., 2]) - _yaw(R1[..., 2]))
    e = d_true - d_pred
    c, s, z, o = torch.cos(e), torch.sin(e), torch.zeros_like(e), torch.ones_like(e)
    Rz = torch.stack([c, -s, z, s, c, z, z, z, o], -1).view(-1, 3, 3)
    fixed = R1.transpose(-1, -2) @ Rz @ R1 @ Rp  # the prediction turned about world z by its azimuth error
    rest = rotation_angle_deg(fixed, R1.transpose(-1, -2) @ R2)
    return {"d_pred": d_pred, "d_true": d_true, "rest": rest}


@torch.no_grad()
def predicted_rotations(model, test: dict, head: bool = True) -> torch.Tensor:
    """camera 2 -> camera 1 rotations (N, 3, 3): dust3r by Procrustes of view 2's pointmap (as ``Dust3R.evaluate``),
    vggt its camera head (``head=False``: the same Procrustes on vggt's frame-2 pointmap, also in frame 1's frame)."""
    out = []
    for i in range(0, test["image"].shape[0], 50):
        batch = {k: v[i : i + 50] for k, v in test.items()}
        pred = model(batch["image"])
        if "pose" in pred and head:
            out.append(quaternion_to_matrix(pred["pose"][:, 1, 3:7].double()))
            continue
        c2w = batch["cam_to_world"].double()
        rel = invert_pose(c2w[:, 0]) @ c2w[:, 1]
        src = transform_points(invert_pose(rel)[:, None, None], batch["pointmap"][:, 1].double())
        w = batch["valid"][:, 1].flatten(1).double()
        out.append(umeyama(src.flatten(1, 2), pred["pointmap"][:, 1].flatten(1, 2), w)[1])
    return torch.cat(out)


def azimuth_metrics(R_pred: torch.Tensor, c2w: torch.Tensor) -> dict[str, float]:
    p = azimuth_parts(R_pred, c2w)
    dp, dt = p["d_pred"], p["d_true"]
    corr = torch.corrcoef(torch.stack([dp, dt]))[0, 1].item() if dp.std() > 1e-9 else 0.0
    slope = (((dp - dp.mean()) * (dt - dt.mean())).sum() / ((dt - dt.mean()) ** 2).sum()).item()
    return {"az_err_deg": math.degrees((dp - dt).abs().mean().item()), "az_corr": corr, "az_slope": slope,
            "rest_err_deg": p["rest"].mean().item()}  # fmt: skip


@torch.no_grad()
def attention_probe(model, test: dict) -> list[float]:
    """Per cross-attention block of view 2's decoder (queries: view 2's tokens, keys: view 1's): the mean horizontal
    offset (in tokens) between each query and the attention-weighted mean column of its keys, averaged over queries
    and heads, one number per pair; returns its Pearson correlation with the true azimuth change per block. No
    training: it asks whether the decoder's cross-view attention already follows the views' relative motion."""
    caught: list = []
    blocks = [blk.cross_attn for blk in model.decoders[1]]
    hooks = [m.register_forward_hook(lambda mod, a, out: caught.append((mod, a))) for m in blocks]
    shifts: list[list[torch.Tensor]] = [[] for _ in blocks]
    try:
        for i in range(0, test["image"].shape[0], 50):
            caught.clear()
            model.eval()(test["image"][i : i + 50])
            for b, (mod, (x, angles, ctx)) in enumerate(caught):
                B, N, D = x.shape
                h = mod.heads
                q = apply_rope(mod.q(x).view(B, N, h, D // h).transpose(1, 2), angles)
                k = apply_rope(mod.kv(ctx).view(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)[0], angles)
                attn = (q @ k.transpose(-1, -2) / math.sqrt(D // h)).softmax(-1)  # (B, h, N, N)
                col = (torch.arange(N) % math.isqrt(N)).float()
                shifts[b].append((attn @ col - col).mean((1, 2)))
    finally:
        for hook in hooks:
            hook.remove()
    d_true = azimuth_parts(torch.eye(3).expand(len(test["image"]), 3, 3), test["cam_to_world"])["d_true"]
    return [torch.corrcoef(torch.stack([torch.cat(s).double(), d_true]))[0, 1].item() for s in shifts]


def pretrain(train: dict, args, seed: int) -> tuple[dict, float]:
    """CroCo pretraining of a full dust3r model (cross-attention on) on the training images (no labels used)."""
    torch.manual_seed(seed)
    model = build({"dec_depth": args.dec_depth}, args)
    pre = CroCoPretrainer(model, args.mask_ratio).train()
    opt = torch.optim.AdamW(pre.parameters(), lr=args.pre_lr, weight_decay=0.05)
    sched = warmup_cosine(opt, args.pre_steps, max(1, args.pre_steps // 20))
    g = torch.Generator().manual_seed(1000 + seed)
    n = train["image"].shape[0]
    start = time.perf_counter()
    for step in range(args.pre_steps):
        idx = torch.randint(0, n, (args.pre_batch,), generator=g)
        loss = pre.loss(train["image"][idx], masked_view=step % 2, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pre.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, args.pre_steps // 10) == 0:
            print(f"  pretrain step {step} loss {loss.item():.4f}", flush=True)
    return {"state": model.state_dict(), "pre": pre}, time.perf_counter() - start


@torch.no_grad()
def completion_losses(pre: CroCoPretrainer, test: dict) -> dict[str, float]:
    """Masked-patch loss of view 2 on the test pairs: own view 1 vs another scene's view 1 (same masks)."""
    pre.eval()
    image = test["image"]
    shuffled = torch.stack([image[:, 0].roll(1, 0), image[:, 1]], 1)
    out = {}
    for key, views in (("pre_match", image), ("pre_shuffled", shuffled)):
        out[key] = pre.loss(views, masked_view=1, generator=torch.Generator().manual_seed(7))["loss"].item()
    return out


def write(rows: dict, floor: dict, args, meta: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {label: rows[label] for label in ROWS if label in rows}
    with open(args.out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", *COLUMNS])
        for name, values in floor.items():
            w.writerow([name, "", *(values.get(k) for k in COLUMNS)])
        for label, runs in rows.items():
            for r in runs:
                w.writerow([label, r["seed"], *(r.get(k) for k in COLUMNS)])
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    head = ("| row | n | pointmap err | depth AbsRel | rot err ° | az err ° | az corr | az slope | rest err ° "
            "| vggt pts az err ° | vggt pts az slope | pre match | pre shuffled | pretrain s | train s |")  # fmt: skip
    digits = {"pointmap_err": 3, "depth_absrel": 3, "az_corr": 2, "az_slope": 2, "pts_az_slope": 2, "pre_match": 3,
              "pre_shuffled": 3, "pre_s": 0, "train_s": 0}  # fmt: skip
    lines = [
        "# Feed-forward pointmaps (paper 37): is the azimuth change (cross-view pose) learnt? Scratch, CroCo, ablation",
        "",
        f"Date {meta['date']}, torch {torch.__version__}. Command: `python benchmarks/pointmaps_croco.py "
        f"{' '.join(sys.argv[1:])}`. Data: Render3D (`make_dataset('render3d', size={args.size}, "
        f"spread={args.spread:g}, fov={tuple(args.fov)}"
        + (", shared_orbit=True" if args.shared_orbit else "")
        + (", pan=True" if args.pan else "")
        + f")`: views within ±{args.spread:g} deg of azimuth of view 1, "
        f"FoV {args.fov[0]:g}-{args.fov[1]:g} deg), "
        f"{args.n} training / {args.test_n} test pairs. Models: `pointmaps.py`'s (encoder `vit_micro_patch4_28` "
        f"{ENCODER}; dust3r 2 x {args.dec_depth} decoder blocks of width 64, linear heads; vggt 2 frames, "
        f"{args.dec_depth} frame/global pairs, camera weight {args.camera_weight:g}). Parameters (M): "
        f"{meta['params']}. Fine-tuning: {args.steps} steps, batch {args.batch}, AdamW lr {args.lr} (wd 0.05, warmup "
        f"5% + cosine, clip 1), for every row. CroCo pretraining (croco rows): {args.pre_steps} steps, batch "
        f"{args.pre_batch}, AdamW lr {args.pre_lr} (same schedule), mask ratio {args.mask_ratio}, the masked view "
        "alternating (view 2 / view 1) step by step, on the training images only (no labels). Same seed = same "
        f"heads' initialisation and batch order in every row. Seeds {seeds} (mean ± half the range where n > 1). "
        "Columns: module docstring of the script (az: the azimuth change, which only a cross-view match can tell; "
        "rest: the rotation error left once the azimuth error is undone). Train s / pretrain s: loaded-machine wall "
        f"times ({args.threads} thread, 2 cores shared with other agents' jobs). Machine: {machine}."
        + (f" Runs kept from an earlier run (`--keep`): {', '.join(meta['kept'])}." if meta.get("kept") else ""),
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in floor.items():
        cells = [cell([values.get(k)], digits.get(k, 1)) for k in COLUMNS]
        lines.append(f"| {name} | - | " + " | ".join(cells) + " |")
    for label, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], digits.get(k, 1)) for k in COLUMNS]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    path = args.out / f"{args.name}.md"
    old = path.read_text() if path.exists() else ""
    reading = old[old.index("\n## Reading") :] if "\n## Reading" in old else ""
    path.write_text("\n".join(lines) + "\n" + reading)
    plot(rows, floor, args.out / f"{args.name}.png")


def plot(rows: dict, floor: dict, path: Path) -> None:
    panels = [("rot_err_deg", "rotation err (deg)"), ("az_err_deg", "azimuth-change err (deg)"),
              ("az_slope", "azimuth slope (1 = learnt)"), ("depth_absrel", "depth AbsRel")]  # fmt: skip

    def floor_lines(key: str) -> list[tuple[float, str]]:
        return [(values[key], name[:28]) for name, values in floor.items() if values.get(key) is not None]

    bar_panels(rows, panels, floor_lines, path)


def _cache_name(args, seed: int) -> str:
    return (
        f"croco_s{seed}_p{args.pre_steps}_b{args.pre_batch}_lr{args.pre_lr:g}_m{args.mask_ratio:g}_sp{args.spread:g}"
        f"_fov{args.fov[0]:g}-{args.fov[1]:g}_o{int(args.shared_orbit)}{'_pan' if args.pan else ''}_n{args.n}"
        f"_d{args.dec_depth}.pt"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--spread", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pre-steps", type=int, default=1500)
    p.add_argument("--pre-batch", type=int, default=32)
    p.add_argument("--pre-lr", type=float, default=1e-3)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--fov", type=float, nargs=2, default=[40.0, 75.0], help="Render3D's field-of-view range (deg)")
    p.add_argument("--shared-orbit", action="store_true", help="Render3D's pure-orbit regime (azimuth change only)")
    p.add_argument("--pan", action="store_true", help="Render3D's panning regime (one eye, azimuth change only)")
    p.add_argument("--pre-dir", type=Path, default=Path("/tmp/pointmaps_croco"), help="cache of pretrained states")
    p.add_argument("--dec-depth", type=int, default=2)
    p.add_argument("--camera-weight", type=float, default=10.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="pointmaps_croco")
    p.add_argument("--probe", action="store_true", help="only the attention probe of the cached pretrained states")
    p.add_argument("--keep", action="store_true", help="keep the runs already in the CSV (same settings)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    args.views = 2  # vggt rows: 2 frames, like the pairs
    torch.set_num_threads(args.threads)
    fov = tuple(args.fov)
    render = {k: True for k in ("shared_orbit", "pan") if getattr(args, k)}  # left out by default: the usual cache key
    train, mean, std = load_pairs("train", args.n, args.size, spread=args.spread, fov=fov, **render)
    test, _, _ = load_pairs("test", args.test_n, args.size, (mean, std), spread=args.spread, fov=fov, **render)
    c2w = test["cam_to_world"]
    no_rot = azimuth_metrics(torch.eye(3, dtype=torch.float64).expand(len(c2w), 3, 3), c2w)
    identity = floors(test, None)
    floor = {
        "floor: no rotation": {"rot_err_deg": identity["rot_err_deg"], "depth_absrel": identity["depth_absrel"],
                               **no_rot},
        "floor: single-view (pitch, roll exact; no azimuth change)": {
            "rot_err_deg": single_view_floor(test)["rot_err_deg"], "az_err_deg": no_rot["az_err_deg"],
            "az_corr": 0.0, "az_slope": 0.0, "rest_err_deg": 0.0},
    }  # fmt: skip
    if args.probe:  # the cross-attention probe of the cached pretrained states vs a fresh initialisation
        for seed in args.seeds:
            torch.manual_seed(seed)
            fresh = build({"dec_depth": args.dec_depth}, args)
            print(f"seed {seed} random init: attention/azimuth corr per block {attention_probe(fresh, test)}")
            cache = args.pre_dir / _cache_name(args, seed)
            if cache.exists():
                fresh.load_state_dict(torch.load(cache, weights_only=True)["state"])
                print(f"seed {seed} CroCo-pretrained: attention/azimuth corr per block {attention_probe(fresh, test)}")
        return
    rows = read_csv(args.out / f"{args.name}.csv", COLUMNS) if args.keep else {}
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "params": {}}
    meta["kept"] = sorted(f"{label} seed {r['seed']}" for label, runs in rows.items() for r in runs)
    for task in ("dust3r", "vggt"):
        model = build({"task": task, "dec_depth": args.dec_depth}, args)
        meta["params"][task] = round(sum(q.numel() for q in model.parameters()) / 1e6, 3)
    for seed in args.seeds:
        init = None
        for label in args.rows:
            if any(r["seed"] == seed for r in rows.get(label, [])):
                continue
            kw = dict(ROWS[label])
            result: dict = {"seed": seed}
            state = None
            if kw.pop("croco", False):
                cache = args.pre_dir / _cache_name(args, seed)
                if init is None and cache.exists():
                    init = torch.load(cache, weights_only=True)
                    print(f"croco pretraining seed {seed}: loaded {cache}", flush=True)
                elif init is None:
                    print(f"croco pretraining seed {seed}", flush=True)
                    init, pre_s = pretrain(train, args, seed)
                    init["diag"] = completion_losses(init.pop("pre"), test) | {"pre_s": pre_s}
                    print(f"  {init['diag']}", flush=True)
                    args.pre_dir.mkdir(parents=True, exist_ok=True)
                    torch.save(init, cache)
                result |= init["diag"]
                state = init["state"]
            print(f"{label} seed {seed}", flush=True)
            model, seconds = train_one({**kw, "dec_depth": args.dec_depth}, train, args, seed, state)
            result |= evaluate(model, test, args) | azimuth_metrics(predicted_rotations(model, test), c2w)
            if kw.get("task") == "vggt":  # its pointmap head may place frame 2 where its camera head does not
                pts = azimuth_metrics(predicted_rotations(model, test, head=False), c2w)
                result |= {"pts_az_err_deg": pts["az_err_deg"], "pts_az_slope": pts["az_slope"]}
            result["train_s"] = seconds
            print(f"  {result}", flush=True)
            rows.setdefault(label, []).append(result)
            write(rows, floor, args, meta)
    write(rows, floor, args, meta)  # also when every run was kept (CSVs of parallel processes merged by hand)


if __name__ == "__main__":
    main()
