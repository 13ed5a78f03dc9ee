"""Hierarchical Channel Sampling (HCS) and channel-subset evaluation, for any classifier.

HCS ("Channel Vision Transformers", arXiv:2309.16108, Sec. 3.2; github.com/insitro/ChannelViT) trains on a
random subset of the input channels in two steps: draw how many channels to keep, ``m ~ U{1, ..., C}``, then
which ``m`` channels, uniformly without replacement. Unlike dropping each channel independently, every
subset size is equally likely. As in the official code, one subset is drawn per batch.

A model that declares ``supports_channel_subsets`` (ChannelViT) receives only the kept channels and their
indices (``model(x[:, idx], channels=idx)``), so it sees fewer tokens. Any other model (a plain ViT) receives
every channel with the dropped ones set to zero, the normalised data's mean. Evaluation on a fixed subset
(``vitlab eval --channels 0,2``) applies the same rule. Deviation: the official ViT-with-HCS also rescales the
kept channels by ``C / m`` during training only; here train and test see the same zero filling, no rescaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .callbacks import Callback
from .technique import Technique

__all__ = [
    "ChannelSampling",
    "ChannelSubset",
    "apply_hcs",
    "hcs_generator",
    "parse_channels",
    "sample_channels",
    "select_channels",
    "supports_channel_subsets",
]

_PRIME = 1_000_003


def supports_channel_subsets(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a DDP / compile wrapper holds) takes ``channels=`` with a subset."""
    for wrapped in ("module", "_orig_mod"):
        inner = getattr(model, wrapped, None)
        if isinstance(inner, nn.Module):
            model = inner
    return bool(getattr(model, "supports_channel_subsets", False))


def hcs_generator(seed: int, step: int) -> torch.Generator:
    """The generator of training step ``step``: the same subsets on resume and on every process."""
    return torch.Generator().manual_seed((seed * _PRIME + step) & ((1 << 63) - 1))


def sample_channels(num_channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """HCS's two-step draw: ``m ~ U{1..C}``, then ``m`` distinct channels; sorted ``(m,)`` long tensor."""
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be an integer >= 1, got {num_channels!r}")
    m = int(torch.randint(1, num_channels + 1, (1,), generator=generator))
    return torch.randperm(num_channels, generator=generator)[:m].sort().values


def select_channels(
    x: torch.Tensor, model: nn.Module, channels: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The input and forward keywords that show ``model`` only ``channels`` of the batch ``x (B, C, H, W)``."""
    index = torch.as_tensor(channels, dtype=torch.long).to(x.device)
    if supports_channel_subsets(model):
        return x.index_select(1, index), {"channels": index}
    keep = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    keep[index] = 1
    return x * keep.view(1, -1, 1, 1), {}


def apply_hcs(x: torch.Tensor, model: nn.Module, seed: int, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """One HCS draw for the training batch ``x`` at ``step``: ``(input, forward keywords)`` for ``model``."""
    channels = sample_channels(x.shape[1], hcs_generator(seed, step))
    return select_channels(x, model, channels)


def parse_channels(channels: str | Sequence[int], num_channels: int) -> list[int]:
    """``"0,2"`` or ``[0, 2]`` -> ``[0, 2]``, checked: distinct indices in ``0..num_channels - 1``."""
    valid = f"distinct channel indices in 0..{num_channels - 1} (the model takes {num_channels} channels)"
    if isinstance(channels, str):
        try:
            values = [int(c) for c in channels.replace(" ", "").split(",") if c != ""]
        except ValueError:
            raise ValueError(f"--channels must be comma-separated integers such as 0,2, got {channels!r}") from None
    else:
        values = [int(c) for c in channels]
    if not values or len(set(values)) != len(values) or not all(0 <= c < num_channels for c in values):
        raise ValueError(f"--channels must list {valid}, got {channels!r}")
    return sorted(values)


class ChannelSubset(nn.Module):
    """``model`` shown only some input channels: ``forward(x)`` takes every channel, as the data has them."""

    def __init__(self, model: nn.Module, channels: str | Sequence[int], num_channels: int) -> None:
        super().__init__()
        self.model = model
        self.channels = parse_channels(channels, num_channels)
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_channels:
            raise ValueError(f"expected input with {self.num_channels} channels, got {x.shape[1]}")
        x, kwargs = select_channels(x, self.model, self.channels)
        return self.model(x, **kwargs)


class ChannelSampling(Callback):
    """This step's random channel subset on this process's shard (the same draw on every rank)."""

    def before_forward(self, state: Any, batch: dict[str, Any]) -> None:
        batch["image"], batch["forward_kwargs"] = apply_hcs(batch["image"], state.model, state.cfg.seed, state.step)


TECHNIQUE = Technique(
    flag="--hcs",
    what="channel sampling",
    is_on=lambda cfg: cfg.hcs.hcs,
    # a teacher or the extra resolutions would be handed the channel subset too
    excludes=("--teacher", "--resolutions"),
    install=lambda setup: setup.callbacks.append(ChannelSampling()),
)
