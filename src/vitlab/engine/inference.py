"""Using trained runs: rebuild a model from a run directory or checkpoint, evaluate it, predict images."""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..compress import set_surgery
from ..data import load_image, match_channels, normalize, resize_batch
from ..errors import CheckpointError
from ..models import create_model
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import load_weights, read_metadata
from .config import RunConfig, load_config
from .evaluate import EvalResult, evaluate_model
from .hcs import ChannelSubset
from .plots import plot_confusion
from .setup import build_datasets, build_loader, resolve_device
from .surgery import records_from_meta, replay

__all__ = ["Prediction", "build_trained", "evaluate_run", "init_from_checkpoint", "load_trained", "predict"]


def _resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, run directory or None); a run directory means its final model, else its best, else its last."""
    path = Path(path)
    if path.is_dir():
        for stem in ("final", "best", "last"):
            if (path / "checkpoints" / f"{stem}.safetensors").is_file():
                return path / "checkpoints" / f"{stem}.safetensors", path
        raise CheckpointError(
            f"{str(path)!r} holds no checkpoints/best.safetensors or last.safetensors; "
            "expected a vitlab run directory or a .safetensors checkpoint"
        )
    run = (
        path.parent.parent
        if path.parent.name == "checkpoints" and (path.parent.parent / "config.json").is_file()
        else None
    )
    return path, run


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any], Path | None]:
    """Rebuild the model a vitlab checkpoint was trained as and load its weights (eval mode).

    The checkpoint's surgery record (``engine/surgery.py``) is replayed around the loading: structural compression
    (``reparam``) before the weights, token reduction after, so the model comes back as it was saved.
    """
    weights, run = _resolve_checkpoint(path)
    meta = read_metadata(weights)
    missing = [k for k in ("model", "num_classes", "in_chans", "img_size") if k not in meta]
    if missing:
        raise CheckpointError(f"{str(weights)!r} lacks metadata {missing}; it was not written by vitlab train")
    records = records_from_meta(meta)  # surgery (token reduction, compression), legacy meta["reduce"] included
    model = build_trained(meta)
    replay(model, records, "build")  # structural surgery first, so the saved state-dict keys fit
    load_weights(model, weights)
    replay(model, records, "loaded")
    return model.to(resolve_device(str(device))).eval(), meta, run


def build_trained(meta: dict[str, Any]) -> nn.Module:
    """The architecture a checkpoint's metadata names: a classifier, or a task model on its backbone."""
    shape = {"num_classes": meta["num_classes"], "in_chans": meta["in_chans"], "img_size": meta["img_size"]}
    if meta.get("task"):
        from ..tasks import create_task_model

        backbone_kwargs = meta.get("backbone_args") or None
        return create_task_model(
            meta["task"], backbone=meta["model"], backbone_kwargs=backbone_kwargs, **shape, **meta.get("task_args", {})
        )
    return create_model(meta["model"], **{**(meta.get("model_args") or {}), **shape})


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_NESTED_KEYS = ("state_dict", "model", "model_ema", "module")  # official training scripts' wrappers
_EXPECTED = "a vitlab run directory, a .safetensors file or a PyTorch state dict (.pth/.pt/.bin)"


def _reason(e: Exception) -> str:
    """The first line of an exception, short enough for a one-line error."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, written by vitlab train?) of a safetensors file or a ``torch.save``-d state dict."""
    from safetensors import SafetensorError, safe_open

    if path.suffix not in _TORCH_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as f:
                own = (f.metadata() or {}).get("format") == CHECKPOINT_FORMAT
                names = f.keys()  # a safe_open handle is not iterable
                return {k: f.get_tensor(k) for k in names}, own
        except (SafetensorError, OSError, ValueError) as e:
            if path.suffix == ".safetensors":
                raise CheckpointError(
                    f"--init-from {str(path)!r} is not a readable safetensors file ({_reason(e)}); expected {_EXPECTED}"
                ) from e
    try:  # weights_only: tensors and containers, never arbitrary objects from a downloaded file
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # garbage, or objects beyond tensors and containers
        raise CheckpointError(
            f"--init-from {str(path)!r} is not a pickle of plain tensors (torch.load with weights_only refused it); "
            f"expected {_EXPECTED}"
        ) from e
    except Exception as e:  # arbitrary bytes fail in many ways (zip, struct, EOF, decoding)
        raise CheckpointError(f"--init-from {str(path)!r} is unreadable ({_reason(e)}); expected {_EXPECTED}") from e
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise CheckpointError(f"--init-from {str(path)!r} holds no state dict of tensors; expected {_EXPECTED}")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, False


