"""Modular-Cam (paper 43) at small scale: do camera-motion LoRAs steer a small video generator, and does the
conditioning branch join scenes?

Per seed, on ``camera_motion_videos`` (16 px, 8 frames; static, pans, zooms, tilts): (1) a ``flow_dit`` base
trains on single frames (class = the centre item's Fashion-MNIST class), saved as a checkpoint; (2) a
``modular_cam`` model loads it frozen and trains its zero-init motion modules on clips of every motion; (3) one
LoRA per motion trains on clips of that motion only (motion modules frozen); (4) the ControlNet-style branch trains
on clips conditioned on their own first frame. A tiny 3-D CNN trained here on real clips (the camera-motion
classifier) and the phase-correlation global motion (``modular_cam_parts.global_motion``) score generated clips;
two-scene scripts parsed by the rule-based director (it stands in for the paper's LLM) give the cross-scene SSIM
between scene 1's last and scene 2's first frame, with and without the conditioning branch.

    python benchmarks/modular_cam.py --threads 1 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from task_fit import cell, train, write_csv  # shared loop and table helpers (this directory is on sys.path)
from vitlab.bench import describe_machine
from vitlab.data.synthetic.camera_motion import generate_camera_motion_videos
from vitlab.engine.checkpoint import read_metadata, save_weights
from vitlab.tasks import create_task_model
from vitlab.tasks.generative.modular_cam_parts import global_motion

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MOTIONS = ("static", "pan_left", "pan_right", "zoom_in", "zoom_out", "tilt_up", "tilt_down")
LORAS = MOTIONS[1:]
SIGN = {"pan_left": ("pan_x", -1), "pan_right": ("pan_x", 1), "zoom_in": ("zoom", 1), "zoom_out": ("zoom", -1)}
DIT = {"embed_dim": 64, "depth": 4, "num_heads": 4}
SCRIPTS = ("zoom in on the bag, then pan left", "pan right over the sneaker, then zoom out",
           "tilt up on the dress, then pan right", "zoom out from the trouser, then tilt down")  # fmt: skip
COLUMNS = ["cls_acc", "pc_agree", "frame_ssim", "ssim", "flow_loss", "train_s"]


class Clips:
    """Normalised clip batches ``{"image": (B, T, 1, H, W), "identity"}`` (optionally frames only)."""

    def __init__(self, data, batch: int, seed: int, frames_only: bool = False) -> None:
        self.x = (data.clips.float() / 255 - data.mean[0]) / data.std[0]
        self.y, self.batch, self.seed, self.frames_only = data.identity, batch, seed, frames_only
        if frames_only:
            self.x, self.y = self.x.flatten(0, 1), self.y.repeat_interleave(data.num_frames)

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def iter_batches(self, epoch: int):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for i in range(len(self)):
            idx = order[i * self.batch : (i + 1) * self.batch]
            yield {"image": self.x[idx], "label" if self.frames_only else "identity": self.y[idx]}


class MotionCNN(nn.Module):
    """The camera-motion classifier: a tiny 3-D CNN on (B, T, 1, H, W) normalised clips."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, 16, 3, padding=1), nn.GELU(), nn.Conv3d(16, 32, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
            nn.Linear(64, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.transpose(1, 2))


def train_classifier(data, steps: int, seed: int) -> MotionCNN:
    torch.manual_seed(seed)
    net = MotionCNN(len(MOTIONS))
    x, y = Clips(data, 1, seed).x, data.motion
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def score_clips(clips: torch.Tensor, motion: str, classifier: MotionCNN, mean: float, std: float) -> dict:
    """Classifier accuracy (% predicted ``motion``), phase-correlation direction agreement (% right sign) and the
    SSIM of consecutive frames (temporal coherence)."""
    with torch.no_grad():
        acc = 100 * float((classifier(clips).argmax(1) == MOTIONS.index(motion)).float().mean())
    agree = None
    if motion in SIGN:
        key, sign = SIGN[motion]
        agree = 100 * sum(global_motion(c)[key] * sign > 0 for c in clips) / len(clips)
    frame = ssim(clips[:, :-1].flatten(0, 1), clips[:, 1:].flatten(0, 1), mean, std)
    return {"cls_acc": acc, "pc_agree": agree, "frame_ssim": frame}


def clip_loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """The held-out clip flow loss (eval mode: fixed times and noise)."""
    model.eval()
    with torch.no_grad():
        return float(model.loss(model(x, label=y), {})["loss"])


