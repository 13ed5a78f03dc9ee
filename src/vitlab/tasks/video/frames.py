"""Image ViT -> video parts: a per-frame spatial encoder, a token adapter and a temporal transformer.

- ``FrameEncoder``: any isotropic vitlab or timm ViT (by name, ``tasks.create_backbone``) applied to every frame,
  frames folded into the batch; returns each frame's normed tokens, pooled (prefix/CLS token or patch mean) or
  patch tokens only. ``frozen=True`` freezes it, keeps it in eval mode and runs it without autograd, which is
  where a frozen spatial encoder saves its time and memory.
- ``TokenAdapter``: a few learned queries cross-attend over one frame's patch tokens; their outputs, concatenated
  and projected to the frame width, are added to the frame embedding (the "compact adapter" of paper 33,
  reconstructed: see ``vivit.py``).
- ``TemporalTransformer``: projection to its own width, a CLS token, a learned temporal position embedding and
  pre-norm transformer blocks over the T frame embeddings -> the clip embedding; depth 0 averages the frames
  (an order-blind baseline). Its blocks are timm ``Block``s, or exact copies of a spatial encoder's last blocks
  (``from_blocks``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from ...layers.hosts import attention_blocks
from .._backbone import create_backbone, feature_dicts

__all__ = ["FrameEncoder", "TemporalTransformer", "TokenAdapter"]

POOLS = ("token", "avg")


class FrameEncoder(nn.Module):
    """An isotropic ViT per frame: clips ``(B, T, C, H, W)`` -> normed tokens ``(B, T, P + N, D)``.

    Args:
        pool: the frame embedding: "token" the first prefix (CLS) token, "avg" the mean of the patch tokens.
        frozen: no gradient, eval mode (no dropout or drop path) and no autograd graph for the encoder.

    Raises:
        ValueError: the backbone is hierarchical, returns no token sequence, or has no prefix token for "token".
    """

    def __init__(
        self,
        backbone: str,
        *,
        in_chans: int,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        pool: str = "token",
        frozen: bool = False,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"frame_pool must be one of {POOLS}, got {pool!r}")
        self.backbone = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        info = feature_dicts(self.backbone)
        if len({d["reduction"] for d in info}) > 1:
            raise ValueError(
                f"backbone {backbone!r} is hierarchical (its stages differ in stride); the spatial encoder of a video "
                "task is an isotropic ViT whose tokens (CLS and patches) embed each frame"
            )
        self.embed_dim = int(info[-1]["num_chs"])
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        if pool == "token" and self.num_prefix_tokens < 1:
            raise ValueError(f"frame_pool='token' needs a class token; {backbone!r} has none (use frame_pool='avg')")
        self.pool_kind = pool
        self.frozen = frozen
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> FrameEncoder:
        super().train(mode)
        if self.frozen:  # a frozen encoder stays as it was trained: no dropout, no drop path
            self.backbone.eval()
        return self

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        B, T = clips.shape[:2]
        with torch.no_grad() if self.frozen and torch.is_grad_enabled() else nullcontext():
            tokens = self.backbone.forward_features(clips.flatten(0, 1))
        if tokens.ndim != 3:
            raise ValueError(
                f"backbone {type(self.backbone).__name__}.forward_features gave shape {tuple(tokens.shape)}; the "
                "spatial encoder must return a token sequence (B*T, N, D)"
            )
        return tokens.unflatten(0, (B, T))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frame tokens ``(..., P + N, D)`` -> frame embeddings ``(..., D)``."""
        if self.pool_kind == "token":
            return tokens[..., 0, :]
        return self.patch_tokens(tokens).mean(-2)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frame tokens ``(..., P + N, D)`` -> patch tokens ``(..., N, D)``."""
        return tokens[..., self.num_prefix_tokens :, :]


class TokenAdapter(nn.Module):
    """``queries`` learned queries attend over one frame's patch tokens ``(M, N, dim)`` -> a ``(M, dim)`` update.

    Keys and values are projected to ``adapter_dim`` (default ``dim // 2``), the attention has ``heads`` heads,
    the queries' outputs are concatenated and projected back to ``dim``: each query keeps its own region (a mean
    over the queries would blur where in the frame the content is, which is what camera motion changes).
    """

    def __init__(self, dim: int, queries: int = 4, adapter_dim: int | None = None, heads: int = 1) -> None:
        super().__init__()
        a = adapter_dim or max(8, dim // 2)
        if queries < 1 or heads < 1 or a % heads:
            raise ValueError(f"adapter needs queries >= 1 and heads dividing adapter_dim {a}; got {queries}, {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.zeros(queries, a))
        self.kv = nn.Linear(dim, 2 * a)
        self.proj = nn.Linear(queries * a, dim)
        trunc_normal_(self.queries, std=0.02)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        M, N, _ = patches.shape
        Q, a = self.queries.shape
        h = self.heads
        k, v = self.kv(self.norm(patches)).view(M, N, 2, h, a // h).permute(2, 0, 3, 1, 4)  # (M, h, N, a/h) each
        q = self.queries.view(Q, h, a // h).transpose(0, 1).expand(M, h, Q, a // h)
        out = F.scaled_dot_product_attention(q, k, v)  # (M, h, Q, a/h)
        return self.proj(out.transpose(1, 2).reshape(M, Q * a))


class TemporalTransformer(nn.Module):
    """Frame embeddings ``(B, T, in_dim)`` -> clip embedding ``(B, dim)``.

    ``depth >= 1``: projection, CLS token first, learned position embedding over the ``num_frames + 1`` tokens,
    ``depth`` blocks, the CLS token normed. ``depth == 0``: the projected frames averaged, then normed (order-blind).
    ``blocks`` (optional) are used instead of new timm blocks (``from_blocks`` copies a spatial encoder's).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_frames: int,
        *,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        blocks: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"temporal_depth must be >= 0, got {depth}")
        if dim % num_heads:
            raise ValueError(f"temporal_heads {num_heads} must divide temporal_dim {dim}")
        self.depth, self.num_frames = depth, num_frames
        self.proj = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        if blocks is None:
            blocks = [Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if depth:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, num_frames + 1, dim))
            trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)

    @classmethod
    def from_blocks(
        cls, encoder: nn.Module, in_dim: int, dim: int, depth: int, num_frames: int, backbone: str
    ) -> TemporalTransformer:
        """Temporal transformer whose blocks are exact copies of ``encoder``'s last ``depth`` blocks.

        Raises:
            ValueError: the widths differ, the encoder has fewer blocks, or its blocks are not attention blocks.
        """
        if dim != in_dim:
            raise ValueError(
                f"temporal_init='spatial' copies {backbone!r}'s blocks, which are {in_dim} wide; temporal_dim is {dim} "
                f"(leave temporal_dim unset or set it to {in_dim}, or use temporal_init='random')"
            )
        blocks = attention_blocks(encoder, "temporal_init='spatial'", "isotropic ViTs with timm or vitlab Attention")
        if not 1 <= depth <= len(blocks):
            raise ValueError(
                f"temporal_init='spatial' copies the last temporal_depth blocks; {backbone!r} has {len(blocks)}, "
                f"temporal_depth is {depth}"
            )
        return cls(
            in_dim, dim, depth, num_frames, blocks=[copy.deepcopy(b).requires_grad_(True) for b in blocks[-depth:]]
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.proj(frames)
        if not self.depth:
            return self.norm(x.mean(1))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])
