"""Temporal mixing inside an image ViT run on clips: a depthwise temporal convolution over patch tokens, a
wrapper that inserts it into any isotropic ViT block, and an inflated (3-D) patch projection.

The mechanism is UniFormerV2's local MHRA (Li et al., "UniFormerV2: Spatiotemporal Learning by Arming Image ViTs
with Video UniFormer", arXiv:2211.09552, https://github.com/OpenGVLab/UniFormerV2): batch norm, a 1x1x1
convolution that narrows the channels (by ``reduction``, 1.5 in the paper), a depthwise ``(k, 1, 1)`` convolution
along time, a 1x1x1 convolution back to the width, added to the patch tokens only (prefix tokens pass unchanged).
The last convolution starts at zero, so an inserted module is the identity at initialisation and a pretrained
image ViT keeps its outputs until training moves it.

Frames travel folded into the batch, ``(B * T, P + N, C)`` with the ``T`` frames of one clip contiguous (what
``clips.flatten(0, 1)`` gives), ``N = grid[0] * grid[1]`` patch tokens after ``P`` prefix tokens.
``InflatedPatchConv`` takes the place of a patch embedding's ``Conv2d`` (``patch_embed.proj``): a ``(k, p, p)``
kernel over time and space, the 2-D kernel at the centre frame and zeros elsewhere (UniFormerV2's centre
initialisation), so it equals the image embedding until trained.
Deviations: no drop path on the temporal update (the official code shares the block's drop path rate); the inflated
projection keeps every frame (no temporal stride), because the host ViT's forward sees ``B * T`` images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import Grid

__all__ = ["DepthwiseTemporalConv", "InflatedPatchConv", "TemporalConvBlock"]

# the host block's children the "double" insertion runs (timm's block layout, kept by every vitlab isotropic block)
_BRANCH_CHILDREN = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class DepthwiseTemporalConv(nn.Module):
    """``x + update(x)`` on the patch tokens of clips folded into the batch: ``(B * T, P + N, C)`` -> same shape.

    Args:
        num_frames: frames per clip (``T``); the batch must be a multiple of it.
        grid: the patch grid ``(H, W)`` with ``H * W == N``.
        reduction: the channel narrowing of the hidden convolutions (``int(dim // reduction)`` channels).
        kernel_size: the temporal kernel (odd; "same" padding, so the frame count is kept).
    """

    def __init__(
        self,
        dim: int,
        num_frames: int,
        grid: Grid,
        num_prefix_tokens: int = 1,
        reduction: float = 1.5,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if num_frames < 1 or num_prefix_tokens < 0 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"need num_frames >= 1, num_prefix_tokens >= 0 and an odd kernel_size; got {num_frames}, "
                f"{num_prefix_tokens}, {kernel_size}"
            )
        hidden = int(dim // reduction)
        if hidden < 1:
            raise ValueError(f"reduction {reduction} leaves no channel of dim {dim}")
        self.num_frames, self.grid, self.num_prefix_tokens = num_frames, tuple(grid), num_prefix_tokens
        self.kernel_size = kernel_size
        # BN over (B, T, H, W) per channel, i.e. BatchNorm3d's statistics, taken on the tokens (M, C)
        self.norm = nn.BatchNorm1d(dim)
        # the three convolutions keep Conv3d parameters (the official layout) but run as matmuls and a
        # shifted sum over frames on the token layout: Conv3d on CPU costs several times more here
        self.reduce = nn.Conv3d(dim, hidden, 1)
        self.conv = nn.Conv3d(hidden, hidden, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0), groups=hidden)
        self.expand = nn.Conv3d(hidden, dim, 1)
        # zero init: the host ViT's outputs are unchanged until training moves this branch
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def update(self, patches: torch.Tensor) -> torch.Tensor:
        """The temporal update of patch tokens ``(B, T, N, C)`` -> ``(B, T, N, C)``."""
        B, T, N, C = patches.shape
        h = self.norm(patches.reshape(-1, C)).view(B, T, N, C)
        h = F.linear(h, self.reduce.weight.flatten(1), self.reduce.bias)  # 1x1x1 conv: (B, T, N, hidden)
        pad = self.kernel_size // 2
        h = F.pad(h, (0, 0, 0, 0, pad, pad))  # zero frames before and after the clip
        taps = self.conv.weight.flatten(1)  # (hidden, k): tap j reads frame t + j - k // 2
        h = sum(h[:, j : j + T] * taps[:, j] for j in range(self.kernel_size)) + self.conv.bias
        return F.linear(h, self.expand.weight.flatten(1), self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BT, L, C = x.shape
        T, (H, W), P = self.num_frames, self.grid, self.num_prefix_tokens
        if BT % T or L != P + H * W:
            raise ValueError(
                f"temporal conv expects (B * {T}, {P} + {H}x{W}, C) tokens (frames of a clip contiguous); got "
                f"{tuple(x.shape)}"
            )
        prefix, patches = x[:, :P], x[:, P:]
        update = self.update(patches.reshape(BT // T, T, H * W, C)).reshape(BT, H * W, C)
        return torch.cat([prefix, patches + update], dim=1)


class TemporalConvBlock(nn.Module):
    """An isotropic ViT block with a ``DepthwiseTemporalConv`` before its attention (and, ``double``, before its MLP).

    The host block is kept whole as ``block`` and called as it is: ``block(temporal1(x), *args)``. With ``double``
    the second convolution sits on the residual stream between the host's two branches, which its ``forward``
    does not expose; the wrapper then runs the two branches from the host's children (timm's names ``norm1``,
    ``attn`` or ``token_mixer``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``), which with
    zero-initialised convolutions equals the host's ``forward`` (tests/layers/test_temporal.py checks it).
    Extra positional arguments (vitlab blocks' ``grid``) and keywords (timm's ``attn_mask``) reach the host.

    Raises:
        ValueError: ``double`` on a block without those children.
    """

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        num_frames: int,
        grid: Grid,
        num_prefix_tokens: int = 1,
        double: bool = False,
        reduction: float = 1.5,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if double:
            missing = [n for n in _BRANCH_CHILDREN if not hasattr(block, n)]
            if missing or not (hasattr(block, "attn") or hasattr(block, "token_mixer")):
                raise ValueError(
                    f"double temporal convs run the branches of a pre-norm block with timm's child names; "
                    f"{type(block).__name__} lacks {missing or ['attn']}"
                )
        self.block = block
        conv = (dim, num_frames, grid, num_prefix_tokens, reduction, kernel_size)
        self.temporal1 = DepthwiseTemporalConv(*conv)
        self.temporal2 = DepthwiseTemporalConv(*conv) if double else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.temporal1(x)
        if self.temporal2 is None:
            return self.block(x, *args, **kwargs)
        b = self.block
        mixer = b.token_mixer if hasattr(b, "token_mixer") else b.attn
        x = x + b.drop_path1(b.ls1(mixer(b.norm1(x), *args, **kwargs)))
        x = self.temporal2(x)
        # vitlab MLPs that need the grid say so with ``uses_grid`` (layers/block.py)
        h = b.mlp(b.norm2(x), *args) if getattr(b.mlp, "uses_grid", False) else b.mlp(b.norm2(x))
        return x + b.drop_path2(b.ls2(h))


class InflatedPatchConv(nn.Module):
    """A patch embedding's ``Conv2d`` inflated to ``(kernel_size, p, p)`` over clips folded into the batch.

    ``(B * T, C, H, W)`` frames -> ``(B * T, D, H / p, W / p)``, the same interface as the ``Conv2d`` it replaces;
    frame ``t`` sees frames ``t - k // 2 .. t + k // 2`` (zero frames beyond the clip).

    Raises:
        ValueError: ``conv`` is not a ``Conv2d`` or ``kernel_size`` is not odd.
    """

    def __init__(self, conv: nn.Module, num_frames: int, kernel_size: int = 3) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"an inflated patch projection replaces a plain Conv2d with an odd temporal kernel; got "
                f"{type(conv).__name__} and kernel_size={kernel_size}"
            )
        self.num_frames, self.stride, self.padding = num_frames, conv.stride, conv.padding
        w = conv.weight.detach()
        weight = torch.zeros(w.shape[0], w.shape[1], kernel_size, *w.shape[2:], dtype=w.dtype, device=w.device)
        weight[:, :, kernel_size // 2] = w  # centre-frame initialisation: the image embedding at the start
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BT, C, H, W = x.shape
        T = self.num_frames
        if BT % T:
            raise ValueError(f"inflated patch projection expects (B * {T}, C, H, W) frames; got {tuple(x.shape)}")
        clips = x.reshape(BT // T, T, C, H, W).transpose(1, 2)  # (B, C, T, H, W)
        k = self.weight.shape[2]
        y = F.conv3d(clips, self.weight, self.bias, (1, *self.stride), (k // 2, *self.padding))  # (B, D, T, h, w)
        return y.transpose(1, 2).reshape(BT, -1, *y.shape[-2:])
