"""Checkpoints: weights as safetensors (with the metadata needed to rebuild the model), training
state (optimizer, scheduler, step, RNG) beside them, every file written atomically.

A run's checkpoint is ``<stem>.safetensors`` + ``<stem>.state.pt``; both carry the step so a pair
torn by a crash between the two writes is detected instead of silently resumed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

__all__ = ["atomic_write", "load_state", "load_weights", "read_metadata", "save_state", "save_weights"]

FORMAT = "vitlab"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save ``model``'s state dict as safetensors; ``metadata`` values are stored as JSON."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda tmp: save_file(_untie(tensors), tmp, metadata=meta))


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage (tied weights); clone the repeats.
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The vitlab metadata of a weights file; a file that is not a vitlab checkpoint is an error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a safetensors file ({e}); expected a vitlab checkpoint") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not a vitlab checkpoint (no vitlab metadata); "
            "load plain weights with model.load_state_dict(safetensors.torch.load_file(path))"
        )
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k == "format":
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{str(path)!r}: metadata field {k!r} is not valid JSON") from e
    return out


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights into ``model`` (strict); returns the checkpoint metadata."""
    meta = read_metadata(path)
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not fit model {meta.get('model', '?')!r}: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return meta


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Save training state (tensors, numbers, strings, containers only, so it loads with weights_only)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load training state without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {str(path)!r} does not exist; cannot resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is not a readable vitlab training state: {e}") from e
