"""Mask2Former-lite: Mask2Former's pixel decoder and masked-attention decoder, and a task model on top.

Paper: "Masked-attention Mask Transformer for Universal Image Segmentation", Cheng et al., arXiv:2112.01527;
official code https://github.com/facebookresearch/Mask2Former (read for understanding; this is written anew).

- ``PixelDecoder``: the multi-scale deformable-attention encoder over the three coarser pyramid levels (input
  projection 1x1 conv + GroupNorm, sine position + level embedding, post-norm Deformable-DETR layers), then one FPN
  step onto the finest level and a 1x1 conv to the per-pixel mask features. ``prepare`` / ``run_layers`` /
  ``finish`` expose the encoder between its layers, which is what early exits need.
- ``MaskedAttentionDecoder``: learnable queries (features + positions); each layer is masked cross-attention
  (a query sees only the pixels its previous prediction holds, sigmoid >= 0.5; a query whose mask is empty sees all),
  then self-attention, then an FFN, all post-norm; the levels are visited round-robin, coarsest first. Class head
  (``num_classes`` + no-object) and a 3-layer MLP mask embedding, dotted with the mask features; predictions before
  the first layer and after every layer (auxiliary outputs).
- ``Mask2Former``: a ``TaskModel`` (backbone by name, ``BackbonePyramid``, the two decoders; matching, set loss
  and inference from ``mask_classification.py``), panoptic + semantic targets, PQ and mIoU; ECO-M2F subclasses it
  (it is not registered itself).

The background is a stuff class (label 0) predicted by the queries like any class, so semantic inference covers all
``num_classes`` labels. Deviations: attention runs through ``layers.attend`` (SDPA); a pyramid with fewer than four
levels gets extra stride-2 conv levels on its coarsest (Deformable DETR's way); panoptic inference gives unclaimed
pixels to the background (see ``panoptic_inference``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ...layers import MultiScaleDeformableAttention, attend, flatten_levels, reference_points_for, sincos_2d_normalized
from .._backbone import BackbonePyramid
from ..base import TaskModel
from .mask_classification import MaskSetCriterion, panoptic_inference, semantic_inference

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["Mask2Former", "MaskedAttentionDecoder", "PixelDecoder"]

Shapes = list[tuple[int, int]]


def _group_norm(dim: int) -> nn.GroupNorm:
    # 32 groups as in the paper; tiny widths keep 2+ channels a group, so a 1 x 1 level of one image still normalises
    return nn.GroupNorm(max(1, math.gcd(32, dim // 2)), dim)


def _sine_positions(shapes: Shapes, dim: int, device: torch.device) -> torch.Tensor:
    """DETR's normalised sine code of every position of every level, ``(1, S, dim)``."""
    return torch.cat([sincos_2d_normalized(hw, dim, device=device).flatten(0, 1) for hw in shapes])[None]


