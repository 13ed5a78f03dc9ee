"""Shared set-up for train / eval / predict: devices, data sets and models from a run config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..bench._checks import check_device
from ..data import BatchLoader, ImageFolderDataset, TensorImageDataset, load_fashion_mnist, make_synthetic
from ..data.errors import ChannelMismatchError
from ..data.multichannel import load_fashion_mnist_multichannel
from ..data.multitask import make_fmnist_multitask
from ..data.synthetic import GENERATORS as SCENE_SETS
from ..data.synthetic import MULTIVIEW_GENERATORS, VIDEO_GENERATORS, make_dataset
from ..models import create_model, get_variant
from .config import ModelConfig, RunConfig

__all__ = [
    "TaskBatches",
    "backbone_name",
    "build_datasets",
    "build_loader",
    "build_model",
    "model_img_size",
    "resolve_device",
    "split_holdout",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for an absent device is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(name)
    except ValueError as e:
        raise ValueError(f"--device: {e}; --device auto picks what this machine has") from e


TASK_IMG_SIZE = 64  # task models on generated scenes default to 64 px canvases


def model_img_size(cfg: RunConfig) -> int:
    if cfg.model.img_size:
        return cfg.model.img_size
    return TASK_IMG_SIZE if cfg.task.task else get_variant(cfg.model.model).img_size


def split_holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, val)``: a seeded ``fraction`` of ``ds`` held out for choosing checkpoints (``--val-fraction``)."""
    if not hasattr(ds, "subset"):
        raise ValueError("--val-fraction needs an in-memory data set (Fashion-MNIST, synthetic or generated scenes)")
    n_val = round(len(ds) * fraction)
    if not 0 < n_val < len(ds):
        raise ValueError(f"--val-fraction {fraction} holds out {n_val} of {len(ds)} training images; need 1..n-1")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 7919))
    return ds.subset(order[n_val:].sort().values), ds.subset(order[:n_val].sort().values)


class TaskBatches:
    """A multi-view set seen through a task's converter (``TaskSpec.data_adapter``): ``collate`` gives the task's
    batch, its ``image`` still uint8 views, which ``BatchLoader`` then normalises once with the set's mean/std
    (or ``stats``: the task's own ``(mean, std)``)."""

    classes = ("scene",)  # one "class": the task models' num_classes is unused

    def __init__(self, data: Any, convert: Any, stats: tuple[Any, Any] | None = None) -> None:
        self.data, self.convert, self.stats = data, convert, stats
        self.mean, self.std = (data.mean, data.std) if stats is None else (tuple(stats[0]), tuple(stats[1]))
        self.name = data.name
        self.img_size, self.in_chans = data.img_size, data.in_chans

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.data[i]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.convert(self.data.collate(items))

    def subset(self, n_or_indices: Any, seed: int = 0) -> TaskBatches:
        return TaskBatches(self.data.subset(n_or_indices, seed), self.convert, self.stats)


Dataset = TensorImageDataset | ImageFolderDataset | TaskBatches


def _multiview(cfg: RunConfig, split: str, subset: int | None) -> TaskBatches:
    """A multi-view generated set for the run's task model, in that task's batch schema."""
    from ..tasks import get_task, list_tasks

    spec = get_task(cfg.task.task) if cfg.task.task else None
    if spec is None or spec.data_adapter is None:
        specs = [get_task(t) for t in list_tasks()]
        # a task made for this set, or one that reads any multi-view set (flow_dit: single views)
        readers = [
            t.name
            for t in specs
            if t.data_adapter and (t.dataset == cfg.data.dataset or t.dataset not in MULTIVIEW_GENERATORS)
        ]
        given = f"--task {spec.name}" if spec else "a classifier"
        raise ValueError(
            f"--dataset {cfg.data.dataset}: multi-view scenes train the task models that read them "
            f"(--task {' / '.join(readers) or '(none registered)'}), not {given}"
        )
    views, convert, *stats = spec.data_adapter(json_keywords("--task-args", cfg.task.task_args))
    n = subset or (2_000 if split == "train" else 500)
    size, d = model_img_size(cfg), cfg.data
    ds = make_dataset(d.dataset, split=split, n=n, seed=cfg.seed, views=views, size=size, data_dir=d.data_dir)
    return TaskBatches(ds, convert, *stats)


def _check_task_data(cfg: RunConfig) -> None:
    """A task made for a multi-view set (its default ``dataset`` is one, with a ``data_adapter``) trains on that set
    only; a task that merely also reads one (flow_dit: single views) keeps its other data sets."""
    if not cfg.task.task:
        return
    from ..tasks import get_task

    spec = get_task(cfg.task.task)
    if spec.data_adapter is not None and spec.dataset in MULTIVIEW_GENERATORS and cfg.data.dataset != spec.dataset:
        raise ValueError(
            f"--task {spec.name} trains on calibrated multi-view scenes: use --dataset {spec.dataset}, "
            f"not {cfg.data.dataset!r}"
        )


