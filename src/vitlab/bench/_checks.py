"""Argument checks shared by the bench modules: bad input gets an error naming the value."""

from __future__ import annotations

from typing import Any

import torch


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive ``int`` (not a bool), else raise ``ValueError`` naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_input_size(input_size: Any) -> tuple[int, ...]:
    """Return ``input_size`` as a ``(channels, height, width)`` (an image) or ``(frames, channels, height, width)``
    (a clip, for video task models) tuple of positive ints."""
    if not isinstance(input_size, (tuple, list)) or len(input_size) not in (3, 4):
        raise ValueError(
            f"input_size must be (channels, height, width) or, for clips, (frames, channels, height, width); got "
            f"{input_size!r}"
        )
    for value in input_size:
        check_positive_int("each entry of input_size", value)
    return tuple(input_size)  # type: ignore[return-value]


def check_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a ``torch.device``, refusing CUDA when no CUDA device is present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    if dev.type not in {"cpu", "cuda"}:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev
