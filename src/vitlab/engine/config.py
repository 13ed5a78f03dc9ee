"""Typed run configuration: one dataclass per concern, composed into ``RunConfig``.

The defaults are the quickstart recipe (``configs/quickstart.yaml`` documents its result): the command
``vitlab train`` with no flags trains it on Fashion-MNIST. Every field carries its help line
(``field(metadata={"help": ...})``), so ``vitlab train --help`` and the docs come from here. A training
technique's group (``hcs``, ``multires``, ``distillation``, ``reduction``) belongs to that technique: the
technique itself (``engine/techniques.py``) says when it is on and what it cannot be combined with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ChannelSamplingConfig",
    "CompressConfig",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "MultiResConfig",
    "OptimConfig",
    "ReduceConfig",
    "RunConfig",
    "TaskConfig",
    "check_fields",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


def opt(default: Any, help: str) -> Any:
    """A config field with its command-line help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The model: a vitlab or timm name, its input and where its weights start."""

    model: str = opt("tiny_vit_1m_28", "model name (vitlab list); with --task, the backbone unless --backbone")
    img_size: int | None = opt(None, "input size in pixels (default: the model's own)")
    in_chans: int | None = opt(None, "input channels (default: the data's)")
    model_args: str = opt(
        "", """the model's own keywords as JSON, e.g. '{"depth": 24}' (with --task: --backbone-args)"""
    )
    drop_path_rate: float | None = opt(None, "stochastic depth rate (default: the model's)")
    init_from: str = opt("", "start from these weights: a run directory, a vitlab .safetensors or a .pth state dict")


@dataclass
class DataConfig:
    """The data: a named data set or an image folder, batching and held-out selection."""

    dataset: str = opt(
        "fashion_mnist",
        "fashion_mnist, fashion_mnist_multichannel, synthetic, fmnist_scenes (with --task segmentation), "
        "fmnist_multitask (with --task modular_moe; --train-subset counts per task), "
        "camera_motion_videos (clips, with --task vivit_fe), "
        "or a folder with train/ and val/ holding one sub-folder per class",
    )
    data_dir: str | None = opt(None, "where the named data set lives (default: its standard place)")
    batch_size: int = opt(128, "images per optimizer step (the global batch under torchrun)")
    train_subset: int = opt(0, "train on this many images only (0: all; for smoke tests)")
    test_subset: int = opt(0, "evaluate on this many test images only (0: all)")
    val_fraction: float = opt(
        0.0, "hold out this fraction of the training images to choose the best checkpoint (0: choose on test)"
    )
    augment: bool = opt(False, "random crop (pad 2) and flip; off in the quickstart, which underfits")
    workers: int = opt(0, "processes decoding an image folder (0: in this process)")


