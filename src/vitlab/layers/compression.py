"""Learned image-compression analysis transform (the encoder ``g_a``) with GDN, usable as a patch-embedding stem.

Idea: Ballé et al., "End-to-end Optimized Image Compression" (arXiv:1611.01704) and "Variational image
compression with a scale hyperprior" (arXiv:1802.01436); layout and key names as CompressAI's
``bmshj2018-factorized`` / ``bmshj2018-hyperprior`` / ``mbt2018`` encoders
(https://github.com/InterDigitalInc/CompressAI): four 5x5 stride-2 convolutions with GDN (or ReLU) between
them, ``(B, C_in, H, W) -> (B, M, H/16, W/16)``. The module is an ``nn.Sequential`` so its state-dict keys are
CompressAI's ``g_a.*`` keys with the prefix removed; ``compressai_encoder_state_dict`` does that mapping.

GDN keeps CompressAI's non-negative reparametrisation (stored ``beta``/``gamma`` are square roots, offset
by a pedestal), so pretrained values load unchanged. Deviation: the lower bound is a plain ``clamp_min``,
whose gradient is zero below the bound, where CompressAI's ``LowerBound`` lets gradients that push the value
back up through; the forward pass is the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tracing import is_fx_tracing

__all__ = ["GDN", "AnalysisTransform", "compressai_encoder_state_dict"]

_REPARAM_OFFSET = 2.0**-18  # CompressAI's NonNegativeParametrizer default
_PEDESTAL = _REPARAM_OFFSET**2


class GDN(nn.Module):
    """Generalised divisive normalisation ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)`` on a ``(B, C, H, W)`` map.

    Args:
        beta_min: lower bound of ``beta`` (keeps the denominator positive).
        gamma_init: initial diagonal of ``gamma`` (CompressAI's default 0.1).
        inverse: the inverse transform (IGDN, multiply instead of divide), used by synthesis transforms.
    """

    def __init__(self, dim: int, beta_min: float = 1e-6, gamma_init: float = 0.1, inverse: bool = False) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"GDN dim must be a positive channel count, got {dim}")
        if beta_min < 0:
            raise ValueError(f"GDN beta_min must be >= 0, got {beta_min}")
        self.inverse = inverse
        self.beta_bound = (beta_min + _PEDESTAL) ** 0.5
        self.gamma_bound = _PEDESTAL**0.5
        # stored in the reparametrised (square-root) space, as CompressAI stores them
        self.beta = nn.Parameter(torch.sqrt(torch.ones(dim) + _PEDESTAL))
        self.gamma = nn.Parameter(torch.sqrt(gamma_init * torch.eye(dim) + _PEDESTAL))

    def effective_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``beta`` (C,) and ``gamma`` (C, C) as used in the formula (non-negative)."""
        beta = self.beta.clamp_min(self.beta_bound) ** 2 - _PEDESTAL
        gamma = self.gamma.clamp_min(self.gamma_bound) ** 2 - _PEDESTAL
        return beta, gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        beta, gamma = self.effective_params()
        C = x.shape[1]
        if not is_fx_tracing() and gamma.shape[0] != C:
            raise ValueError(f"GDN built for {gamma.shape[0]} channels got an input with {C}")
        norm = F.conv2d(x * x, gamma.view(C, C, 1, 1), beta)  # a 1x1 conv: beta_i + sum_j gamma_ij x_j^2
        return x * (norm.sqrt() if self.inverse else norm.rsqrt())


class AnalysisTransform(nn.Sequential):
    """CompressAI's ``g_a``: ``conv5x5/2 -> act -> conv5x5/2 -> act -> conv5x5/2 -> act -> conv5x5/2``.

    ``(B, in_chans, H, W) -> (B, out_chans, ceil(H/16), ceil(W/16))``. Children ``0, 2, 4, 6`` are the
    convolutions and ``1, 3, 5`` the activations, as in CompressAI.

    Args:
        hidden_chans: CompressAI's ``N`` (128 for bmshj2018 qualities 1-5, 192 for 6-8).
        out_chans: CompressAI's ``M`` (the latent channels: 192 / 320).
        act: ``"gdn"`` (bmshj2018-factorized / -hyperprior, mbt2018) or ``"relu"`` (bmshj2018-factorized-relu).
    """

    reduction = 16  # four stride-2 convolutions

    def __init__(self, in_chans: int = 3, hidden_chans: int = 128, out_chans: int = 192, act: str = "gdn") -> None:
        if act not in ("gdn", "relu"):
            raise ValueError(f"act must be 'gdn' or 'relu', got {act!r}")
        for arg, value in (("in_chans", in_chans), ("hidden_chans", hidden_chans), ("out_chans", out_chans)):
            if value <= 0:
                raise ValueError(f"AnalysisTransform {arg} must be positive, got {value}")
        chans = (in_chans, hidden_chans, hidden_chans, hidden_chans, out_chans)
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 5, stride=2, padding=2))
            if i < 3:
                layers.append(GDN(chans[i + 1]) if act == "gdn" else nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.in_chans, self.hidden_chans, self.out_chans, self.act = in_chans, hidden_chans, out_chans, act


def compressai_encoder_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "g_a."
) -> dict[str, torch.Tensor]:
    """The ``prefix`` (``g_a.``) entries of a CompressAI model's state dict, keyed for :class:`AnalysisTransform`.

    Accepts a bare state dict or CompressAI's training checkpoint ``{"state_dict": ...}``, with or without a
    ``module.`` prefix. The reparametrisation buffers (``*_reparam.pedestal``, ``*_reparam.lower_bound.bound``)
    are constants here and are dropped. Encoders of another layout (cheng2020's residual ``g_a``) are refused.
    """
    state_dict = state_dict.get("state_dict", state_dict)  # type: ignore[assignment]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if "_reparam." in key:
            continue
        if not re.fullmatch(r"[0246]\.(weight|bias)|[135]\.(beta|gamma)", key):
            raise ValueError(
                f"state_dict key {prefix}{key} is not a bmshj2018/mbt2018-style encoder (4 convs + GDN); "
                "cheng2020's residual-block encoders are not supported by AnalysisTransform"
            )
        out[key] = value
    if not out:
        raise ValueError(f"state_dict has no {prefix!r} entries: not a CompressAI image-compression model")
    return out
