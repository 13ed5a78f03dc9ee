"""Deformable DETR's decoder with iterative box refinement and per-layer predictions: the DETR-style detectors' neck.

Deformable DETR (Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection",
arXiv:2010.04159, Sec. 4.1 and A.4, https://github.com/fundamentalvision/Deformable-DETR): every layer runs query
self-attention, multi-scale deformable cross-attention (``layers.MultiScaleDeformableAttention``) to the memory
around each query's reference point, and a ReLU FFN, each followed by a residual and a LayerNorm (post-norm). The
first reference points come from the query position embedding (a linear layer and a sigmoid). With iterative box
refinement every layer's box head refines the reference box the next layer samples around (detached between
layers), each layer with its own heads; without it all layers share one class and one box head and keep the first
reference points. Every layer's prediction is returned, the last as the output and the others as
``aux_outputs`` (DETR's auxiliary decoding losses; ``SetCriterion`` takes that dict).

ViDT (Song et al., arXiv:2110.03921, https://github.com/naver-ai/vidt) uses this decoder, without an encoder, as its
neck and also scores the queries before the first layer (``score_queries``: one more pair of heads, whose box
becomes the first layer's reference box). MonoDINO-DETR reuses it.

Deviations: the memory's padding mask is optional and there are no valid ratios (vitlab batches are resized, not
padded); ``torch.logit`` with eps 1e-5 stands for the code's clamped ``inverse_sigmoid``; the level embedding is
added to the memory (ViDT's code creates it but never adds it; Deformable DETR adds it in its encoder).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ...layers import MultiScaleDeformableAttention, flatten_levels

__all__ = ["DeformableDecoder", "DeformableDecoderLayer", "MlpHead", "prior_bias"]


def prior_bias(prior: float = 0.01) -> float:
    """The classifier bias that makes every sigmoid score start at ``prior`` (RetinaNet's focal-loss init)."""
    return -math.log((1 - prior) / prior)


class MlpHead(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head; ViDT's heads without neck)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention, FFN; each + residual + LayerNorm (post-norm)."""

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        # torch's MultiheadAttention keeps Deformable DETR's parameter layout (in_proj_weight, out_proj)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim, act_layer=nn.ReLU, drop=dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tgt`` (B, Q, D) with ``query_pos`` (B or 1, Q, D), references (B, Q, L, 2 or 4) -> (B, Q, D)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm2(tgt + self.drop2(attended))
        return self.norm3(tgt + self.mlp(tgt))


class DeformableDecoder(nn.Module):
    """Queries + multi-scale maps -> ``{"pred_logits", "pred_boxes", "aux_outputs"}`` of every decoding step.

    Args:
        dim: the queries' and the maps' width.
        num_classes: sigmoid class scores per query (no "no object" class).
        num_layers, num_heads, num_levels, num_points, ffn_dim, dropout: the layers' shape (Deformable DETR:
            6, 8, 4, 4, 1024, 0.1).
        box_refine: iterative box refinement (one class and box head per prediction) instead of shared heads and
            fixed reference points.
        score_queries: also predict from the queries before the first layer (ViDT); its box, when ``box_refine``,
            is the first layer's reference box.
    """

    def __init__(
        self,
        dim: int = 256,
        num_classes: int = 91,
        num_layers: int = 6,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        box_refine: bool = True,
        score_queries: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 0 or num_layers + score_queries < 1:
            raise ValueError(f"the decoder needs a prediction: num_layers >= 1 or score_queries, got {num_layers}")
        self.num_levels, self.box_refine, self.score_queries = num_levels, box_refine, score_queries
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(dim, num_heads, num_levels, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.reference_points = nn.Linear(dim, 2)
        heads = num_layers + score_queries if box_refine else 1
        self.class_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(heads))
        self.box_heads = nn.ModuleList(MlpHead(dim, dim, 4, 3) for _ in range(heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official init: Xavier matrices in the layers, the attention's own init, prior class bias, zero box
        deltas except a first box of about sigmoid(-2) = 0.12 of the image."""
        for module in (self.layers, self.reference_points):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.cross_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior_bias())
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        self.box_heads[0].layers[-1].bias[2:] = -2.0

    def _predict(self, i: int, hidden: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prediction ``i``: class logits, and the box as a delta in logit space on the reference point or box."""
        head = i if self.box_refine else 0
        delta = self.box_heads[head](hidden)
        ref = torch.logit(reference, eps=1e-5)
        if reference.shape[-1] == 2:
            ref = torch.cat([ref, torch.zeros_like(ref)], -1)  # a point refines only the centre
        return {"pred_logits": self.class_heads[head](hidden), "pred_boxes": (delta + ref).sigmoid()}

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        maps: Sequence[torch.Tensor],
        padding_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Decode.

        Args:
            tgt: ``(B, Q, dim)`` the queries' content.
            query_pos: ``(B or 1, Q, dim)`` their position embedding (it also gives the first reference points).
            maps: ``num_levels`` maps ``(B, dim, H_l, W_l)``, fine to coarse.
            padding_mask: ``(B, sum H_l W_l)`` bool, True at padded positions, or None.

        Returns:
            ``{"pred_logits": (B, Q, K), "pred_boxes": (B, Q, 4) normalised cxcywh, "aux_outputs": [...]}``, the
            earlier predictions in ``aux_outputs``, first to last.
        """
        if len(maps) != self.num_levels:
            raise ValueError(f"the decoder was built for {self.num_levels} levels, got {len(maps)} maps")
        memory, shapes = flatten_levels(maps)
        memory = memory + torch.cat([e.expand(h * w, -1) for e, (h, w) in zip(self.level_embed, shapes, strict=True)])
        query_pos = query_pos.expand(tgt.shape[0], -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2)
        preds = []
        if self.score_queries:
            preds.append(self._predict(0, tgt, reference))
            if self.box_refine:
                reference = preds[-1]["pred_boxes"].detach()
        for i, layer in enumerate(self.layers, start=int(self.score_queries)):
            ref = reference[:, :, None].expand(-1, -1, self.num_levels, -1)  # the same point on every level
            tgt = layer(tgt, query_pos, ref, memory, shapes, padding_mask)
            preds.append(self._predict(i, tgt, reference))
            if self.box_refine:
                reference = preds[-1]["pred_boxes"].detach()
        return {**preds[-1], "aux_outputs": preds[:-1]}
