"""MonoDINO-DETR (Kim et al., "MonoDINO-DETR: Depth-Enhanced Monocular 3D Object Detection Using a Vision Foundation
Model", IEEE IV 2025, arXiv:2502.00315, github.com/JihyeokKim/MonoDINO-DETR), built on MonoDETR (Zhang et al.,
arXiv:2203.13310, github.com/ZrrSkywalker/MonoDETR). Task ``"monodino_detr"``.

- **ViT backbone** (any isotropic vitlab / timm ViT by name): three blocks spread over the depth are tapped and
  reshaped to maps. The paper takes Depth-Anything-V2's DINOv2 and freezes it (``freeze_backbone=True`` freezes
  backbone and DPT head). Those weights cannot be downloaded here: ``benchmarks/monodino_detr.py`` first trains
  backbone + DPT on FMNIST-Scenes-3D depth, then freezes them.
- **Depth branch** (``depth_head``): a DPT head (``layers/dpt.py``, on the pyramid's factors) predicts relative
  depth; a small CNN on it (at the patch grid) classifies each cell into LID bins (``mono3d.py``: ``depth_bins`` over
  ``depth_range``, plus an out-of-range bin), trained with a focal loss on valid pixels; the expected bin value is
  the depth map.
- **Hierarchical feature fusion**: the taps projected to a pyramid (``level_factors`` times the patch grid) go
  through a light RT-DETR hybrid encoder (``hybrid_encoder.py``).
- **Depth-aware decoder** (MonoDETR's): per layer, queries cross-attend to the depth embeddings (``depth_attention``:
  one self-attention layer over the depth features plus a depth embedding interpolated at the predicted depth), then
  self-attend, then deformable-attend to the visual pyramid (``decoder.py``'s layer, subclassed). Anchors are
  MonoDETR's 6-D boxes ``(u, v, l, r, t, b)``: projected 3-D centre and its distances to the 2-D box's sides,
  refined per layer in logit space; deformable sampling is around ``(u, v)`` scaled by ``(l + r, t + b)``.
- **Heads** per layer: sigmoid class, 6-D box, 3-D size ``(w, h, l)`` (exp of the output, metres), heading (12 bins
  + residual of the observation angle), regressed depth ``1 / sigmoid(x) - 1`` with a log-variance. Object depth is
  the mean of the regressed depth, the depth map at the (detached) projected centre (``depth_head``) and the geometric
  depth ``f_y h / h_2d`` (``geometric_depth``, from the batch's intrinsics).
- **Loss**: ``SetCriterion`` (focal class 2, L1 5, GIoU 2 on the 2-D box; matching on class + 2-D box) on every
  layer, and on the same matched pairs projected centre L1 10, log-size L1 1, heading CE + L1 1, Laplacian
  depth 1; depth-map focal loss 1. Metrics: centre-distance AP at 0.5 / 1 / 2 m (primary: their mean
  ``ap_center``), matched depth AbsRel and 3-D centre error, and 2-D ``map_50``.

Deviations and reconstructions: matching omits MonoDETR's 3-D centre cost (``SetCriterion``'s matcher); anchors
come from the query position embedding (MonoDETR) rather than DAB's learned ones; 3-D size is a direct head with an
L1 loss on its log (MonoDETR: refined per layer from a mean size, dimension-aware L1); AIFI and the depth encoder use
post-norm attention with 2-D sine positions; the finest level is at half the patch stride by default (the code: a
quarter), for CPU cost; the depth-map loss covers every valid pixel (dense synthetic depth; MonoDETR: object boxes
only, from box depths); no denoising queries. ``DepthAwareDecoder`` lives in ``depth_aware.py``, the geometry, losses
and toy scenes in ``mono3d.py``, the metric in ``metrics3d.py``. Without intrinsics in the batch, ``postprocess``
uses ``default_camera`` (FMNIST-Scenes-3D's nominal camera).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert

from ...layers import DPTHead, resample_conv
from ...models import Paper
from .._backbone import _spread, create_backbone, feature_dicts
from .._registry import register_task
from ..base import TaskModel, TaskSpec
from .criterion import SetCriterion, targets_from_batch
from .decoder import MlpHead
from .depth_aware import DepthAwareDecoder
from .hybrid_encoder import AttentionEncoderLayer, HybridEncoder
from .matcher import HungarianMatcher
from .mono3d import (
    alpha_to_yaw,
    check_intrinsics,
    heading_decode,
    heading_encode,
    laplacian_depth_loss,
    lid_bins,
    lid_focal_loss,
    toy_scenes,
    yaw_to_alpha,
)

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["MonoDINODETR"]

PAPER = Paper(
    32,
    "MonoDINO-DETR: Depth-Enhanced Monocular 3D Object Detection Using a Vision Foundation Model",
    "2502.00315",
    "https://github.com/JihyeokKim/MonoDINO-DETR",
    kind="H",
)
# MonoDINO-DETR's 3-D loss weights (configs/monodinodetr.yaml); the 2-D ones are SetCriterion's defaults
WEIGHTS_3D = {"loss_center": 10.0, "loss_dims": 1.0, "loss_angle": 1.0, "loss_depth": 1.0, "loss_depth_map": 1.0}


class _RecordingMatcher(HungarianMatcher):
    """The Hungarian matcher; while ``recorded`` is a list, it keeps each assignment so the 3-D terms score the
    pairs the 2-D terms scored."""

    recorded: list | None = None

    def forward(self, pred_logits, pred_boxes, targets):
        indices = super().forward(pred_logits, pred_boxes, targets)
        if self.recorded is not None:
            self.recorded.append(indices)
        return indices


class MonoDINODETR(TaskModel):
    """ViT + DPT depth + hybrid encoder + depth-aware DETR decoder -> 3-D boxes (see the module doc).

    ``forward`` returns the last layer's ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) normalised cxcywh,
    ``pred_center`` (B, Q, 2) normalised, ``pred_dims`` (B, Q, 3) metres, ``pred_angle`` (B, Q, 2 bins),
    ``pred_depth_reg`` (B, Q, 2) (depth, log-variance), ``depth_map_at`` / ``geo_ratio`` (B, Q) with their cues;
    ``aux_outputs`` for the earlier layers; ``depth_logits`` (B, N + 1, h, w), ``depth_map`` (B, h, w) and
    ``relative_depth`` (B, 1, H, W) with ``depth_head``; ``intrinsics`` when called on a batch that holds them.

    Args:
        num_queries, dim, decoder_layers, decoder_heads, decoder_points, ffn_dim, dropout: the detector (paper: 50,
            256, 3, 8, 4, 256, 0.1).
        level_factors: the pyramid levels' sizes as multiples of the patch grid, fine to coarse.
        dpt_features: the DPT head's fusion width.
        depth_bins, depth_range: LID bins over ``(d_min, d_max)`` metres (paper: 80 over 0.001-60 m).
        heading_bins: heading classes (MonoDETR: 12).
        depth_head, depth_attention, geometric_depth: the depth cues (ablation switches).
        freeze_backbone: freeze the backbone and the DPT head (the paper's frozen foundation model).
        default_camera: ``(f / H, c_x / W, c_y / H)`` assumed where a batch has no intrinsics.
    """

    task_name = "monodino_detr"
    batch_keys = ("image", "intrinsics")
    target_keys = ("boxes", "labels", "boxes3d", "centers2d")
    primary_metric = "ap_center"
    higher_is_better = True

    def __init__(self, backbone: str = "vit_micro_patch4_28", *, num_classes: int = 11, in_chans: int = 1,
                 img_size: int = 96, backbone_kwargs: dict[str, Any] | None = None, num_queries: int = 50,
                 dim: int = 256, decoder_layers: int = 3, decoder_heads: int = 8, decoder_points: int = 4,
                 ffn_dim: int = 256, dropout: float = 0.1, level_factors: Sequence[float] = (2, 1, 0.5),
                 dpt_features: int = 64, depth_bins: int = 40, depth_range: tuple[float, float] = (1.0, 30.0),
                 heading_bins: int = 12, depth_head: bool = True, depth_attention: bool = True,
                 geometric_depth: bool = True, freeze_backbone: bool = False,
                 default_camera: tuple[float, float, float] = (1.0, 0.5, 0.3)) -> None:  # fmt: skip
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class (>= 2), got {num_classes}")
        if depth_attention and not depth_head:
            raise ValueError("depth_attention attends to the depth head's embeddings: it needs depth_head=True")
        self.num_things, self.num_queries, self.heading_bins = num_classes - 1, num_queries, heading_bins
        self.depth_bins, self.depth_range = depth_bins, (float(depth_range[0]), float(depth_range[1]))
        self.use_geometric, self.default_camera = geometric_depth, tuple(default_camera)
        self.backbone = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        info = feature_dicts(self.backbone)
        if len({d["reduction"] for d in info}) != 1:
            raise ValueError(
                f"backbone {backbone!r} is hierarchical; MonoDINO-DETR taps three blocks of a plain (isotropic) ViT, "
                "as DPT does: use e.g. vit_micro_patch4_28 or vir_nano_patch4_28"
            )
        self.taps = _spread(3, len(info))
        self.backbone.prune_intermediate_layers(sorted(set(self.taps)), prune_norm=True, prune_head=True)
        width, self.level_factors = int(info[-1]["num_chs"]), tuple(level_factors)
        self.input_proj = nn.ModuleList(
            nn.Sequential(resample_conv(width, dim, f), nn.GroupNorm(math.gcd(32, dim), dim)) for f in level_factors
        )
        self.encoder = HybridEncoder(dim, len(level_factors), decoder_heads, ffn_dim, dropout)
        self.dpt = self.depth_cnn = self.depth_encoder = self.depth_embed = None
        if depth_head:
            self.dpt = DPTHead(width, self.level_factors, features=dpt_features)  # the pyramid's factors

            def block(c_in: int) -> list[nn.Module]:
                return [nn.Conv2d(c_in, dim, 3, padding=1), nn.GroupNorm(math.gcd(32, dim), dim), nn.ReLU()]

            self.depth_cnn = nn.Sequential(*block(1), *block(dim), *block(dim))
            self.depth_classifier = nn.Conv2d(dim, depth_bins + 1, 1)
            self.register_buffer("bin_values", lid_bins(depth_bins, *self.depth_range)[1], persistent=False)
            if depth_attention:
                self.depth_encoder = AttentionEncoderLayer(dim, decoder_heads, dim, dropout)
                self.depth_embed = nn.Embedding(int(self.depth_range[1]) + 1, dim)
        if freeze_backbone:
            for module in (self.backbone, self.dpt):
                if module is not None:
                    module.requires_grad_(False)
        self.query_embed = nn.Embedding(num_queries, 2 * dim)  # content and position halves
        self.decoder = DepthAwareDecoder(dim, self.num_things, decoder_layers, decoder_heads, len(level_factors),
                                         decoder_points, ffn_dim, dropout, depth_attention)  # fmt: skip
        self.dims_heads = nn.ModuleList(MlpHead(dim, dim, 3, 2) for _ in range(decoder_layers))
        self.angle_heads = nn.ModuleList(MlpHead(dim, dim, 2 * heading_bins, 2) for _ in range(decoder_layers))
        self.depth_heads = nn.ModuleList(MlpHead(dim, dim, 2, 2) for _ in range(decoder_layers))
        self.criterion = SetCriterion(self.num_things, matcher=_RecordingMatcher())

    def forward(self, batch_or_image: torch.Tensor | Mapping[str, Any]) -> dict[str, Any]:
        out = super().forward(batch_or_image)
        if isinstance(batch_or_image, Mapping) and "intrinsics" in batch_or_image:
            out["intrinsics"] = check_intrinsics(batch_or_image, batch_or_image["image"].shape[0])
        return out

    def forward_image(self, image: torch.Tensor) -> dict[str, Any]:
        """``(B, C, H, W)`` -> the output dict (see the class doc)."""
        H, W = image.shape[-2:]
        unique = sorted(set(self.taps))
        feats = self.backbone.forward_intermediates(image, indices=unique, intermediates_only=True)
        taps = [feats[unique.index(t)] for t in self.taps]
        maps = self.encoder([proj(t) for proj, t in zip(self.input_proj, taps, strict=True)])
        out: dict[str, Any] = {}
        depth_memory = depth_map = None
        if self.dpt is not None:
            relative, _ = self.dpt(taps, (H, W))
            grid = taps[-1].shape[-2:]  # MonoDETR reads depth at the patch grid
            feat = self.depth_cnn(F.interpolate(relative, size=grid, mode="bilinear", align_corners=False))
            logits = self.depth_classifier(feat)
            depth_map = (logits.softmax(1) * self.bin_values[:, None, None]).sum(1)
            out.update(relative_depth=relative, depth_logits=logits, depth_map=depth_map)
            if self.depth_encoder is not None:
                depth_memory = (self.depth_encoder(feat) + self._depth_embedding(depth_map)).flatten(2).transpose(1, 2)
        content, pos = self.query_embed.weight[None].split(self.query_embed.embedding_dim // 2, -1)
        layers = self.decoder(content.expand(image.shape[0], -1, -1), pos, maps, depth_memory)
        preds = [self._heads(i, p, depth_map, H) for i, p in enumerate(layers)]
        return {**out, **preds[-1], "aux_outputs": preds[:-1]}

    def _depth_embedding(self, depth: torch.Tensor) -> torch.Tensor:
        """MonoDETR's depth position embedding: the table linearly interpolated at each cell's depth -> (B, C, h, w)."""
        d = depth.clamp(0, self.depth_embed.num_embeddings - 1)
        lo = d.floor()
        frac = (d - lo)[..., None]
        lo = lo.long()
        hi = (lo + 1).clamp(max=self.depth_embed.num_embeddings - 1)
        return (self.depth_embed(lo) * (1 - frac) + self.depth_embed(hi) * frac).permute(0, 3, 1, 2)

    def _heads(self, i: int, layer: dict[str, torch.Tensor], depth_map: torch.Tensor | None, H: int) -> dict:
        h, box6 = layer["hidden"], layer["pred_box6"]
        u, v, left, right, top, bottom = box6.unbind(-1)
        xyxy = torch.stack([u - left, v - top, u + right, v + bottom], -1)
        dims = self.dims_heads[i](h).exp()
        pred = {
            "pred_logits": layer["pred_logits"],
            "pred_boxes": box_convert(xyxy, "xyxy", "cxcywh"),
            "pred_center": box6[..., :2],
            "pred_dims": dims,
            "pred_angle": self.angle_heads[i](h),
            "pred_depth_reg": self.depth_heads[i](h),
        }
        if depth_map is not None:  # grid_sample's (x, y) in [-1, 1]; the centre is detached as in MonoDETR
            where = (box6[..., :2].detach() * 2 - 1)[:, :, None]
            pred["depth_map_at"] = F.grid_sample(depth_map[:, None], where, align_corners=False)[:, 0, :, 0]
        if self.use_geometric:  # metres per focal pixel: times f_y gives the geometric depth
            pred["geo_ratio"] = dims[..., 1] / ((top + bottom) * H).clamp(min=1.0)
        return pred

    def object_depth(self, pred: Mapping[str, torch.Tensor], fy: torch.Tensor) -> torch.Tensor:
        """Each query's depth (B, Q): the mean of its available cues; ``fy`` (B,) the focal lengths in pixels."""
        cues = [1.0 / (pred["pred_depth_reg"][..., 0].sigmoid() + 1e-6) - 1.0]
        if "depth_map_at" in pred:
            cues.append(pred["depth_map_at"])
        if "geo_ratio" in pred:
            cues.append(pred["geo_ratio"] * fy[:, None])
        return torch.stack(cues).mean(0)

    def _centers3d(self, pred: Mapping[str, torch.Tensor], K: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Camera-frame centres (B, Q, 3): the projected centre back-projected at the object depth."""
        z = self.object_depth(pred, K[:, 1, 1])
        u = pred["pred_center"][..., 0] * size[1]
        v = pred["pred_center"][..., 1] * size[0]
        x = (u - K[:, None, 0, 2]) * z / K[:, None, 0, 0]
        y = (v - K[:, None, 1, 2]) * z / K[:, None, 1, 1]
        return torch.stack([x, y, z], -1)

    def _targets(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        image = batch.get("image")
        size = (int(image.shape[-2]), int(image.shape[-1])) if torch.is_tensor(image) else (self.img_size,) * 2
        targets = targets_from_batch(batch, size, self.num_things)
        for key, width in (("boxes3d", 7), ("centers2d", 2)):
            values = batch.get(key)
            if not isinstance(values, Sequence) or len(values) != len(targets):
                raise ValueError(f"batch must hold '{key}' as a list of ({width},)-row tensors, one per image")
            for b, (t, x) in enumerate(zip(targets, values, strict=True)):
                if not torch.is_tensor(x) or x.shape != (len(t["labels"]), width):
                    raise ValueError(
                        f"batch['{key}'][{b}] must be ({len(t['labels'])}, {width}), got {getattr(x, 'shape', x)}"
                    )
                t[key] = x.float()
        for t in targets:
            t["centers2d"] = t["centers2d"] / t["centers2d"].new_tensor([size[1], size[0]])
        return targets

    def _terms_3d(self, pred: Mapping[str, torch.Tensor], targets: list[dict], indices: list, K: torch.Tensor,
                  num: float) -> dict[str, torch.Tensor]:  # fmt: skip
        b = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(K.device)
        q = torch.cat([q for q, _ in indices]).to(K.device)
        tgt = {
            k: torch.cat([t[k][m] for t, (_, m) in zip(targets, indices, strict=True)]).to(K)
            for k in ("boxes3d", "centers2d")
        }
        box = tgt["boxes3d"]
        alpha_bin, alpha_res = heading_encode(yaw_to_alpha(box[:, 6], box[:, 0], box[:, 2]), self.heading_bins)
        angle = pred["pred_angle"][b, q]
        nb = self.heading_bins
        depth = self.object_depth(pred, K[:, 1, 1])[b, q]
        residual = F.l1_loss(angle[:, nb:].gather(1, alpha_bin[:, None])[:, 0], alpha_res, reduction="sum")
        return {
            "loss_center": F.l1_loss(pred["pred_center"][b, q], tgt["centers2d"], reduction="sum") / num,
            "loss_dims": (pred["pred_dims"][b, q].log() - box[:, 3:6].clamp(min=1e-3).log()).abs().sum() / num,
            "loss_angle": (F.cross_entropy(angle[:, :nb], alpha_bin, reduction="sum") + residual) / num,
            "loss_depth": laplacian_depth_loss(depth, pred["pred_depth_reg"][b, q, 1], box[:, 2]).sum() / num,
        }  # fmt: skip

    def loss(self, output: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``SetCriterion`` on every layer + the 3-D terms on its matched pairs + the LID depth-map loss."""
        K = check_intrinsics(batch, output["pred_logits"].shape[0]).to(output["pred_logits"])
        targets = self._targets(batch)
        self.criterion.matcher.recorded = []
        try:
            logs = self.criterion(output, targets)
            recorded = self.criterion.matcher.recorded
        finally:
            self.criterion.matcher.recorded = None
        total = logs.pop("loss")
        num = float(max(sum(len(t["labels"]) for t in targets), 1))
        layers = [(output, "")] + [(a, f"_{i}") for i, a in enumerate(output.get("aux_outputs", []))]
        for (pred, suffix), indices in zip(layers, recorded, strict=True):
            for name, value in self._terms_3d(pred, targets, indices, K, num).items():
                total = total + WEIGHTS_3D[name] * value
                logs[name + suffix] = value.detach()
        if "depth_logits" in output:
            depth = batch.get("depth")
            if not torch.is_tensor(depth) or depth.shape != (K.shape[0], *batch["image"].shape[-2:]):
                raise ValueError("batch must hold 'depth' float (B, H, W) (0 = no depth) for the depth head's loss")
            value = lid_focal_loss(output["depth_logits"], depth.to(K), self.depth_bins, *self.depth_range)
            total = total + WEIGHTS_3D["loss_depth_map"] * value
            logs["loss_depth_map"] = value.detach()
        return {"loss": total, **logs}

    def _detections(self, output: Mapping[str, Any], K: torch.Tensor, size: tuple[int, int]) -> list[dict]:
        """Top ``num_queries`` (query, class) pairs per image, each with its query's 2-D box and 3-D box."""
        from .metrics import postprocess_detections

        logits = output["pred_logits"]
        dets = postprocess_detections(
            logits, output["pred_boxes"], size, top_k=min(self.num_queries, logits[0].numel())
        )
        centers = self._centers3d(output, K, size).detach().float()
        alpha = heading_decode(*output["pred_angle"].float().split(self.heading_bins, -1))
        u = output["pred_center"][..., 0].float() * size[1]
        yaw = alpha_to_yaw(alpha, u, K[:, None, 0, 2], K[:, None, 0, 0])
        boxes3d = torch.cat([centers, output["pred_dims"].float(), yaw[..., None]], -1).detach()
        # the same top-k as postprocess_detections, for the query of each detection
        _, flat = logits.detach().float().sigmoid().flatten(1).topk(dets[0]["scores"].numel(), dim=1)
        query = flat // logits.shape[-1]
        scale = torch.tensor([size[1], size[0]], dtype=torch.float32)
        for b, d in enumerate(dets):
            d["boxes3d"] = boxes3d[b, query[b]]
            d["centers2d"] = output["pred_center"][b, query[b]].detach().float() * scale
        return dets

    def _camera(self, output: Mapping[str, Any], batch_size: int) -> torch.Tensor:
        if "intrinsics" in output:
            return output["intrinsics"].float()
        f, cx, cy = self.default_camera
        s = float(self.img_size)
        return torch.tensor([[f * s, 0, cx * s], [0, f * s, cy * s], [0, 0, 1]]).expand(batch_size, 3, 3)

    def postprocess(self, output: Mapping[str, Any]) -> dict[str, list[torch.Tensor]]:
        """Per image ``boxes`` (k, 4) pixel xyxy, ``labels``, ``scores``, ``boxes3d`` (k, 7), ``centers2d`` (k, 2)."""
        B = output["pred_logits"].shape[0]
        dets = self._detections(output, self._camera(output, B), (self.img_size, self.img_size))
        return {key: [d[key] for d in dets] for key in ("boxes", "labels", "scores", "boxes3d", "centers2d")}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection

        from .metrics import DetectionMetrics
        from .metrics3d import Mono3DMetrics

        return MetricCollection({"mono3d": Mono3DMetrics(), "detection": DetectionMetrics()})

    def update_metrics(self, metrics: MetricCollection, output: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        H, W = (int(s) for s in batch["image"].shape[-2:])
        K = check_intrinsics(batch, batch["image"].shape[0]).float().to(output["pred_logits"].device)
        targets = self._targets(batch)
        dets = self._detections(output, K, (H, W))
        device = next(iter(metrics.values())).device
        indices = self.criterion.matcher(output["pred_logits"], output["pred_boxes"], targets)
        centers = self._centers3d(output, K, (H, W)).detach().float().cpu()
        pairs = [
            (centers[b, q], t["boxes3d"][m, :3].cpu())
            for b, ((q, m), t) in enumerate(zip(indices, targets, strict=True))
        ]
        matched = (torch.cat([p for p, _ in pairs]), torch.cat([g for _, g in pairs]))
        metrics["mono3d"].update(
            [{"centers": d["boxes3d"][:, :3], "scores": d["scores"], "labels": d["labels"]} for d in dets],
            [{"centers": t["boxes3d"][:, :3], "labels": t["labels"]} for t in targets],
            matched,
        )
        scale = torch.tensor([W, H, W, H], dtype=torch.float32)
        metrics["detection"].update(
            [{k: d[k].to(device) for k in ("boxes", "scores", "labels")} for d in dets],
            [{"boxes": (box_convert(t["boxes"].float().cpu(), "cxcywh", "xyxy") * scale).to(device),
              "labels": t["labels"].to(device)} for t in targets],
        )  # fmt: skip

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list | None]:
        """``ap_center`` (mean of ``ap_center_0.5/1/2``), ``depth_abs_rel``, ``center_error`` (m), 2-D ``map_50``."""
        summary: dict[str, Any] = dict(metrics["mono3d"].compute())
        summary["map_50"] = metrics["detection"].compute().get("map_50") or 0.0
        return summary

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Upright boards (1-3 per image, the last image empty) on a ground plane, with every 3-D target."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        return toy_scenes(batch_size, self.img_size, self.in_chans, self.num_things, self.num_queries, g)


register_task(
    TaskSpec(
        name="monodino_detr",
        task="detection3d",
        builder=MonoDINODETR,
        metric="ap_center",
        paper=PAPER,
        ref_metric=19.19,
        ref_source="KITTI val Car AP3D|R40 moderate (official README, ViT-B Depth-Anything-V2); a different metric",
        dataset="fmnist_scenes_3d",
        img_size=96,
        default_backbone="vit_micro_patch4_28",
        description="ViT + DPT/LID depth + RT-DETR-style fusion + MonoDETR depth-aware decoder (monocular 3-D boxes)",
        test_backbones=("vit_micro_patch4_28", "vir_nano_patch4_28"),
        test_kwargs={
            "img_size": 32,
            "num_queries": 6,
            "dim": 32,
            "decoder_layers": 2,
            "decoder_heads": 2,
            "decoder_points": 2,
            "ffn_dim": 32,
            "dpt_features": 16,
            "depth_bins": 8,
            "heading_bins": 4,
        },
        backbones="isotropic",
        backbones_reason="DPT and the three-level pyramid read three blocks of one token grid (a plain ViT's taps)",
    )
)
