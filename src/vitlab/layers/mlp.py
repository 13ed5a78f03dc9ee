"""Channel MLPs beyond timm's ``Mlp``: ``ConvFfn``, a feed-forward network with a depthwise conv inside.

The conv FFN of MSVMamba ("Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model",
arXiv:2405.14174, github.com/YuHengsss/MSVMamba, Sec. 3.3): ``fc1 -> x + dwconv3x3(x) -> GELU -> fc2``,
which adds the local channel-and-space mixing that a plain MLP lacks. ``dw_residual=False`` gives the
PVTv2-style form ``fc1 -> dwconv -> GELU -> fc2``. The official code writes ``fc1``/``fc2`` as 1x1 convs;
here they are ``nn.Linear`` on tokens (same function, parameters and FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .block import Grid, map_to_tokens, tokens_to_map
from .fast import fast_forward

__all__ = ["ConvFfn"]


class ConvFfn(nn.Module):
    """``fc1 -> drop -> [x +] dwconv(x) -> act -> fc2 -> drop`` on ``(B, H*W, C)`` tokens with their grid.

    Args:
        hidden_features: width of the hidden layer; default ``in_features``.
        kernel_size: the depthwise conv's kernel (odd, so the grid keeps its size).
        dw_residual: add the depthwise conv's output to its input (MSVMamba) instead of replacing it.
    """

    uses_grid = True  # MetaBlock passes the token grid to feed-forward parts that say so

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        kernel_size: int = 3,
        dw_residual: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden = hidden_features or in_features
        if in_features < 1 or hidden < 1:
            raise ValueError(f"in_features and hidden_features must be positive, got {in_features}, {hidden}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.dw_residual = dw_residual
        self.fc1 = nn.Linear(in_features, hidden, bias=bias)
        self.drop1 = nn.Dropout(drop)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, 1, kernel_size // 2, groups=hidden, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("ConvFfn needs grid=(H, W) of the tokens")
        if (out := fast_forward(self, x, grid)) is not None:
            return out
        x = self.drop1(self.fc1(x))
        y = self.dwconv(tokens_to_map(x, grid))  # (B, hidden, H, W)
        y = map_to_tokens(y)[0]
        x = self.act(x + y if self.dw_residual else y)
        return self.drop2(self.fc2(x))