def build_datasets(cfg: RunConfig, splits: tuple[str, ...] = ("train", "test")) -> dict[str, Dataset]:
    """The data sets named by ``cfg.data.dataset``; a folder root needs ``train/`` and ``val/`` (or ``test/``)."""
    d = cfg.data
    _check_task_data(cfg)
    out: dict[str, Dataset] = {}
    for split in splits:
        subset = d.train_subset if split == "train" else d.test_subset
        if d.dataset == "fashion_mnist":
            ds: Dataset = load_fashion_mnist(d.data_dir, split=split)
        elif d.dataset == "fashion_mnist_multichannel":  # builds its 4 views for the kept items only
            ds = load_fashion_mnist_multichannel(d.data_dir, split=split, subset=subset, seed=cfg.seed)
        elif d.dataset in SCENE_SETS:  # generated dense-prediction scenes (data/synthetic), cached
            n = subset or (10_000 if split == "train" else 2_000)
            ds = make_dataset(
                d.dataset, split=split, n=n, seed=cfg.seed, canvas=model_img_size(cfg), data_dir=d.data_dir
            )
        elif d.dataset in VIDEO_GENERATORS:  # generated clips (B, T, C, H, W) for video task models, cached
            n = subset or (2_000 if split == "train" else 500)
            ds = make_dataset(d.dataset, split=split, n=n, seed=cfg.seed, size=model_img_size(cfg), data_dir=d.data_dir)
        elif d.dataset in MULTIVIEW_GENERATORS:  # calibrated views for a multi-view task model, cached
            ds = _multiview(cfg, split, subset)
        elif d.dataset == "fmnist_multitask":  # heterogeneous tasks, one per batch (data/multitask.py)
            n = subset or (3_000 if split == "train" else 500)
            ds = make_fmnist_multitask(split, n=n, seed=cfg.seed, canvas=model_img_size(cfg), data_dir=d.data_dir)
        elif d.dataset == "synthetic":
            ds = make_synthetic(n=subset or 512, seed=cfg.seed + (0 if split == "train" else 1))
        else:
            ds = _folder_split(Path(d.dataset), split, cfg)
        if subset and isinstance(ds, TensorImageDataset) and subset < len(ds):
            ds = ds.subset(subset, seed=cfg.seed)
        out[split] = ds
    return out


def _folder_split(root: Path, split: str, cfg: RunConfig) -> ImageFolderDataset:
    names = ("train",) if split == "train" else ("val", "test", "validation")
    for name in names:
        if (root / name).is_dir():
            return ImageFolderDataset(root / name, model_img_size(cfg), cfg.model.in_chans or 3)
    raise ValueError(
        f"--dataset {str(root)!r}: expected 'fashion_mnist', 'fashion_mnist_multichannel', 'synthetic', or a "
        f"folder with {' or '.join(n + '/' for n in names)} holding one sub-folder per class"
    )


def build_loader(
    ds: Dataset, cfg: RunConfig, train: bool, in_chans: int, device: str | torch.device = "cpu"
) -> BatchLoader:
    """The run's loader; on CUDA an in-memory data set lives on the GPU (``BatchLoader``'s ``device``)."""
    try:
        return BatchLoader(
            ds,
            cfg.data.batch_size,
            shuffle=train,
            augment=train and cfg.data.augment,
            seed=cfg.seed,
            drop_last=train and len(ds) > cfg.data.batch_size,
            img_size=model_img_size(cfg),
            in_chans=in_chans,
            num_workers=cfg.data.workers,
            device=device,
        )
    except ChannelMismatchError as e:  # name the flag the user can change
        raise ChannelMismatchError(f"--in-chans {in_chans} does not fit the data: {e}") from None


def backbone_name(cfg: RunConfig) -> str:
    """The model name a run builds: for a task model ``--backbone``, else ``--model`` when the user changed it,
    else the task's default backbone (``--model``'s default is a hierarchical classifier, which isotropic-only
    task models refuse)."""
    if not cfg.task.task:
        return cfg.model.model
    if cfg.task.backbone:
        return cfg.task.backbone
    if cfg.model.model != ModelConfig.__dataclass_fields__["model"].default:
        return cfg.model.model
    from ..tasks import get_task

    return get_task(cfg.task.task).default_backbone


def json_keywords(flag: str, text: str) -> dict[str, Any]:
    """``--task-args`` / ``--backbone-args``: a JSON object of keywords ('' is none)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object such as '{{\"key\": 1}}', got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object of keywords, got {text!r}")
    return value


def build_model(cfg: RunConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The classifier, or with ``--task`` the task model on its backbone."""
    if cfg.task.task:
        from ..tasks import create_task_model

        extra = json_keywords("--backbone-args", cfg.task.backbone_args)
        if cfg.model.drop_path_rate is not None:
            extra["drop_path_rate"] = cfg.model.drop_path_rate
        return create_task_model(
            cfg.task.task,
            backbone=backbone_name(cfg),
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=model_img_size(cfg),
            backbone_kwargs=extra or None,
            **json_keywords("--task-args", cfg.task.task_args),
        )
    kwargs: dict = {
        **json_keywords("--model-args", cfg.model.model_args),
        "num_classes": num_classes,
        "in_chans": in_chans,
    }
    if cfg.model.img_size is not None:
        kwargs["img_size"] = cfg.model.img_size
    if cfg.model.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    return create_model(cfg.model.model, **kwargs)