def ssim(a: torch.Tensor, b: torch.Tensor, mean: float, std: float) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

    a, b = ((t * std + mean).clamp(0, 1) for t in (a, b))
    return float(ssim_fn(a, b, data_range=1.0, kernel_size=7))


def run_seed(seed: int, args, train_set, test_set, classifier, rows: dict, strips: dict) -> None:
    torch.manual_seed(seed)
    mean, std = train_set.mean[0], train_set.std[0]
    t0 = time.perf_counter()
    ckpt = Path(args.cache) / f"modular_cam_base_s{seed}_{args.base_steps}.safetensors"
    if args.reuse_base and ckpt.exists():  # the same seed and steps: the same base (its time is in the metadata)
        secs = read_metadata(ckpt)["train_s"]
    else:
        base = create_task_model("flow_dit", img_size=16, backbone_kwargs=DIT)
        secs = train(base, None, 0, args.lr, args.batch * 8, seed, steps=args.base_steps,
                     loader=Clips(train_set, args.batch * 8, seed, frames_only=True))  # fmt: skip
        meta = {"model": "vit_micro_patch4_28", "task": "flow_dit", "num_classes": 10, "in_chans": 1, "img_size": 16,
                "backbone_args": DIT, "task_args": {}, "train_s": secs}  # fmt: skip
        save_weights(base, ckpt, meta)
    print(f"seed {seed}: base {secs:.0f}s", flush=True)
    model = create_task_model("modular_cam", img_size=16, num_frames=8, base_checkpoint=str(ckpt), motions=LORAS,
                              control=True, train="motion", backbone_kwargs=DIT)  # fmt: skip
    loader, held = Clips(train_set, args.batch, seed), Clips(test_set, 1, 0)
    hx, hy = held.x[: args.samples * 2], held.y[: args.samples * 2]
    rows.setdefault("clip flow loss: frozen base per frame (motion modules at zero init)", []).append(
        {"seed": seed, "flow_loss": clip_loss(model, hx, hy), "train_s": secs}
    )
    motion_s = train(model, None, 0, args.motion_lr, args.batch, seed, steps=args.motion_steps, loader=loader)
    secs += motion_s
    rows.setdefault("clip flow loss: + trained motion modules", []).append(
        {"seed": seed, "flow_loss": clip_loss(model, hx, hy), "train_s": motion_s}
    )
    print(f"seed {seed}: motion module {time.perf_counter() - t0:.0f}s", flush=True)
    lora_s = {}
    for m in LORAS:
        model.use_motion(m)
        model.set_train("lora")
        sub = train_set.subset((train_set.motion == MOTIONS.index(m)).nonzero()[:, 0])
        lora_s[m] = train(
            model, None, 0, args.lora_lr, args.batch, seed, steps=args.lora_steps, loader=Clips(sub, args.batch, seed)
        )
    model.use_motion(None)
    model.set_train("control")
    secs += train(model, None, 0, args.lr, args.batch, seed, steps=args.control_steps, loader=loader)
    print(f"seed {seed}: all trained {time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    n, g = args.samples, torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    plain = model.sample(n, labels, None, steps=args.ode_steps, generator=torch.Generator().manual_seed(seed))
    for m in LORAS:  # the same noise and labels with and without the motion's LoRA
        clips = model.sample(n, labels, m, steps=args.ode_steps, generator=torch.Generator().manual_seed(seed))
        rows.setdefault(f"LoRA {m}", []).append({"seed": seed, **score_clips(clips, m, classifier, mean, std),
                                                 "train_s": lora_s[m]})  # fmt: skip
        rows.setdefault(f"no LoRA, scored as {m}", []).append(
            {"seed": seed, **score_clips(plain, m, classifier, mean, std)}
        )
        strips.setdefault(m, clips[:3])
    strips.setdefault("no LoRA", plain[:3])
    classes = test_set.identity_classes
    for chain in (False, True):
        values = []
        for k, script in enumerate(SCRIPTS):
            _, scenes = model.generate(script, classes, n=args.samples // 2, steps=args.ode_steps, chain=chain,
                                       generator=torch.Generator().manual_seed(seed * 10 + k))  # fmt: skip
            values.append(ssim(scenes[0][:, -1], scenes[1][:, 0], mean, std))
            if k == 0:
                strips.setdefault(f"script {'chained' if chain else 'unchained'}", torch.cat(scenes, 1)[:2])
        label = "two-scene scripts, with conditioning branch" if chain else "two-scene scripts, no conditioning"
        rows.setdefault(label, []).append({"seed": seed, "ssim": sum(values) / len(values), "train_s": secs})
    print(f"seed {seed}: done {time.perf_counter() - t0:.0f}s", flush=True)


def read_csv(path: Path) -> dict[str, list[dict]]:
    """The per-seed rows of an existing table (``--keep``)."""
    rows: dict[str, list[dict]] = {}
    if path.exists():
        with open(path) as f:
            for r in csv.DictReader(f):
                seed = int(r["seed"]) if r["seed"].isdigit() else r["seed"]
                rows.setdefault(r["row"], []).append({"seed": seed, **{k: float(r[k]) for k in COLUMNS if r.get(k)}})
    return rows


def real_rows(test_set, classifier, rows: dict) -> None:
    x = Clips(test_set, 1, 0).x
    mean, std = test_set.mean[0], test_set.std[0]
    for m in LORAS:
        idx = (test_set.motion == MOTIONS.index(m)).nonzero()[:, 0]
        rows.setdefault(f"real test clips {m} (ceiling)", []).append(
            {"seed": "-", **score_clips(x[idx], m, classifier, mean, std)}
        )
    half = len(x) // 2  # continuity ceiling: consecutive real frames; floor: frames of unrelated clips
    rows["real: frame t -> t+1 of one clip (SSIM ceiling)"] = [{"seed": "-", "ssim": ssim(x[:, 3], x[:, 4], mean, std)}]
    rows["real: last frame -> first frame of another clip (SSIM floor)"] = [
        {"seed": "-", "ssim": ssim(x[:half, -1], x[half : 2 * half, 0], mean, std)}
    ]


def plot(strips: dict, args, mean: float, std: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, c) for k, v in strips.items() for c in v]
    cols = max(c.shape[0] for _, c in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.5 * cols + 1.5, 0.5 * len(rows) + 0.4), squeeze=False)
    for r, (name, clip) in enumerate(rows):
        for t in range(cols):
            ax = axes[r, t]
            ax.axis("off")
            if t < clip.shape[0]:
                ax.imshow((clip[t, 0] * std + mean).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].text(-2, 8, name, fontsize=5, ha="right", va="center")
    fig.suptitle("modular_cam samples (16 px; rows: LoRA / no LoRA clips, then 2-scene scripts, 16 frames)", fontsize=6)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(args.out / "modular_cam_samples.png", dpi=130)
    plt.close(fig)


