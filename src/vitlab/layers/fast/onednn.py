"""Fused oneDNN CPU inference: convolutions and matmuls that apply the bias, an exact GELU or a residual add
inside the kernel (the ops torch.compile emits on CPU), for eager models whose time goes to memory passes over
activations rather than to multiply-adds (narrow channels at high resolution: S2AFormer, PPMA, conv FFNs).

The fast paths here replace ``act(fc(x))`` or ``fc(x) + r`` by ``fused_linear`` and ``act(conv(x))`` by
``fused_conv`` with the module's own parameters, a stem's BatchNorm folded into its convs and ``x + dwconv(x)``
as one depthwise conv (``plus_identity``): the readable forward's math, float32 rounding only. They run in
eval mode under ``plain_cpu_inference``. The ops are private to torch, so they are probed once against the
plain ops; a torch without them (or with other signatures) keeps the readable forwards.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..block import Grid, map_to_tokens, tokens_to_map
from ..strip_attention import StripAttention
from . import FastPath, plain_cpu_inference, register_fast_path

__all__ = ["fold_batchnorm", "fused_conv", "fused_inference_ok", "fused_linear", "plus_identity"]

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


def fused_inference_ok(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``module`` may take a fused oneDNN path on ``x``: eval mode and ``plain_cpu_inference(x)``."""
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


def _exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"  # what the fused kernels apply


def _fusable(module: nn.Module, x: torch.Tensor, *_: object) -> bool:
    return fused_inference_ok(x, module)


def _stem(x: torch.Tensor, layers: list[tuple[nn.Conv2d, nn.BatchNorm2d, bool]]) -> tuple[torch.Tensor, Grid]:
    """``(conv, bn, gelu after)`` layers as fused convs with the BatchNorm folded; image -> ``(tokens, grid)``."""
    x = x.contiguous(memory_format=torch.channels_last)  # the tokens are then a free view of the output map
    for conv, bn, gelu in layers:
        weight, bias = fold_batchnorm(conv, bn)
        x = fused_conv(x, conv, gelu=gelu, weight=weight, bias=bias)
    return map_to_tokens(x)


def _s2aformer_stem(stem: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    return _stem(x, [(layer.conv, layer.bn, True) for layer in stem])  # timm ConvNormAct, GELU after the BN


def _ppma_stem(stem: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
    layers = list(stem)  # conv, BN[, GELU], ...
    return _stem(
        x,
        [
            (conv, layers[i + 1], i + 2 < len(layers) and isinstance(layers[i + 2], nn.GELU))
            for i, conv in enumerate(layers)
            if isinstance(conv, nn.Conv2d)
        ],
    )


def _hpb_applies(block: nn.Module, x: torch.Tensor, grid: Grid) -> bool:
    lim, mlp = block.lim, block.mlp
    return (
        fused_inference_ok(x, block)
        and isinstance(block.attn, StripAttention)
        and not lim.dw_residual
        and _exact_gelu(lim.act)
        and _exact_gelu(mlp.act)
    )


def _hpb(block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """S2AFormer's block in eval mode (drop paths identities): ``x + dwconv(x)`` one conv, then the SSA, LIM and
    MLP with their biases, GELUs and residual adds inside the matmuls and convs."""
    x = map_to_tokens(fused_conv(tokens_to_map(x, grid), block.local, weight=plus_identity(block.local)))[0]
    x = fused_linear(block.attn.attend_heads(block.norm1(x), grid), block.attn.proj, residual=x)
    lim, mlp = block.lim, block.mlp
    h = tokens_to_map(fused_linear(block.norm2(x), lim.fc1), grid)
    x = fused_linear(map_to_tokens(fused_conv(h, lim.dwconv, gelu=True))[0], lim.fc2, residual=x)
    return fused_linear(fused_linear(block.norm3(x), mlp.fc1, gelu=True), mlp.fc2, residual=x)


def _local_ffn(ffn: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """PPMA's ``fc1 -> GELU -> h + dwconv(h) -> fc2``: bias + GELU in the matmul, ``h + dwconv(h)`` one conv."""
    h = fused_linear(x, ffn.fc1, gelu=True)
    h = fused_conv(tokens_to_map(h, grid), ffn.dwconv, weight=plus_identity(ffn.dwconv))
    return ffn.fc2(map_to_tokens(h)[0])


def _cpe_block(block: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """PPMA's block: its position encoding ``x + dwconv(x)`` as one conv, then the block it extends."""
    x = map_to_tokens(fused_conv(tokens_to_map(x, grid), block.cpe, weight=plus_identity(block.cpe)))[0]
    return super(type(block), block).forward(x, grid)


def _conv_ffn(ffn: nn.Module, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``ConvFfn`` in eval mode (dropouts identities): ``[x +] dwconv(x)`` and the GELU as one conv (the GELU pass
    over the hidden map otherwise costs as much as the conv)."""
    x = ffn.fc1(x)
    weight = plus_identity(ffn.dwconv) if ffn.dw_residual else None
    return ffn.fc2(map_to_tokens(fused_conv(tokens_to_map(x, grid), ffn.dwconv, gelu=True, weight=weight))[0])


for _path in (
    FastPath("s2aformer_stem", "vitlab.models.s2aformer._ConvStem", _fusable, _s2aformer_stem, "BN folded, GELU fused"),
    FastPath(
        "s2aformer_block",
        "vitlab.models.s2aformer.HybridPerceptionBlock",
        _hpb_applies,
        _hpb,
        "x + dwconv(x) one conv; biases, GELUs and residual adds inside the matmuls and convs",
    ),
    FastPath("ppma_stem", "vitlab.models.ppma._Stem", _fusable, _ppma_stem, "BN folded, GELU fused"),
    FastPath("ppma_cpe_block", "vitlab.models.ppma._CpeBlock", _fusable, _cpe_block, "x + dwconv(x) one conv"),
    FastPath(
        "ppma_ffn",
        "vitlab.models.ppma._LocalFfn",
        lambda ffn, x, grid: _fusable(ffn, x) and _exact_gelu(ffn.act),
        _local_ffn,
        "bias + GELU in the matmul, h + dwconv(h) one conv",
    ),
    FastPath(
        "conv_ffn",
        "vitlab.layers.mlp.ConvFfn",
        lambda ffn, x, grid: _fusable(ffn, x) and _exact_gelu(ffn.act),
        _conv_ffn,
        "[x +] dwconv(x) and the GELU one conv",
    ),
):
    register_fast_path(_path)
