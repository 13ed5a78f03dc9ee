"""Helpers that keep vitlab's layers traceable by ``torch.fx.symbolic_trace`` (timm's and torchvision's FX paths).

While FX traces, sizes read from ``x.shape`` are proxies, and a Python ``if`` on them cannot be decided. vitlab's
checks of bad input then step aside (``is_fx_tracing``): they raise the same errors in eager mode, while the
traced graph keeps only the size arithmetic. Choices that depend on sizes (resample or not, pad or not) take the
general branch while tracing, which is correct for every size. ``torch.compile`` and ``torch.export`` see
``is_fx_tracing() == False`` (dynamo folds it), so their graphs are unchanged.
"""

from __future__ import annotations

import torch.fx._symbolic_trace as _fx

__all__ = ["is_fx_tracing"]


def is_fx_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` runs (not under ``torch.compile`` / ``torch.export``)."""
    return _fx.is_fx_symbolic_tracing()