@dataclass
class OptimConfig:
    """Optimisation: AdamW, warmup + cosine schedule, regularisation and EMA."""

    epochs: float = opt(5.0, "passes over the training data (fractions allowed)")
    steps: int = opt(0, "train for this many optimizer steps instead of --epochs (0: use --epochs)")
    lr: float = opt(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    warmup_epochs: float = opt(0.25, "linear warmup length in epochs")
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine schedule")
    label_smoothing: float = opt(0.1, "label smoothing of the classification loss")
    mixup: float = opt(0.0, "mixup alpha (0: off)")
    cutmix: float = opt(0.0, "cutmix alpha (0: off)")
    clip_grad: float = opt(1.0, "clip the gradient norm to this (0: off)")
    ema_decay: float = opt(0.0, "keep an EMA of the weights with this decay and evaluate it (0: off)")


@dataclass
class TaskConfig:
    """Task models (``vitlab list --kind H``): a backbone by name + neck + head, trained on dict batches."""

    task: str = opt("", "train a task model instead of a classifier, e.g. segmentation ('': classification)")
    backbone: str = opt("", "with --task: the backbone's model name (default: --model if given, else the task's own)")
    task_args: str = opt("", """with --task: the task model's keywords as JSON, e.g. '{"cnn_branch": false}'""")
    backbone_args: str = opt("", """with --task: the backbone's keywords as a JSON object, e.g. '{"patch_size": 8}'""")


@dataclass
class ChannelSamplingConfig:
    """Hierarchical Channel Sampling (ChannelViT, arXiv:2309.16108; engine/hcs.py)."""

    hcs: bool = opt(False, "train each batch on a random subset of the input channels")


@dataclass
class MultiResConfig:
    """Multi-resolution training (ResFormer) and the resolution curriculum (UniViTAR); engine/multires.py."""

    resolutions: str = opt("", "ResFormer: train every batch at these sizes, e.g. 224,160,128")
    scale_consistency: float = opt(1.0, "with --resolutions: weight of the scale-consistency loss")
    native_after: float | None = opt(
        None, "UniViTAR curriculum: packed native-size batches after this fraction of the steps"
    )


@dataclass
class DistillConfig:
    """DeiT distillation (arXiv:2012.12877) and TinyViT's stored-logit distillation; engine/distill.py."""

    teacher: str = opt("", "distil from this teacher: a run directory, checkpoint or model name")
    distill: str = opt("hard", "with --teacher: hard (CE to the teacher's argmax) or soft (KL at --distill-tau)")
    distill_alpha: float = opt(0.5, "loss = (1 - alpha) CE(labels) + alpha distillation loss")
    distill_tau: float = opt(1.0, "soft distillation temperature")
    distill_from: str = opt("", "TinyViT: train from a `vitlab distill save-logits` directory (no teacher runs)")


@dataclass
class ReduceConfig:
    """Token reduction while training (``vitlab.reduce``); engine/reduce_train.py."""

    reduce: str = opt("", "train with token reduction: tome, evit, ats or mctf ('': off)")
    reduce_r: str = opt("", "ToMe/MCTF tokens merged per block: an integer or a comma list per block")
    reduce_keep: float = opt(0.0, "EViT keep rate / ATS budget fraction")
    reduce_layers: str = opt("", "blocks that reduce, e.g. 3,6,9 (default: the method's own)")
    reduce_consistency: float = opt(0.0, "MCTF's token-reduction consistency loss weight (0: off)")
    reduce_consistency_threshold: float = opt(0.0, "count consistency only where p(label) exceeds this")


@dataclass
class CompressConfig:
    """Training with a compression method applied (``vitlab.compress``); engine/compress_train.py."""

    compress: str = opt("", "train (or fine-tune with --init-from) with this compression method applied ('': off)")
    compress_args: str = opt("", """with --compress: the method's keywords as JSON, e.g. '{"amount": 0.5}'""")


@dataclass
class RunConfig:
    """A whole run; ``config.json`` in the run directory is this, resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    hcs: ChannelSamplingConfig = field(default_factory=ChannelSamplingConfig)
    multires: MultiResConfig = field(default_factory=MultiResConfig)
    distillation: DistillConfig = field(default_factory=DistillConfig)
    reduction: ReduceConfig = field(default_factory=ReduceConfig)
    compression: CompressConfig = field(default_factory=CompressConfig)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (cuda when present)")
    amp: bool = opt(False, "autocast on CUDA (see --amp-dtype)")
    amp_dtype: str = opt("bfloat16", "with --amp: bfloat16 or float16 (with loss scaling)")
    channels_last: bool = opt(False, "channels-last memory format on CUDA")
    sync_bn: bool = opt(False, "under torchrun on CUDA: BatchNorm statistics over the global batch")
    compile: bool = opt(False, "torch.compile the training forward (falls back to eager with a warning)")
    seed: int = opt(0, "seed of initialisation, batch order and augmentation")
    out: str = opt("runs", "directory that holds run directories")
    name: str = opt("", "run directory name (default: <model>-<timestamp>)")
    log_every: int = opt(20, "write a metrics line every N steps")
    ckpt_every: int = opt(0, "also checkpoint every N steps (0: at epoch ends only)")
    stop_after_steps: int = opt(0, "stop early with a checkpoint after N steps; the schedule still spans the run")

    def validate(self) -> None:
        """Range checks of the generic fields; each technique checks its own (``engine/techniques.py``)."""
        o, d = self.optim, self.data
        checks = [
            ("batch_size", d.batch_size, d.batch_size >= 1, "an integer >= 1"),
            ("epochs", o.epochs, o.epochs > 0, "a number > 0"),
            ("steps", o.steps, o.steps >= 0, "an integer >= 0"),
            ("lr", o.lr, o.lr > 0, "a number > 0"),
            ("label_smoothing", o.label_smoothing, 0 <= o.label_smoothing < 1, "in [0, 1)"),
            ("ema_decay", o.ema_decay, 0 <= o.ema_decay < 1, "in [0, 1)"),
            ("val_fraction", d.val_fraction, 0 <= d.val_fraction < 1, "in [0, 1)"),
            ("img_size", self.model.img_size, self.model.img_size is None or self.model.img_size >= 8, ">= 8"),
            ("in_chans", self.model.in_chans, self.model.in_chans is None or self.model.in_chans >= 1, ">= 1"),
            ("amp_dtype", self.amp_dtype, self.amp_dtype in ("bfloat16", "float16"), "bfloat16 or float16"),
        ]
        check_fields(checks)
        from .techniques import validate_techniques

        validate_techniques(self)


def check_fields(checks: list[tuple[str, Any, bool, str]]) -> None:
    """Raise a ValueError naming the flag of the first ``(field, value, ok, expected)`` that is not ok."""
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")


_GROUPS = {
    f.name: f.default_factory for f in dataclasses.fields(RunConfig) if f.default_factory is not dataclasses.MISSING
}
# fields that lived in another group before the technique groups (configs and run directories written then)
_MOVED = {
    ("optim", "hcs"): "hcs",
    ("optim", "resolutions"): "multires",
    ("optim", "scale_consistency"): "multires",
    ("optim", "native_after"): "multires",
}


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of ``config_to_dict``; unknown keys are errors naming the key. Older layouts are read too."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for (old, key), new in _MOVED.items():
        if isinstance(d.get(old), dict) and key in d[old]:
            d.setdefault(new, {})[key] = d[old].pop(key)
    top = {f.name for f in dataclasses.fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key not in top:
            raise ValueError(f"unknown config key {key!r}; expected one of {sorted(top)}")
        if key in _GROUPS:
            cls = _GROUPS[key]
            names = {f.name for f in dataclasses.fields(cls)}
            bad = set(value) - names
            if bad:
                raise ValueError(f"unknown config keys {sorted(bad)} in {key!r}; expected some of {sorted(names)}")
            kwargs[key] = cls(**value)
        else:
            kwargs[key] = value
    return RunConfig(**kwargs)


def load_config(path: str | Path) -> RunConfig:
    """Read a run config from JSON or YAML (the run directory's ``config.json``, or a recipe)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        d = yaml.safe_load(text) or {}
    else:
        d = json.loads(text)
    return config_from_dict(d)