def chart(rows: dict, args) -> None:
    """Bars: classifier accuracy and direction agreement per motion, LoRA vs no LoRA vs real; cross-scene SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(label: str, key: str) -> float:
        values = [r[key] for r in rows.get(label, []) if r.get(key) is not None]
        return sum(values) / len(values) if values else 0.0

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    x = torch.arange(len(LORAS)).float()
    for ax, key, title in ((axes[0], "cls_acc", "classifier accuracy %"), (axes[1], "pc_agree", "phase-corr. agree %")):
        for k, (fmt, name) in enumerate((("real test clips {} (ceiling)", "real"), ("LoRA {}", "LoRA"),
                                         ("no LoRA, scored as {}", "no LoRA"))):  # fmt: skip
            ax.bar(x + (k - 1) * 0.27, [mean(fmt.format(m), key) for m in LORAS], 0.27, label=name)
        ax.set_xticks(x, LORAS, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    labels = [k for k in rows if "SSIM" in k or "two-scene" in k]
    axes[2].barh(range(len(labels)), [mean(k, "ssim") for k in labels])
    axes[2].set_yticks(range(len(labels)), [k.replace(" (SSIM", "\n(SSIM") for k in labels], fontsize=6)
    axes[2].set_title("cross-scene SSIM (last -> first frame)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "modular_cam.png", dpi=110)
    plt.close(fig)


def write(rows: dict, args, classifier_acc: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "modular_cam.csv", rows, COLUMNS)
    seeds = sorted({r["seed"] for runs in rows.values() for r in runs if r["seed"] != "-"})
    machine = ", ".join(f"{k}={v}" for k, v in describe_machine().items())
    lines = [
        "# modular_cam (paper 43): camera-motion LoRAs and scene conditioning on a small video generator",
        "",
        f"Date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {args.threads} thread(s) "
        f"on a shared 2-core machine (timings are loaded-machine wall times). Command: `python benchmarks/"
        f"modular_cam.py {' '.join(sys.argv[1:])}`. Seeds {seeds}"
        + (" (one seed: no spread)" if len(seeds) == 1 else " (mean ± half the range)")
        + f". Machine: {machine}.",
        "",
        f"Data: `camera_motion_videos`, 16 px, 8 frames, motions {list(MOTIONS)}, {args.train_clips} train / "
        f"{args.test_clips} test clips. Base: `flow_dit` on `vit_micro_patch4_28` shrunk to {DIT} (patch 4), "
        f"{args.base_steps} steps of batch {8 * args.batch} single frames, then frozen. `modular_cam`: motion modules "
        f"{args.motion_steps} steps (lr {args.motion_lr}, batch {args.batch} clips, every motion), one rank-4 LoRA per "
        f"motion "
        f"{args.lora_steps} steps (lr {args.lora_lr}) on that motion's clips, the conditioning branch (copy of "
        f"block 0) "
        f"{args.control_steps} steps. Samples: Euler {args.ode_steps} steps, {args.samples} clips per row, the same "
        f"noise and labels for every LoRA row and the no-LoRA rows. cls acc = % of clips the camera-motion classifier "
        f"(tiny 3-D CNN trained here on real train clips, {classifier_acc:.1f}% on real test clips, 7 classes, chance "
        f"14%) assigns to the requested motion; pc agree = % of clips whose phase-correlation global motion has the "
        f"requested direction (pans: horizontal shift, zooms: divergence; '-' for tilts, which it does not see at 16 "
        f"px); ssim = SSIM(scene 1's last frame, scene 2's first frame) over {len(SCRIPTS)} two-scene scripts of "
        f"the rule-based director (it replaces the paper's LLM). train s: that part's training (LoRA rows) or the "
        f"whole "
        f"pipeline (script rows). Large-scale results (SD 1.5 + AnimateDiff, 256 px, LLM) are not reproduced.",
        "",
        "| row | cls acc % | pc agree % | frame t->t+1 SSIM | cross-scene SSIM | clip flow loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    digits = {"ssim": 3, "frame_ssim": 3, "flow_loss": 4, "train_s": 0}
    for label, runs in rows.items():
        cells = [cell([r.get(k) for r in runs], digits.get(k, 1)) for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    path = args.out / "modular_cam.md"
    text = path.read_text() if path.exists() else ""
    reading = text[text.find("\n## Reading") :] if "\n## Reading" in text else ""
    path.write_text("\n".join(lines) + "\n" + reading)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="if > 0: scale every stage's steps to this motion-step count")
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--motion-steps", type=int, default=600)
    ap.add_argument("--lora-steps", type=int, default=120)
    ap.add_argument("--control-steps", type=int, default=200)
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--motion-lr", type=float, default=2e-3)
    ap.add_argument("--ode-steps", type=int, default=16)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--train-clips", type=int, default=2100)
    ap.add_argument("--test-clips", type=int, default=350)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=tempfile.gettempdir(), help="where the base checkpoints go")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the existing CSV's rows of other seeds (add a seed)")
    ap.add_argument("--reuse-base", action="store_true", help="load a base of the same seed and steps from --cache")
    args = ap.parse_args()
    if args.steps:
        f = args.steps / args.motion_steps
        args.base_steps, args.lora_steps, args.control_steps = (
            max(1, round(s * f)) for s in (args.base_steps, args.lora_steps, args.control_steps)
        )
        args.motion_steps = args.steps
    torch.set_num_threads(args.threads)
    kw = {"frames": 8, "size": 16, "motions": MOTIONS}
    train_set = generate_camera_motion_videos("train", n=args.train_clips, seed=0, **kw)
    test_set = generate_camera_motion_videos("test", n=args.test_clips, seed=0, **kw)
    classifier = train_classifier(train_set, args.classifier_steps, 0)
    with torch.no_grad():
        acc = 100 * float((classifier(Clips(test_set, 1, 0).x).argmax(1) == test_set.motion).float().mean())
    print(f"classifier {acc:.1f}%", flush=True)
    rows: dict[str, list[dict]] = {}
    real_rows(test_set, classifier, rows)
    if args.keep:
        for label, runs in read_csv(args.out / "modular_cam.csv").items():
            if runs[0]["seed"] != "-":
                rows[label] = [r for r in runs if r["seed"] not in args.seeds]
    strips: dict[str, torch.Tensor] = {}
    for seed in args.seeds:
        run_seed(seed, args, train_set, test_set, classifier, rows, strips)
        write(rows, args, acc)
    if not args.keep:  # the sample picture shows the first seed of a fresh table
        plot(strips, args, train_set.mean[0], train_set.std[0])
    chart(rows, args)
    write(rows, args, acc)


if __name__ == "__main__":
    main()
