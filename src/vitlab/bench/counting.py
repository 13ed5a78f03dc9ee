"""Parameter and FLOP counts, on real models or on the ``meta`` device (no memory, no compute).

FLOPs follow ``torch.utils.flop_counter``: one multiply-accumulate is 2 FLOPs, and only
matmuls, convolutions and attention are counted (norms, activations and softmax are not),
which is also how papers count. Papers' "FLOPs" are multiply-accumulates: compare their
tables with :func:`gmacs`, not with the raw FLOP count.

Attention through ``F.scaled_dot_product_attention`` is counted: on CPU it dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch's counter has no formula
(2.14 included), so ``vitlab.layers.attention`` registers one when vitlab is imported; on ``meta``
it takes the math path (``bmm``), which torch counts (both tested against a hand-computed ViT).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ._checks import check_input_size, check_positive_int

__all__ = ["count_flops", "count_flops_meta", "count_params", "count_params_meta", "gmacs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared parameters once); works on ``meta`` models."""
    return sum(p.numel() for p in model.parameters())


def _build_meta(name: str, **kwargs: Any) -> nn.Module:
    import vitlab

    with torch.device("meta"):
        return vitlab.create_model(name, **kwargs)


def count_params_meta(name: str, **kwargs: Any) -> int:
    """Parameters of vitlab model ``name`` built on the ``meta`` device (``kwargs`` as for ``create_model``)."""
    return count_params(_build_meta(name, **kwargs))


def count_flops(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1) -> int:
    """FLOPs (2 per multiply-accumulate) of one inference forward of ``batch_size`` images.

    Args:
        model: any module taking an image batch; may live on the ``meta`` device.
        input_size: ``(channels, height, width)`` of one image (or ``(frames, channels, height, width)``: a clip).
        batch_size: images per forward.

    Returns:
        Total FLOPs as counted by ``torch.utils.flop_counter.FlopCounterMode``.
    """
    input_size = check_input_size(input_size)
    check_positive_int("batch_size", batch_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(batch_size, *input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_flops_meta(name: str, img_size: int | None = None, batch_size: int = 1, **kwargs: Any) -> int:
    """FLOPs of vitlab model ``name`` at ``img_size`` (default: the variant's), built on ``meta``.

    ``kwargs`` go to ``create_model``; ``in_chans`` defaults to the variant's. Models whose forward
    reads tensor values (``.item()``, data-dependent shapes) cannot run on ``meta``: count those
    with :func:`count_flops` on a real model.
    """
    import vitlab

    spec = vitlab.get_variant(name)
    if img_size is not None:
        check_positive_int("img_size", img_size)
        kwargs["img_size"] = img_size
    size = img_size or spec.img_size
    in_chans = kwargs.get("in_chans") or spec.in_chans
    return count_flops(_build_meta(name, **kwargs), (in_chans, size, size), batch_size)


def gmacs(flops: float) -> float:
    """Giga multiply-accumulates from a FLOP count: ``flops / 2e9``.

    Papers' "FLOPs" (DeiT's 4.6G for DeiT-S, Swin's 4.5G for Swin-T) are multiply-accumulates,
    so this, not ``flops / 1e9``, is the number to compare with their tables.
    """
    return flops / 2e9
