"""Multi-process training under ``torchrun``: process group, DDP, batch sharding, rank-0-only side effects.

``torchrun --nproc_per_node N -m vitlab train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the engine
then joins the process group (gloo on CPU, NCCL on CUDA) and wraps the model in DDP. Every rank draws the same
global batch of ``--batch-size`` images from the deterministic loader (and mixup, on the global batch) and trains
on its own contiguous shard, so N processes follow the same global batches as one. DDP averages gradients, which
equals the gradient of the global-batch mean loss. Checkpoints hold the plain model state dict and world-size-free
training state, so a run can resume with a different process count.

Deviations from a bit-equal single-process run: models with BatchNorm normalise per shard (as ``timm``'s
train.py without ``--sync-bn``); ranks > 0 draw dropout / drop-path masks from their own seed.
FIXME(#5): every rank decodes the whole global batch; sharding before decoding needs a loader hook in ``data/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import VitlabError

__all__ = [
    "DistEnv",
    "all_sum",
    "barrier",
    "broadcast_from_main",
    "is_main_process",
    "seed_rank",
    "setup_distributed",
    "shard_batch",
    "teardown_distributed",
    "wrap_model",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the process group and so destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from e


def is_main_process() -> bool:
    """False in torchrun's processes of rank > 0 (they train but neither write nor print)."""
    return _env_int("RANK", 0) == 0


def setup_distributed(device: torch.device, batch_size: int) -> tuple[DistEnv, torch.device]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; returns the env and this rank's device.

    ``batch_size`` is the global batch; it must split evenly over the processes.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistEnv(), device
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if batch_size % world_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the number of processes "
            f"({world_size}); use e.g. --batch-size {max(world_size, batch_size // world_size * world_size)}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"process group has {dist.get_world_size()} processes but WORLD_SIZE is {world_size}")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns), device


def teardown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DDP around ``model`` when several processes train; the model itself otherwise.

    ``sync_bn``: BatchNorm layers normalise over the global batch (``SyncBatchNorm``, CUDA only), converted in
    place so ``model`` (what is saved) holds them too; their state_dict keys are unchanged.
    """
    if sync_bn and env.enabled:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm); drop it on CPU")
        _convert_sync_bn(model)
    if not env.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _convert_sync_bn(model: nn.Module) -> None:
    for name, child in model.named_children():
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
        if converted is not child:
            setattr(model, name, converted)


def shard_batch(env: DistEnv, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """This rank's contiguous shard of each global-batch tensor, and the loss scale that keeps shards fair.

    DDP averages gradients over ranks; when a batch does not split evenly (a last, short batch), scaling each
    rank's mean loss by ``n_local * world / n_global`` makes that average the global-batch mean. Even splits
    get exactly 1.0.
    """
    n = tensors[0].shape[0]
    if n < env.world_size:
        raise ValueError(f"a batch of {n} images cannot be split over {env.world_size} processes")
    shards = [t.tensor_split(env.world_size)[env.rank] for t in tensors]
    n_local = shards[0].shape[0]
    return shards, 1.0 if n_local * env.world_size == n else n_local * env.world_size / n


def shard_dict(env: DistEnv, batch: dict[str, Any]) -> dict[str, Any]:
    """This rank's contiguous shard of every per-sample entry of a dict batch (tensors and lists)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim > 0:
            out[key] = value.tensor_split(env.world_size)[env.rank]
        elif isinstance(value, list):
            keep = torch.arange(len(value)).tensor_split(env.world_size)[env.rank].tolist()
            out[key] = [value[i] for i in keep]
        else:
            out[key] = value
    return out


def all_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks (a copy; unchanged with one process)."""
    values = values.clone()
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def seed_rank(env: DistEnv, seed: int, step: int) -> None:
    """Give ranks > 0 their own torch RNG stream (dropout, drop path); rank 0 keeps the single-process stream."""
    if env.rank > 0:
        torch.manual_seed((seed * 1_000_003 + env.rank) * 1_000_003 + step)


def broadcast_from_main(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a failure on rank 0 fails every rank."""
    if not env.enabled:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if env.is_main:
        try:
            payload = [("ok", fn())]
        except Exception as e:
            error = e
            payload = [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise VitlabError(f"rank 0 failed: {value}")
    return value


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
