"""``vitlab split``: ED-ViT (arXiv:2410.11650) class-wise splitting of a trained run into a split directory.

Recipe (reconstruction; no official code, choices marked in ``compress/split.py``): partition the classes; per part,
copy the host with its subset's classifier rows, prune heads / MLP channels by Taylor importance on the part's own
classes (``importance="all"``: importance of the whole host on all classes, the uniform-pruning ablation), then
distil it from the host on its own classes' images (``distill_on="own"``; soft KD to the host's logits restricted to
the subset, tau^2-scaled KL); last, train the fusion head on the frozen parts' concatenated logits over all classes.
The host's logits are computed once and reused by every part (the host is frozen).

A split directory holds ``part{i}.safetensors`` (ordinary vitlab checkpoints: ``vitlab eval`` reloads each as a
classifier of its subset, surgery included), ``fusion.safetensors`` and ``manifest.json`` (the classes of each part,
the placement, the recipe and scores). Every file is written atomically and the manifest last, so a directory with
a manifest is complete.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compress import surgery_of
from ..compress.split import (
    FusionHead,
    SplitModel,
    check_fractions,
    check_partition,
    classifier_of,
    greedy_placement,
    make_submodel,
    param_bytes,
    param_count,
    partition_classes,
    prune_part,
    remap_labels,
)
from ..errors import CheckpointError
from .checkpoint import atomic_write, load_weights, save_weights
from .config import RunConfig, load_config
from .distill import distillation_loss
from .inference import load_trained
from .setup import build_datasets, build_loader

__all__ = [
    "MANIFEST",
    "build_split",
    "evaluate_split",
    "load_data",
    "load_fusion",
    "load_host",
    "load_part",
    "load_split",
    "predict_logits",
    "read_manifest",
    "save_split",
    "split_run",
]

MANIFEST = "manifest.json"
FORMAT = "vitlab-split"
Log = Callable[[str], None]


def load_host(source: str | Path) -> tuple[nn.Module, dict[str, Any], Path | None]:
    """The trained classifier to split (eval mode, CPU); a task model or a non-vitlab file is a one-line error."""
    model, meta, run = load_trained(source)
    if meta.get("task"):
        raise ValueError(f"{str(source)!r} is a {meta['task']!r} task model; ED-ViT splits classifiers")
    if not meta.get("classes"):
        raise CheckpointError(f"{str(source)!r} has no class names in its metadata; it was not written by vitlab train")
    return model, meta, run


def load_data(
    meta: dict[str, Any],
    run: Path | None,
    split: str,
    subset: int = 0,
    seed: int = 0,
    dataset: str | None = None,
    data_dir: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images (n, C, H, W) and labels of the run's data set (or ``dataset``), as the host sees them."""
    cfg = load_config(run / "config.json") if run is not None and (run / "config.json").is_file() else RunConfig()
    cfg.data.dataset = dataset or cfg.data.dataset
    cfg.data.data_dir = data_dir or cfg.data.data_dir
    cfg.data.train_subset = cfg.data.test_subset = subset
    cfg.model.img_size, cfg.seed, cfg.data.batch_size = meta["img_size"], seed, 512
    ds = build_datasets(cfg, splits=(split,))[split]
    if len(ds.classes) != meta["num_classes"]:
        raise ValueError(f"the data set has {len(ds.classes)} classes but the host predicts {meta['num_classes']}")
    xs, ys = zip(*build_loader(ds, cfg, train=False, in_chans=meta["in_chans"]).iter_epoch(0), strict=True)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model``'s outputs on ``x`` in eval mode, batch by batch."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": x[i : i + batch_size], "label": y[i : i + batch_size]} for i in range(0, len(x), batch_size)][
        :n_batches
    ]


