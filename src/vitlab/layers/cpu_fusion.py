"""Fused CPU inference: oneDNN matmuls and convolutions that apply the bias, an exact GELU or a residual add
inside the kernel (the ops torch.compile emits on CPU), for eager models whose time goes to memory passes over
activations rather than to multiply-adds (narrow channels at high resolution, e.g. S2AFormer).

A model calls ``fused_inference_ok(x, module)`` and, when it holds, replaces ``act(fc(x))`` or ``fc(x) + r``
by ``fused_linear`` and ``act(conv(x))`` by ``fused_conv`` with its own parameters: same math, fp32 rounding
only. The ops are private to torch, so they are probed once against the plain ops; a torch without them (or
with other signatures) keeps the plain modules.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = ["fold_batchnorm", "fused_conv", "fused_inference_ok", "fused_linear", "plain_cpu_inference", "plus_identity"]

_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)


@cache
def _fused_ops_work() -> bool:
    """The oneDNN ops are private to torch: probe them once on tiny inputs against the plain ops, so a torch
    whose ops are missing, renamed or re-signatured falls back to the modules instead of failing."""
    if _LINEAR is None or _CONV is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)  # a private generator: the probe leaves the global RNG alone
        x, w, b, r, m, cw, cb = (
            torch.randn(*s, generator=g) for s in ((3, 4), (5, 4), (5,), (3, 5), (1, 2, 5, 5), (2, 1, 3, 3), (2,))
        )
        with torch.no_grad():
            ok = torch.allclose(_LINEAR(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5)
            ok &= torch.allclose(_LINEAR.binary(x, r, w, b, "add"), F.linear(x, w, b) + r, atol=1e-5)
            fused = _CONV(m, cw, cb, [1, 1], [1, 1], [1, 1], 2, "gelu", [], "none")
            ok &= torch.allclose(fused, F.gelu(F.conv2d(m, cw, cb, 1, 1, 1, 2)), atol=1e-5)
        return bool(ok)
    except (RuntimeError, TypeError):  # pragma: no cover - depends on the torch build
        return False


def plain_cpu_inference(*tensors: torch.Tensor) -> bool:
    """Whether eager CPU float32 inference runs on ``tensors``, so that fused kernels unknown to autograd, autocast,
    functorch (vmap), tracers, compilers and dispatch modes (FLOP counter, fake tensors) may replace the plain ops;
    a dispatch mode that declares ``watches_only`` (the memory meter: it runs every op as it is) is no obstacle."""
    return (
        not torch.is_grad_enabled()
        and all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not _autocast_cpu()
        and not torch._C._are_functorch_transforms_active()
        and all(getattr(mode, "watches_only", False) for mode in _get_current_dispatch_mode_stack())
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch < 2.4 spells it differently
        return torch.is_autocast_cpu_enabled()


def fused_inference_ok(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``module`` may take the fused oneDNN path on ``x``: eval mode and ``plain_cpu_inference(x)``."""
    return not module.training and plain_cpu_inference(x) and _fused_ops_work()


def fused_linear(
    x: torch.Tensor, fc: nn.Linear, gelu: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``fc(x)``, then exact GELU or ``+ residual``, as one fused oneDNN matmul; ``(..., C_in) -> (..., C_out)``."""
    x2 = x.reshape(-1, x.shape[-1])
    if residual is not None:
        out = _LINEAR.binary(x2, residual.reshape(x2.shape[0], -1), fc.weight, fc.bias, "add")
    else:
        out = _LINEAR(x2, fc.weight, fc.bias, "gelu" if gelu else "none", [], "none" if gelu else None)
    return out.view(*x.shape[:-1], fc.out_features)


def fused_conv(
    x: torch.Tensor,
    conv: nn.Conv2d,
    gelu: bool = False,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``conv(x)``, optionally with another ``weight``/``bias`` (folded forms), then exact GELU, fused."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    return _CONV(x, weight, bias, *geometry, "gelu" if gelu else "none", [], "none" if gelu else None)


def plus_identity(conv: nn.Conv2d) -> torch.Tensor:
    """The weight of ``conv(x) + x`` as one conv, for a depthwise ``conv`` with an odd kernel, stride 1 and 'same'
    padding: its centre taps raised by 1 (a copy; the module keeps its own)."""
    kh, kw = conv.kernel_size
    weight = conv.weight.clone()
    weight[:, 0, kh // 2, kw // 2] += 1.0
    return weight


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv, with ``bn``'s running statistics (its eval-mode function)."""
    scale = (bn.running_var + bn.eps).rsqrt()
    scale = scale if bn.weight is None else bn.weight * scale
    bias = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
    return conv.weight * scale[:, None, None, None], bias if bn.bias is None else bias + bn.bias
