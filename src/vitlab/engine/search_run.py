"""``vitlab search``: ViT-ResNAS end to end (arXiv:2109.00642): train a weight-sharing supernet with
multi-architecture sampling, run the evolutionary search under a MAC budget on a held-out split of the training
images, export the searched network as an official-style ``network_def`` (``create_model(..., network_def=...)``
rebuilds it), and retrain it from scratch.

The recipe is deliberately small for CPUs (subsets, a few epochs, AdamW with cosine decay, no augmentation); the
paper trains the supernet 120 epochs on ImageNet and retrains 300. The Fashion-MNIST space ``"nano"`` is the
search space of ``benchmarks/vit_resnas.py``; its largest network is ``vit_resnas_nano_28``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import load_fashion_mnist
from ..models.vit_resnas import ViTResNAS, to_network_def
from ..search import Arch, EvolutionConfig, SearchSpace, StageSpace, Supernet, evolutionary_search
from .checkpoint import save_weights

__all__ = [
    "SPACES",
    "SearchRunConfig",
    "add_search_parser",
    "evaluate",
    "export_config",
    "load_split",
    "run_search",
    "sample_near",
    "train_model",
]

SPACES = {
    "nano": SearchSpace(
        (
            StageSpace(
                embed=(64, 56, 48, 40, 32), heads=(2, 1), mlp=(128, 96, 64), head_dim=32, depth=2, skippable=(1,)
            ),
            StageSpace(
                embed=(128, 112, 96, 80, 64), heads=(4, 3, 2), mlp=(256, 192, 128), head_dim=32, depth=2, skippable=(1,)
            ),
            StageSpace(
                embed=(256, 224, 192, 160, 128),
                heads=(8, 6, 4),
                mlp=(512, 384, 256),
                head_dim=32,
                depth=2,
                skippable=(1,),
            ),
        ),
        patch_size=4,
        stem_chans=16,
        img_size=28,
        in_chans=1,
        num_classes=10,
    ),
}


@dataclass
class SearchRunConfig:
    """What ``run_search`` does; sizes are images, ``budget_mmacs`` is millions of MACs per image."""

    space: str = "nano"
    budget_mmacs: float = 10.0
    train_subset: int = 10000
    val_subset: int = 2000
    test_subset: int = 10000
    epochs: int = 3
    warmup_epochs: int = 1
    batch_size: int = 128
    example_per_arch: int = 32
    lr: float = 2e-3
    retrain_epochs: int = 3
    evolution: EvolutionConfig = field(default_factory=lambda: EvolutionConfig(40, 6, 10, 10, 10, 0.3, 0))
    reduction: str = "residual"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"unknown search space {self.space!r}; expected one of {sorted(SPACES)}")
        if self.batch_size % self.example_per_arch:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of example_per_arch {self.example_per_arch}"
            )
        for name in ("train_subset", "val_subset", "test_subset", "epochs", "batch_size", "example_per_arch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_mmacs <= 0:
            raise ValueError(f"budget_mmacs must be > 0, got {self.budget_mmacs}")


Split = tuple[torch.Tensor, torch.Tensor]


def load_split(train_subset: int, val_subset: int, test_subset: int, seed: int = 0) -> tuple[Split, Split, Split]:
    """Normalised Fashion-MNIST: a training subset, a disjoint held-out subset of the training split, the test set."""
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    if train_subset + val_subset > len(train.targets):
        raise ValueError(f"train_subset + val_subset = {train_subset + val_subset} > {len(train.targets)} images")
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(seed))
    mean, std = train.mean[0], train.std[0]

    def norm(ds: Any, idx: torch.Tensor) -> Split:
        return (ds.images[idx].float() / 255 - mean) / std, ds.targets[idx]

    test_idx = torch.arange(min(test_subset, len(test.targets)))
    return (
        norm(train, order[:train_subset]),
        norm(train, order[train_subset : train_subset + val_subset]),
        norm(test, test_idx),
    )


def _batches(data: Split, batch_size: int, gen: torch.Generator | None) -> Any:
    x, y = data
    order = torch.randperm(len(y), generator=gen) if gen is not None else torch.arange(len(y))
    stop = len(y) - len(y) % batch_size if gen is not None else len(y)  # training: whole batches only
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def _fit(
    params: Any,
    step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    data: Split,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    total = epochs * (len(data[1]) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / max(total, 1), 1))))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        t0, losses = time.time(), []
        for x, y in _batches(data, batch_size, gen):
            loss = step(x, y, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {sum(losses) / max(len(losses), 1):.4f} ({time.time() - t0:.0f}s)")


def train_model(
    model: nn.Module,
    data: Split,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Train a standalone classifier with the short recipe (AdamW, cosine, cross-entropy)."""
    torch.manual_seed(seed)
    model.train()
    _fit(model.parameters(), lambda x, y, _e: F.cross_entropy(model(x), y), data, epochs, batch_size, lr, seed, log)
    return model.eval()


def train_supernet(supernet: Supernet, data: Split, cfg: SearchRunConfig, log: Callable[[str], None] | None = None):
    """Multi-architecture training: each step samples ``batch_size / example_per_arch`` sub-networks."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    n = cfg.batch_size // cfg.example_per_arch
    supernet.train()

    def step(x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        unlocked = min(1.0, (epoch + 1) / (cfg.warmup_epochs + 1)) if cfg.warmup_epochs else 1.0
        archs = [supernet.space.sample(rng, unlocked) for _ in range(n)]
        return F.cross_entropy(supernet(x, archs), y)

    _fit(supernet.parameters(), step, data, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, log)
    return supernet.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data``."""
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in _batches(data, batch_size, None))
    return 100.0 * correct / len(data[1])