def _distil(
    part: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    epochs: float,
    lr: float,
    batch_size: int,
    tau: float,
    seed: int,
) -> float:
    """Soft KD of ``part`` to ``target`` logits for ``epochs`` passes (AdamW, warm-up + cosine); the last loss."""
    steps = max(1, math.ceil(epochs * len(x) / batch_size)) if epochs > 0 else 0
    if steps == 0:
        return float("nan")
    opt = torch.optim.AdamW(part.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed)
    order, pos, loss = torch.randperm(len(x), generator=g), 0, torch.tensor(float("nan"))
    part.train()
    for _ in range(steps):
        if pos + batch_size > len(x) and pos > 0:
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = distillation_loss(part(x[idx]), target[idx], "soft", tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(part.parameters(), 1.0)
        opt.step()
        sched.step()
    part.eval()
    return float(loss.detach())


def _train_fusion(fusion: FusionHead, z: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Cross-entropy on the frozen parts' concatenated logits ``z`` (only the fusion MLP learns)."""
    opt = torch.optim.AdamW(fusion.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    fusion.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(z), generator=g).split(256):
            loss = F.cross_entropy(fusion(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    fusion.eval()


def _check_choices(**values: str) -> None:
    """Each keyword must be ``"own"`` or ``"all"``; the error names the command-line flag."""
    for flag, value in values.items():
        if value not in ("own", "all"):
            raise ValueError(f"--{flag.replace('_', '-')} must be one of ('own', 'all'), got {value!r}")


def build_split(
    host: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    parts: int | list[list[int]],
    *,
    heads: float = 0.0,
    mlp: float = 0.0,
    importance: str = "own",
    criterion: str = "taylor",
    distill_epochs: float = 1.0,
    distill_on: str = "own",
    lr: float = 5e-4,
    tau: float = 1.0,
    batch_size: int = 64,
    importance_batches: int = 16,
    fusion_epochs: int = 10,
    fusion_hidden: int = 64,
    teacher_logits: torch.Tensor | None = None,
    seed: int = 0,
    log: Log | None = None,
) -> tuple[SplitModel, list[dict[str, Any]]]:
    """Split ``host`` into class-specialised parts (pruned, distilled) plus a trained fusion head.

    Args:
        x, y: normalised training images and labels (``load_data``); the host's logits on them are computed once
            unless given as ``teacher_logits``.
        parts: the number of parts (contiguous balanced class subsets) or the class subsets themselves.
        heads, mlp: fractions of attention heads / MLP channels removed from every block of every part.
        importance: ``"own"`` (ED-ViT's class-wise importance, on the part's classes) or ``"all"`` (the host's
            importance on all classes, the same for every part: the uniform-pruning ablation).
        distill_on: ``"own"`` (the part's classes' images, the paper's) or ``"all"`` (every image).
    Returns:
        The split (eval mode) and one report per part (classes, params, pruning report, last distillation loss).
    """
    say = log or (lambda _msg: None)
    num_classes = classifier_of(host)[1].out_features
    part_classes = partition_classes(num_classes, parts) if isinstance(parts, int) else [list(c) for c in parts]
    check_partition(part_classes, num_classes)
    check_fractions(heads, mlp)
    _check_choices(importance=importance, distill_on=distill_on)
    host.eval()
    torch.manual_seed(seed)
    teacher = predict_logits(host, x) if teacher_logits is None else teacher_logits
    shared = None
    if importance == "all" and (heads or mlp):
        from ..compress import structured

        probe = make_submodel(host, list(range(num_classes)))  # importance passes must not touch the host
        shared = structured.importance(probe, _batches(x, y, batch_size, importance_batches), criterion=criterion)
    models, reports = [], []
    for i, classes in enumerate(part_classes):
        t0 = time.perf_counter()
        own = torch.isin(y, torch.tensor(classes))
        part = make_submodel(host, classes)
        probe_x, probe_y = x[own], remap_labels(y[own], classes)
        prune = prune_part(
            part,
            heads,
            mlp,
            batches=_batches(probe_x, probe_y, batch_size, importance_batches) if shared is None else None,
            criterion=criterion,
            scores=shared,
        )
        dx, dt = (x[own], teacher[own]) if distill_on == "own" else (x, teacher)
        loss = _distil(part, dx, dt[:, classes], distill_epochs, lr, batch_size, tau, seed + i)
        models.append(part)
        reports.append(
            {"part": i, "classes": classes, "params": param_count(part), "bytes": param_bytes(part), "prune": prune}
            | {"distill_loss": round(loss, 5), "seconds": round(time.perf_counter() - t0, 1)}
        )
        say(f"part {i} classes {classes}: {param_count(part) / 1e6:.3f} M params, distillation loss {loss:.4f}")
    fusion = FusionHead(part_classes, num_classes, hidden=fusion_hidden)
    split = SplitModel(models, fusion).eval()
    if fusion_epochs > 0:
        with torch.no_grad():
            z = torch.cat([predict_logits(p, x) for p in models], dim=1)
        _train_fusion(fusion, z, y, fusion_epochs, seed)
    return split.eval(), reports


@torch.no_grad()
def evaluate_split(split: SplitModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Top-1 (%) with the fusion MLP and with arg-max over the parts (the ablation)."""
    z = torch.cat([predict_logits(p, x, batch_size) for p in split.parts], dim=1)
    return {
        mode_key: round(100.0 * float((split.fusion(z, mode=mode).argmax(1) == y).float().mean()), 3)
        for mode_key, mode in (("top1", "mlp"), ("top1_argmax", "argmax"))
    }


def save_split(
    split: SplitModel,
    out: str | Path,
    host_meta: dict[str, Any],
    *,
    placement: list[int] | None = None,
    budgets: list[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the parts, the fusion head and (last) the manifest into ``out``; returns the manifest path."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ValueError(f"--out {str(out)!r} exists and is not a split directory; choose a new directory")
    names = host_meta["classes"]
    placement = list(range(len(split.parts))) if placement is None else list(placement)
    entries = []
    for i, (part, classes) in enumerate(zip(split.parts, split.part_classes, strict=True)):
        meta = {**host_meta, "num_classes": len(classes), "classes": [names[c] for c in classes]}
        meta |= {"surgery": surgery_of(part), "split": {"part": i, "parts": len(split.parts), "host_classes": classes}}
        save_weights(part, out / f"part{i}.safetensors", meta)
        entries.append(
            {"file": f"part{i}.safetensors", "classes": classes, "class_names": meta["classes"]}
            | {"params": param_count(part), "bytes": param_bytes(part), "device": placement[i]}
        )
    hidden = split.fusion.mlp[1].out_features
    fusion_meta = {"split_fusion": {"hidden": hidden, "part_classes": split.part_classes}}
    save_weights(split.fusion, out / "fusion.safetensors", fusion_meta)
    keep = ("model", "num_classes", "classes", "in_chans", "img_size", "mean", "std")
    manifest = {
        "format": FORMAT,
        "version": 1,
        "host": {k: host_meta[k] for k in keep if k in host_meta},
        "parts": entries,
        "fusion": {"file": "fusion.safetensors", "hidden": hidden, "params": param_count(split.fusion)},
        "placement": {"budgets": budgets, "devices": placement},
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=2)
    return atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of split directory ``path``; anything else is a one-line ``CheckpointError``."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{str(path)!r} is not a split directory (no {MANIFEST}); make one with `vitlab split`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path / MANIFEST)!r} is not valid JSON ({e.msg})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(path / MANIFEST)!r} is not a vitlab split manifest")
    return manifest


def load_part(path: str | Path, manifest: dict[str, Any], i: int) -> nn.Module:
    """Part ``i`` of a split directory, rebuilt with its surgery (eval, CPU)."""
    return load_trained(Path(path) / manifest["parts"][i]["file"])[0]


def load_fusion(path: str | Path, manifest: dict[str, Any]) -> FusionHead:
    """The fusion head of a split directory (eval)."""
    part_classes = [p["classes"] for p in manifest["parts"]]
    fusion = FusionHead(part_classes, manifest["host"]["num_classes"], hidden=manifest["fusion"]["hidden"])
    load_weights(fusion, Path(path) / manifest["fusion"]["file"])
    return fusion.eval()


def load_split(path: str | Path) -> tuple[SplitModel, dict[str, Any]]:
    """The whole split of a split directory in this process (eval, CPU) and its manifest."""
    manifest = read_manifest(path)
    parts = [load_part(path, manifest, i) for i in range(len(manifest["parts"]))]
    return SplitModel(parts, load_fusion(path, manifest)).eval(), manifest


def split_run(
    source: str | Path,
    parts: int,
    out: str | Path,
    *,
    budgets: list[float] | None = None,
    train_subset: int = 0,
    test_subset: int = 0,
    seed: int = 0,
    dataset: str | None = None,
    data_dir: str | None = None,
    log: Log | None = print,
    **recipe: Any,
) -> dict[str, Any]:
    """Load run ``source``, split it into ``parts`` (``recipe``: ``build_split``'s keywords), score it on the test
    set, place it under ``budgets`` (bytes per device; None: one device per part) and save it to ``out``.
    ``dataset`` / ``data_dir`` override the run's data (``load_data``).

    Returns the manifest (scores of the host and the split included).
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"--parts must be an integer >= 1, got {parts!r}")
    host, meta, run = load_host(source)
    partition_classes(meta["num_classes"], parts)  # N > classes, bad fractions: fail before loading any data
    check_fractions(recipe.get("heads", 0.0), recipe.get("mlp", 0.0))
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ValueError(f"--out {str(out)!r} exists and is not a split directory; choose a new directory")
    x, y = load_data(meta, run, "train", train_subset, seed, dataset, data_dir)
    split, reports = build_split(host, x, y, parts, seed=seed, log=log, **recipe)
    placement = greedy_placement([r["bytes"] for r in reports], budgets) if budgets else None
    tx, ty = load_data(meta, run, "test", test_subset, seed, dataset, data_dir)
    host_top1 = round(100.0 * float((predict_logits(host, tx).argmax(1) == ty).float().mean()), 3)
    scores = {"host_top1": host_top1, **evaluate_split(split, tx, ty), "test_images": len(ty)}
    extra = {
        "source": str(source),
        "recipe": {"train_subset": train_subset, "seed": seed, **recipe},
        "scores": scores,
        "host_params": param_count(host),
        "part_reports": reports,
    }
    path = save_split(split, out, meta, placement=placement, budgets=budgets, extra=extra)
    return json.loads(path.read_text())
