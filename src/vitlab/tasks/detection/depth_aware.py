"""MonoDETR's depth-aware transformer decoder (Zhang et al., arXiv:2203.13310, github.com/ZrrSkywalker/MonoDETR).

Each layer first lets the queries cross-attend to the depth memory (depth features plus a depth position embedding),
then runs Deformable DETR's layer (``decoder.py``: self-attention, deformable cross-attention to the visual pyramid,
FFN). Anchors are 6-D boxes ``(u, v, l, r, t, b)``: the projected 3-D centre and its distances to the 2-D box's left,
right, top and bottom sides, normalised, refined by every layer in logit space (detached between layers). Deformable
sampling is around ``(u, v)`` with offsets scaled by ``(l + r, t + b)``. Used by MonoDINO-DETR.

Deviation: without ``depth_attention`` the layers are Deformable DETR's (the ablation's "no depth-aware decoder").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ...layers import flatten_levels
from .decoder import DeformableDecoder, DeformableDecoderLayer, MlpHead

__all__ = ["DepthAwareDecoder"]


class _DepthAwareLayer(DeformableDecoderLayer):
    """Deformable DETR's decoder layer preceded by cross-attention to the depth memory (MonoDETR)."""

    def __init__(self, *args: Any, depth_attention: bool, dropout: float = 0.1) -> None:
        super().__init__(*args, dropout=dropout)
        dim, heads = args[0], args[1]
        self.depth_attn = (
            nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if depth_attention else None
        )
        self.norm_depth = nn.LayerNorm(dim) if depth_attention else None

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, depth_memory=None):
        if self.depth_attn is not None:
            attended = self.depth_attn(tgt + query_pos, depth_memory, depth_memory, need_weights=False)[0]
            tgt = self.norm_depth(tgt + self.drop1(attended))
        return super().forward(tgt, query_pos, reference_points, memory, spatial_shapes)


class DepthAwareDecoder(DeformableDecoder):
    """``DeformableDecoder`` with depth cross-attention and 6-D anchors ``(u, v, l, r, t, b)`` refined per layer.

    ``forward(tgt, query_pos, maps, depth_memory)`` returns one dict per layer: ``"hidden"`` (B, Q, dim),
    ``"pred_logits"`` (B, Q, K) and ``"pred_box6"`` (B, Q, 6) normalised.
    """

    def __init__(self, dim: int, num_classes: int, num_layers: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, dropout: float, depth_attention: bool) -> None:  # fmt: skip
        super().__init__(dim, num_classes, num_layers, num_heads, num_levels, num_points, ffn_dim, dropout)
        args = (dim, num_heads, num_levels, num_points, ffn_dim)
        self.layers = nn.ModuleList(
            _DepthAwareLayer(*args, depth_attention=depth_attention, dropout=dropout) for _ in range(num_layers)
        )
        self.reference_points = nn.Linear(dim, 6)
        self.box_heads = nn.ModuleList(MlpHead(dim, dim, 6, 3) for _ in range(num_layers))
        self.reset_parameters()  # also sets the first head's side distances to about sigmoid(-2)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, maps: Sequence[torch.Tensor],
                depth_memory: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip

        memory, shapes = flatten_levels(maps)
        memory = memory + torch.cat([e.expand(h * w, -1) for e, (h, w) in zip(self.level_embed, shapes, strict=True)])
        query_pos = query_pos.expand(tgt.shape[0], -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        preds = []
        for i, layer in enumerate(self.layers):
            u, v, left, right, top, bottom = reference.unbind(-1)
            around = torch.stack([u, v, left + right, top + bottom], -1)[:, :, None].expand(-1, -1, self.num_levels, -1)
            tgt = layer(tgt, query_pos, around, memory, shapes, depth_memory)
            box6 = (self.box_heads[i](tgt) + torch.logit(reference, eps=1e-5)).sigmoid()
            preds.append({"hidden": tgt, "pred_logits": self.class_heads[i](tgt), "pred_box6": box6})
            reference = box6.detach()
        return preds