def sample_near(space: SearchSpace, macs: int, rel_tol: float, rng: random.Random, tries: int = 20000) -> Arch:
    """A random architecture of the space whose MACs are within ``rel_tol`` of ``macs`` (rejection sampling)."""
    for _ in range(tries):
        arch = space.sample(rng)
        if abs(space.macs(arch) - macs) <= rel_tol * macs:
            return arch
    raise ValueError(f"no architecture within {rel_tol:.1%} of {macs} MACs in {tries} random draws")


def export_config(space: SearchSpace, arch: Arch, reduction: str = "residual") -> dict[str, Any]:
    """The searched network as ``create_model`` keywords (``vit_resnas_nano_28`` with its ``network_def``)."""
    spec = space.to_spec(arch)
    return {
        "model": "vit_resnas_nano_28",
        "model_args": {
            "network_def": to_network_def(spec, space.num_classes),
            "patch_size": spec.patch_size,
            "stem_chans": spec.stem_chans,
            "reduction": reduction,
        },
        "macs": space.macs(arch),
        "arch": asdict(arch),
    }


def save_model(model: nn.Module, path: Path, config: dict[str, Any], top1: float) -> Path:
    meta = {
        "model": config["model"],
        "model_args": config["model_args"],
        "num_classes": 10,
        "in_chans": 1,
        "img_size": 28,
        "top1": top1,
        "surgery": [],
    }
    return save_weights(model, path, meta)


def run_search(cfg: SearchRunConfig, out: str | Path, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Supernet training, evolutionary search, export and retraining; writes ``out/search.json`` and the weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    space = SPACES[cfg.space]
    budget = int(cfg.budget_mmacs * 1e6)
    train, val, test = load_split(cfg.train_subset, cfg.val_subset, cfg.test_subset, cfg.seed)
    supernet = train_supernet(Supernet(space, cfg.reduction), train, cfg, log)
    t0 = time.time()
    result = evolutionary_search(space, lambda a: evaluate(supernet.extract(a), val), budget, cfg.evolution)
    if log:
        log(
            f"search: {len(result.history)} architectures scored in {time.time() - t0:.0f}s; best held-out "
            f"top-1 {result.score:.2f} at {result.macs / 1e6:.2f} MMACs"
        )
    config = export_config(space, result.best, cfg.reduction)
    model = ViTResNAS(
        network_def=config["model_args"]["network_def"],
        patch_size=space.patch_size,
        stem_chans=space.stem_chans,
        img_size=28,
        in_chans=1,
        num_classes=10,
        reduction=cfg.reduction,
    )
    top1 = evaluate(train_model(model, train, cfg.retrain_epochs, cfg.batch_size, cfg.lr, cfg.seed, log), test)
    save_model(model, out / "searched.safetensors", config, top1)
    summary = {**config, "supernet_top1_val": result.score, "retrained_top1_test": top1, "config": asdict(cfg)}
    (out / "search.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def add_search_parser(sub: Any) -> None:
    """``vitlab search``: the subcommand, added to ``vitlab``'s subparsers."""
    p = sub.add_parser("search", help="ViT-ResNAS: supernet training + evolutionary search under a MAC budget")
    d = SearchRunConfig()
    p.add_argument("--out", required=True, help="run directory (search.json, searched.safetensors)")
    p.add_argument("--space", default=d.space, help=f"search space ({', '.join(sorted(SPACES))})")
    p.add_argument("--budget-mmacs", type=float, default=d.budget_mmacs, help="MAC budget, millions per image")
    for name in (
        "train_subset",
        "val_subset",
        "test_subset",
        "epochs",
        "warmup_epochs",
        "batch_size",
        "example_per_arch",
        "retrain_epochs",
        "seed",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--reduction", default=d.reduction, choices=("residual", "conv"))
    e = d.evolution
    p.add_argument("--population", type=int, default=e.population)
    p.add_argument("--iterations", type=int, default=e.iterations)
    p.add_argument("--parents", type=int, default=e.parents)
    p.add_argument("--mutations", type=int, default=e.mutations)
    p.add_argument("--crossovers", type=int, default=e.crossovers)
    p.add_argument("--mutation-prob", type=float, default=e.mutation_prob)
    p.set_defaults(fn=_cmd_search)


def _cmd_search(args: Any) -> int:
    evo = EvolutionConfig(
        args.population, args.iterations, args.parents, args.mutations, args.crossovers, args.mutation_prob, args.seed
    )
    names = (
        "space",
        "budget_mmacs",
        "train_subset",
        "val_subset",
        "test_subset",
        "epochs",
        "warmup_epochs",
        "batch_size",
        "example_per_arch",
        "lr",
        "retrain_epochs",
        "reduction",
        "seed",
    )
    cfg = SearchRunConfig(**{n: getattr(args, n) for n in names}, evolution=evo)
    s = run_search(cfg, args.out)
    print(
        f"searched {s['macs'] / 1e6:.2f} MMACs: held-out supernet top-1 {s['supernet_top1_val']:.2f}, "
        f"retrained test top-1 {s['retrained_top1_test']:.2f}; wrote {args.out}/search.json"
    )
    return 0