def _filter_foreign(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Map an official / timm checkpoint onto ``model`` through its module's ``checkpoint_filter_fn``.

    timm's convention: the module defining the model class may define ``checkpoint_filter_fn(state_dict,
    model)`` (key renames, position-embedding resampling); a model without one gets the state unchanged.
    """
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except (KeyError, ValueError, RuntimeError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"--init-from {str(path)!r} does not fit {type(model).__name__} ({_reason(e)}); "
            "fine-tune the same architecture"
        ) from e


def init_from_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Fine-tuning start: copy a run's (or checkpoint's) weights into ``model``; returns the keys left as built.

    ``path`` is a vitlab run directory or checkpoint, a plain safetensors file, or a PyTorch state dict
    (``.pth``/``.pt``/``.bin``, possibly under ``"model"``/``"state_dict"``/``"model_ema"``, as timm and
    official repositories publish them, loaded with ``weights_only=True``). Files not written by vitlab
    go through the model module's ``checkpoint_filter_fn`` when it has one. Every key must then exist in
    both with the same shape, except the classifier, which is left as built when the class count differs
    (a new head for a new data set).

    A vitlab checkpoint's compression record comes along: structural compression (structured pruning, wrappers)
    is rebuilt on ``model`` before the weights load, and the records stay on the model, so fine-tuning a
    compressed checkpoint trains (and saves) the compressed model. Token reduction is not carried over
    (``--reduce`` says what the new run reduces).
    """
    weights, _ = _resolve_checkpoint(path)
    if not weights.is_file():
        raise CheckpointError(f"--init-from {str(path)!r} does not exist; expected {_EXPECTED}")
    state, own_format = _read_weights(weights)
    if own_format:
        compressed = [r for r in records_from_meta(read_metadata(weights)) if r["kind"] == "compress"]
        replay(model, compressed, "build")
        set_surgery(model, compressed)  # the whole history, weights-held methods (magnitude) included
    else:
        state = _filter_foreign(state, model, weights)
    own = model.state_dict()
    head = {k for k in own if k.startswith(("head.", "head_dist.", "aux_head."))}
    skipped = sorted(k for k in head if k in state and state[k].shape != own[k].shape)
    bad = [k for k in own if k not in head and (k not in state or state[k].shape != own[k].shape)]
    bad += [k for k in state if k not in own]
    if bad:
        raise CheckpointError(
            f"--init-from {str(weights)!r} does not fit this model (e.g. {bad[:4]}); fine-tune the same architecture"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def evaluate_run(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    out: str | Path | None = None,
    channels: str | Sequence[int] | None = None,
) -> EvalResult | dict[str, Any]:
    """Evaluate a run directory or checkpoint on its test split; writes eval.json and confusion.png.

    A task model's run is scored by its own metrics (a dict of them; ``eval.json`` only).

    ``channels`` (``"0,2"``): show the model only these input channels (``engine/hcs.py``: ChannelViT gets
    their tokens alone, other models get the rest zeroed).
    """
    dev = resolve_device(device)
    model, meta, run = load_trained(path, dev)
    if channels is not None:
        model = ChannelSubset(model, channels, meta["in_chans"])
    cfg = load_config(run / "config.json") if run is not None else RunConfig()
    if dataset is not None:
        cfg.data.dataset = dataset
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    cfg.data.batch_size = batch_size
    cfg.model.img_size = meta["img_size"]
    ds = build_datasets(cfg, splits=("test",))["test"]
    if len(ds.classes) != meta["num_classes"]:
        raise ValueError(
            f"the data set has {len(ds.classes)} classes but the checkpoint predicts {meta['num_classes']}"
        )
    loader = build_loader(ds, cfg, train=False, in_chans=meta["in_chans"])
    out_dir = (
        Path(out) if out is not None else (run / "eval" if run is not None else Path(path).with_suffix("") / "eval")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta.get("task"):
        from .evaluate import shard_batches
        from .task_objective import TaskObjective

        autocast = partial(torch.autocast, dev.type, enabled=False)
        scores = TaskObjective(model).evaluate(model, shard_batches(loader.iter_batches(0), None), dev, autocast)
        (out_dir / "eval.json").write_text(json.dumps(scores, indent=2))
        return scores
    res = evaluate_model(model, loader, dev, meta["classes"])
    res.to_json(out_dir / "eval.json")
    plot_confusion(
        res.confusion, meta["classes"], out_dir / "confusion.png", title=f"{meta['model']}: top-1 {res.top1:.2f}%"
    )
    return res


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), best first


@torch.inference_mode()
def predict(images: list[str | Path], checkpoint: str | Path, topk: int = 3, device: str = "cpu") -> list[Prediction]:
    """Top-k classes for each image file with the model of a run directory or checkpoint."""
    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    model, meta, _ = load_trained(checkpoint, device)
    dev = next(model.parameters()).device
    out = []
    for path in images:
        x = load_image(path, in_chans=meta["in_chans"])[None]
        x = resize_batch(normalize(match_channels(x, meta["in_chans"]), meta["mean"], meta["std"]), meta["img_size"])
        probs = model(x.to(dev)).softmax(-1)[0].cpu()
        p, i = probs.topk(min(topk, probs.numel()))
        top = [(meta["classes"][j], round(v, 5)) for v, j in zip(p.tolist(), i.tolist(), strict=True)]
        out.append(Prediction(str(path), top))
    return out