class _EncoderLayer(nn.Module):
    """Deformable-DETR encoder layer (post-norm): deformable self-attention over all levels, then an FFN."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, ffn_dim, act_layer=nn.ReLU, drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor, shapes: Shapes) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x + pos, ref, x, shapes)))
        return self.norm2(x + self.mlp(x))


class PixelDecoder(nn.Module):
    """Pyramid maps ``[finest, *3 coarser]`` (``dim`` wide) -> mask features (finest level) + encoded coarse maps.

    Args:
        num_layers: deformable encoder layers (6 in the paper).
        mask_dim: channels of the mask features (default ``dim``).
    """

    def __init__(
        self,
        dim: int,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        num_levels: int = 3,
        mask_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.num_levels = dim, num_levels
        # ordered coarse to fine, as Mask2Former feeds its encoder
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 1), _group_norm(dim)) for _ in range(num_levels)
        )
        self.level_embed = nn.Parameter(torch.randn(num_levels, dim) * 0.02)
        self.layers = nn.ModuleList(
            _EncoderLayer(dim, num_heads, num_levels, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.lateral = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), _group_norm(dim))
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _group_norm(dim), nn.ReLU())
        self.mask_features = nn.Conv2d(dim, mask_dim or dim, 1)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)

    def prepare(self, maps: Sequence[torch.Tensor]) -> dict[str, Any]:
        """The encoder's input: ``tokens (B, S, dim)`` (input-projected, coarse to fine), ``pos (1, S, dim)``,
        ``ref (1, S, L, 2)``, ``shapes`` and ``fine`` (the finest map, which skips the encoder)."""
        if len(maps) != self.num_levels + 1:
            raise ValueError(f"PixelDecoder takes {self.num_levels + 1} maps (finest first), got {len(maps)}")
        coarse = list(maps[1:])[::-1]
        tokens, shapes = flatten_levels([proj(m) for proj, m in zip(self.input_proj, coarse, strict=True)])
        device = tokens.device
        level = torch.cat([e.expand(h * w, -1) for e, (h, w) in zip(self.level_embed, shapes, strict=True)])
        pos = _sine_positions(shapes, self.dim, device).to(tokens.dtype) + level
        ref = reference_points_for(shapes, device=device).to(tokens.dtype)
        return {"tokens": tokens, "pos": pos, "ref": ref, "shapes": shapes, "fine": maps[0]}

    def run_layers(self, x: torch.Tensor, state: Mapping[str, Any], start: int, stop: int) -> torch.Tensor:
        """Encoder layers ``start .. stop - 1`` on tokens ``x`` (any batch: positions are shared by all images)."""
        for layer in self.layers[start:stop]:
            x = layer(x, state["pos"], state["ref"], state["shapes"])
        return x

    def finish(self, x: torch.Tensor, state: Mapping[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoded tokens -> ``(mask_features (B, mask_dim, h0, w0), [coarse .. fine encoded maps])``."""
        B, C = x.shape[0], x.shape[-1]
        shapes = state["shapes"]
        maps = [
            t.transpose(1, 2).reshape(B, C, h, w)
            for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)
        ]
        fine = state["fine"]
        y = self.lateral(fine) + F.interpolate(maps[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output(y)), maps

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = self.prepare(maps)
        return self.finish(self.run_layers(state["tokens"], state, 0, len(self.layers)), state)


class _Attention(nn.Module):
    """Multi-head attention via ``layers.attend``; ``mask`` is bool ``(B, 1, Q, S)``, True where a query may look."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        B, N, C = q.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, h, L, C / h)
            return t.view(B, t.shape[1], h, C // h).transpose(1, 2)

        out = attend(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)), mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each followed by add & LayerNorm (the paper's order)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = _Attention(dim, num_heads)
        self.self_attn = _Attention(dim, num_heads)
        self.mlp = Mlp(dim, ffn_dim, act_layer=nn.ReLU, drop=dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, query_pos, memory, memory_pos, mask) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.cross_attn(x + query_pos, memory + memory_pos, memory, mask)))
        q = x + query_pos
        x = self.norm2(x + self.drop(self.self_attn(q, q, x)))
        return self.norm3(x + self.mlp(x))


def attention_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits ``(B, Q, h, w)`` -> bool ``(B, 1, Q, H * W)`` at ``size``: True where sigmoid >= 0.5; a query
    whose mask is empty at that size may look everywhere (the paper's fallback)."""
    allowed = F.interpolate(masks.detach(), size=size, mode="bilinear", align_corners=False).flatten(2) >= 0
    return (allowed | ~allowed.any(-1, keepdim=True))[:, None]


class MaskedAttentionDecoder(nn.Module):
    """Queries read the encoded maps with masked attention: -> ``{"pred_logits" (B, Q, K + 1), "pred_masks"
    (B, Q, h0, w0), "aux_outputs": [the same for each earlier prediction]}``.

    Args:
        num_classes: ``K`` classes (stuff and things); one more logit is "no object".
        num_layers: decoder layers, visiting the ``num_levels`` maps round-robin (9 in the paper).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_queries: int = 100,
        num_layers: int = 9,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_levels: int = 3,
        mask_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.num_levels = dim, num_levels
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(num_levels, dim)
        self.layers = nn.ModuleList(_DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        mask_dim = mask_dim or dim
        self.mask_head = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, mask_dim)
        )

    def predict(self, x: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``(B, Q, dim)`` -> class logits ``(B, Q, K + 1)`` and mask logits ``(B, Q, h0, w0)``."""
        x = self.norm(x)
        return self.class_head(x), torch.einsum("bqc,bchw->bqhw", self.mask_head(x), mask_features)

    def forward(self, maps: Sequence[torch.Tensor], mask_features: torch.Tensor) -> dict[str, Any]:
        """``maps``: encoded levels, coarse to fine, ``dim`` wide; ``mask_features`` ``(B, mask_dim, h0, w0)``."""
        if len(maps) != self.num_levels:
            raise ValueError(f"the decoder reads {self.num_levels} levels, got {len(maps)}")
        B = mask_features.shape[0]
        sizes = [(m.shape[-2], m.shape[-1]) for m in maps]
        memory = [m.flatten(2).transpose(1, 2) + e for m, e in zip(maps, self.level_embed.weight, strict=True)]
        pos = [_sine_positions([hw], self.dim, mask_features.device).to(mask_features.dtype) for hw in sizes]
        x = self.query_feat.weight[None].expand(B, -1, -1)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        preds = [self.predict(x, mask_features)]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            x = layer(x, query_pos, memory[level], pos[level], attention_mask(preds[-1][1], sizes[level]))
            preds.append(self.predict(x, mask_features))
        aux = [{"pred_logits": c, "pred_masks": m} for c, m in preds[:-1]]
        return {"pred_logits": preds[-1][0], "pred_masks": preds[-1][1], "aux_outputs": aux}


class Mask2Former(TaskModel):
    """Backbone (by name) + pyramid + ``PixelDecoder`` + ``MaskedAttentionDecoder``, trained with the set loss.

    ``forward(image)`` -> ``{"pred_logits" (B, Q, K + 1), "pred_masks" (B, Q, H/s, W/s), "aux_outputs"}`` with
    ``s`` the pyramid's finest stride (4). Targets: ``"masks"``/``"labels"`` (things, labels 0..K-2) for the loss,
    ``"semantic"`` and ``"panoptic"`` (instance ids) for the metrics.

    Args:
        num_classes: ``K`` with the background (a stuff class, label 0); thing class ``k`` is label ``k + 1``.
        dim: width of the pyramid, encoder, decoder and mask features.
        object_threshold, overlap_threshold: Mask2Former's panoptic inference thresholds.
    """

    task_name = "mask2former"
    target_keys = ("semantic", "panoptic", "masks", "labels")
    primary_metric = "pq"
    higher_is_better = True

    def __init__(
        self,
        backbone: str = "tiny_vit_1m_28",
        *,
        num_classes: int = 11,
        in_chans: int = 1,
        img_size: int = 64,
        dim: int = 64,
        num_queries: int = 16,
        encoder_layers: int = 6,
        encoder_heads: int = 4,
        encoder_points: int = 4,
        encoder_ffn: int = 256,
        decoder_layers: int = 6,
        decoder_heads: int = 4,
        decoder_ffn: int = 256,
        object_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        backbone_kwargs: dict[str, Any] | None = None,
        isotropic_maps: int | str = 1,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one thing (>= 2), got {num_classes}")
        self.pyramid = BackbonePyramid(
            backbone, in_chans=in_chans, img_size=img_size, out_channels=dim,
            backbone_kwargs=backbone_kwargs, isotropic_maps=isotropic_maps,
        )  # fmt: skip
        self.mask_stride = int(self.pyramid.out_strides[0])
        self.extra_levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, 2, 1), _group_norm(dim))
            for _ in range(max(0, 4 - len(self.pyramid.out_strides)))
        )
        self.pixel_decoder = PixelDecoder(dim, encoder_layers, encoder_heads, encoder_points, encoder_ffn)
        self.decoder = MaskedAttentionDecoder(dim, num_classes, num_queries, decoder_layers, decoder_heads, decoder_ffn)
        self.criterion = MaskSetCriterion(num_classes)
        self.object_threshold, self.overlap_threshold = object_threshold, overlap_threshold

    def encoder_input(self, image: torch.Tensor) -> dict[str, Any]:
        """Image -> the encoder's input state (``PixelDecoder.prepare``) of the four pyramid levels."""
        maps = self.pyramid(image)[:4]
        for extra in self.extra_levels:
            maps.append(extra(maps[-1]))
        return self.pixel_decoder.prepare(maps)

    def decode(self, x: torch.Tensor, state: Mapping[str, Any]) -> dict[str, Any]:
        """Encoded tokens -> the decoder's output."""
        mask_features, maps = self.pixel_decoder.finish(x, state)
        return self.decoder(maps, mask_features)

    def forward_image(self, image: torch.Tensor) -> dict[str, Any]:
        state = self.encoder_input(image)
        return self.decode(
            self.pixel_decoder.run_layers(state["tokens"], state, 0, len(self.pixel_decoder.layers)), state
        )

    def targets(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image the segments to match: the background (label 0, where no thing is) and the things (``k + 1``)."""
        masks, labels, image = batch.get("masks"), batch.get("labels"), batch.get("image")
        B = len(image) if torch.is_tensor(image) else None
        if not isinstance(masks, Sequence) or not isinstance(labels, Sequence) or not len(masks) == len(labels) == B:
            raise ValueError("batch['masks'] and batch['labels'] must be lists with one entry per image")
        out = []
        for b, (m, lab) in enumerate(zip(masks, labels, strict=True)):
            if not torch.is_tensor(m) or m.dtype != torch.bool or m.ndim != 3 or m.shape[0] != len(lab):
                raise ValueError(f"batch['masks'][{b}] must be bool (M, H, W) with M = len(labels[{b}]) = {len(lab)}")
            ok = torch.is_tensor(lab) and lab.dtype == torch.long and lab.ndim == 1
            if not ok or (len(lab) and not 0 <= int(lab.min()) <= int(lab.max()) < self.num_classes - 1):
                raise ValueError(f"batch['labels'][{b}] must be int64 thing labels in 0..{self.num_classes - 2}")
            background = ~m.any(0, keepdim=True)
            keep = [background] if bool(background.any()) else []
            out.append({"labels": torch.cat([lab.new_zeros(len(keep)), lab + 1]), "masks": torch.cat([*keep, m])})
        return out

    def loss(self, output: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Mask2Former's set loss (``MaskSetCriterion``) over the final and auxiliary predictions."""
        return self.criterion(output, self.targets(batch))

    def predict(self, output: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"semantic", "category", "instance"}`` (B, H, W) int64 at the image size."""
        logits = output["pred_logits"]
        masks = F.interpolate(output["pred_masks"], scale_factor=self.mask_stride, mode="bilinear", align_corners=False)
        things = range(1, self.num_classes)
        category, instance = panoptic_inference(logits, masks, things, self.object_threshold, self.overlap_threshold)
        return {"semantic": semantic_inference(logits, masks).argmax(1), "category": category, "instance": instance}

    def postprocess(self, output: Mapping[str, Any]) -> dict[str, Any]:
        """``"semantic"`` (B, H, W), ``"panoptic"`` (B, H, W) instance ids, per image thing ``"masks"`` (n, H, W)
        bool and ``"labels"`` (n,) int64 (thing classes 0..K-2)."""
        pred = self.predict(output)
        masks, labels = [], []
        for category, instance in zip(pred["category"], pred["instance"], strict=True):
            ids = instance.unique()
            m = instance == ids[ids > 0][:, None, None]
            masks.append(m)
            labels.append(torch.stack([category[s].flatten()[0] - 1 for s in m]) if len(m) else ids.new_zeros(0))
        return {"semantic": pred["semantic"], "panoptic": pred["instance"], "masks": masks, "labels": labels}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassJaccardIndex
        from torchmetrics.detection import PanopticQuality

        pq = PanopticQuality(set(range(1, self.num_classes)), {0}, return_sq_and_rq=True)
        return MetricCollection({"pq": pq, "miou": MulticlassJaccardIndex(self.num_classes, average="macro")})

    def update_metrics(self, metrics: MetricCollection, output: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        semantic, panoptic = batch.get("semantic"), batch.get("panoptic")
        pred = self.predict(output)
        shape = tuple(pred["semantic"].shape)
        for key, t in (("semantic", semantic), ("panoptic", panoptic)):
            if not torch.is_tensor(t) or tuple(t.shape) != shape or t.dtype != torch.long:
                raise ValueError(f"batch[{key!r}] must be int64 {shape}")
        device = metrics["miou"].device
        target = torch.stack([semantic, panoptic], -1).to(device)
        metrics["pq"].update(torch.stack([pred["category"], pred["instance"]], -1).to(device), target)
        metrics["miou"].update(pred["semantic"].to(device), semantic.to(device))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``pq``, ``sq``, ``rq`` (things and the background stuff) and ``miou``, in percent."""
        pq, sq, rq = (0.0 if math.isnan(v) else 100.0 * v for v in metrics["pq"].compute().tolist())
        return {"pq": pq, "sq": sq, "rq": rq, "miou": 100.0 * float(metrics["miou"].compute())}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Any]:
        """1-3 overlapping rectangles of random thing classes per image on a background, class-coloured plus noise."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        S = self.img_size
        panoptic = torch.zeros(batch_size, S, S, dtype=torch.long)
        labels = []
        for b in range(batch_size):
            drawn = torch.randint(0, self.num_classes - 1, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
            for i in range(len(drawn)):  # painter's order: later rectangles hide earlier ones
                h, w = torch.randint(S // 4, S // 2 + 1, (2,), generator=g).tolist()
                y, x = torch.randint(0, S - max(h, w) + 1, (2,), generator=g).tolist()
                panoptic[b, y : y + h, x : x + w] = i + 1
            visible = [i for i in range(len(drawn)) if bool((panoptic[b] == i + 1).any())]
            renumber = torch.zeros(len(drawn) + 1, dtype=torch.long)
            renumber[[i + 1 for i in visible]] = torch.arange(1, len(visible) + 1)
            panoptic[b] = renumber[panoptic[b]]
            labels.append(drawn[visible])
        masks = [p == torch.arange(1, len(lab) + 1).view(-1, 1, 1) for p, lab in zip(panoptic, labels, strict=True)]
        semantic = torch.stack(
            [torch.cat([lab.new_zeros(1), lab + 1])[p] for p, lab in zip(panoptic, labels, strict=True)]
        )
        palette = torch.randn(self.num_classes, self.in_chans, generator=g)
        image = palette[semantic].permute(0, 3, 1, 2) + 0.1 * torch.randn(batch_size, self.in_chans, S, S, generator=g)
        return {
            "image": image.contiguous(),
            "semantic": semantic,
            "panoptic": panoptic,
            "masks": masks,
            "labels": labels,
        }
