"""MvP: direct multi-view multi-person 3-D pose (paper 36, Wang et al., NeurIPS 2021, arXiv 2111.04076).

Written from the paper and the notes in ``research/missing_papers.md`` §36 (anchor ``sail-sg/mvp``; no code copied).
The body is vitlab's 15-joint stick figure (``data.synthetic.humans``, Panoptic-like) in a z-up world in metres.

- **Per-view features**: one backbone by name (any vitlab / timm model, shared by the views) through the model
  contract (``forward_intermediates``): the last map of an isotropic ViT, or a hierarchical backbone's last map at
  stride <= ``max_stride``; a 1x1 convolution to ``dim``.
- **Feature levels** (``levels``; MvP's projective attention samples several levels of each view, as Deformable
  DETR): 1 = that map; 2 adds a 2x finer level (a stride-2 transposed convolution of it); 3 adds a 2x coarser one
  (2x2 max-pooling), ViTDet's "simple feature pyramid" built from the one map of an isotropic ViT (the paper takes
  the levels of a convolutional backbone instead). Every level gets its own rays (RayConv below); the attention
  predicts offsets and weights per level.
- **RayConv** (``ray_conv=True``, ``layers.camera_embed.RayConv``): each feature pixel's unit world-frame camera ray
  (from ``K`` scaled to the map and ``cam_to_world``) concatenated and mixed back to ``dim`` by a 1x1 convolution.
- **Hierarchical joint queries**: ``num_people`` person embeddings plus 15 joint embeddings, summed -> ``num_people
  x 15`` queries (content and position halves); the initial 3-D reference points come from the position half
  (linear + sigmoid), normalised in a box of ``space_size`` metres around ``space_center`` (MvP's 8 x 8 x 2 m
  Panoptic space becomes 5 x 5 x 2.2 m here, the synthetic room).
- **Decoder** of ``depth`` post-norm layers: self-attention among all joint queries, cross-attention to the views
  (``attention="projective"``: ``layers.projective_attention.ProjectiveAttention`` at each query's current 3-D
  point, ``num_points`` samples per head, level and view, views fused by concatenation, the paper;
  ``coords=True`` adds the views' projected locations and the 3-D point to that concatenation, an option of the
  official code; ``fusion="mean"`` the order-free option; ``attention="dense"``: plain cross-attention to every
  token of every level of every view, keys with a learned position embedding: the ablation), FFN.
- **Iterative refinement**: after each layer an MLP (last layer zero-initialised) predicts offsets added to the
  inverse-sigmoid of the reference points; the refined points are that layer's joints and, detached, the next
  layer's reference points (Deformable DETR's box refinement, as MvP).
- **Set prediction**: per layer, per-joint logits averaged over a person's joints give the person's confidence;
  Hungarian matching (cost ``w_pose`` * mean L1 of normalised joints - ``w_class`` * confidence), focal
  classification loss and L1 joint loss on every layer (``aux_loss``; False: the last layer only).
- **Metrics** (MvP / VoxelPose protocol, mm): every predicted person is scored by the MPJPE to its closest true
  person; sorted by confidence, a prediction is a true positive when that MPJPE is below the threshold and the
  person is not taken. ``ap25`` ... ``ap150`` (the paper's thresholds; the world is in metres, so they are the
  same millimetres, not rescaled; at 64 px they are hard, so ``ap250`` and ``ap500`` are reported too), ``recall``
  (at 500 mm) and ``mpjpe`` (mean over the true positives at 500 mm).

2-D pose pretraining stand-in (not in the paper): ``w_heatmap > 0`` adds a 2-D joint-heatmap head (1x1
convolution, sigmoid, squared error against Gaussians at the projected true joints) on the view features (the 2x
finer level when ``levels >= 2``, so that level learns where in a patch a joint lies). MvP starts from a
PoseResNet pre-trained on 2-D poses (VoxelPose's); here the backbone starts from scratch, and
:meth:`MvP.heatmap_pretrain_loss` (the backbone and the heatmap head alone) trains it first for a few hundred steps
(``benchmarks/mvp.py --pretrain``), a stand-in for that pre-training; the heatmap loss may stay on during training.

Deviations: ViTDet-style levels from one ViT map, not a CNN's stages; the projective attention's offsets and
weights are shared by all views (conditioned on each view's feature at the projection); sigmoid focal loss on the
person confidence (mean of joint logits), not per joint; a short heatmap pretraining on the same synthetic scenes
instead of a 2-D pose model pretrained on COCO. Missing: MvP's query adaptation and its pose-embedding options,
the paper's datasets (Panoptic, Shelf, Campus) and its 960 x 512 scale. ``vitlab predict`` (``draw_prediction``):
:func:`skeleton_picture` draws the people into every view.

Batch (:func:`batch_from_humans_views` makes one from a collated ``stick_humans`` batch): ``image`` (B, V, 3, H, W),
``K`` (B, V, 3, 3), ``cam_to_world`` (B, V, 4, 4), ``joints_3d`` (B, P, 15, 3) world (metres), ``person_mask``
(B, P) bool.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from ...layers.camera import camera_rays, intrinsics_from_fov, look_at, transform_points
from ...layers.camera_embed import RayConv
from ...layers.projective_attention import FUSIONS, check_view_cameras
from ...models import Paper
from .._backbone import create_backbone, feature_dicts
from .._registry import register_task
from ..base import TaskSpec
from ..multiview.dust3r import normalise_views
from ..video.base import VideoTaskModel
from .mvp_parts import (
    ATTENTIONS,
    MvPDecoderLayer,
    average_precision,
    greedy_eval,
    joint_heatmaps,
    set_loss,
    skeleton_picture,
)

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["PAPER", "MvP", "batch_from_humans_views", "skeleton_picture"]

PAPER = Paper(36, "Direct Multi-view Multi-person 3D Pose Estimation", "2111.04076", "https://github.com/sail-sg/mvp")
NUM_JOINTS = 15
RECALL_MM = 500.0


class MvP(VideoTaskModel):
    """Calibrated views (B, V, C, H, W) + cameras -> ``num_people`` people's 3-D joints and confidences (module doc).

    Args:
        num_views: the views per scene (V).
        attention: "projective" (the paper) or "dense" (the ablation); fusion: "concat" or "mean" (projective).
        ray_conv: RayConv on the view features.
        levels: feature levels (1: the backbone's map; 2: + 2x finer; 3: + 2x coarser); coords: projective fusion
            with the projected locations and the 3-D point (official-code option).
        dim, heads, depth, ffn, num_points: decoder width, heads, layers, FFN width, samples per head and view.
        num_people: person queries; max_stride: the finest stride a hierarchical backbone's map may have.
        space_center, space_size: the box (metres) the reference points are normalised in.
        w_class, w_pose: loss and matching weights; aux_loss: the loss on every layer.
        w_heatmap: weight of the optional 2-D joint-heatmap loss on the view features (0: off, the paper; see doc).
        score_threshold: ``postprocess``'s ``valid``; ap_thresholds: MPJPE thresholds (mm) of the AP metrics.
    """

    task_name = "mvp"
    batch_keys = ("image", "K", "cam_to_world", "person_mask")
    target_keys = ("joints_3d",)
    primary_metric = "mpjpe"
    higher_is_better = False

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int,
        in_chans: int,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        num_views: int = 3,
        attention: str = "projective",
        fusion: str = "concat",
        ray_conv: bool = True,
        dim: int = 64,
        heads: int = 4,
        depth: int = 3,
        ffn: int = 128,
        num_points: int = 4,
        levels: int = 1,
        coords: bool = False,
        num_people: int = 6,
        max_stride: int = 8,
        space_center: tuple[float, float, float] = (0.0, 0.0, 0.9),
        space_size: tuple[float, float, float] = (5.0, 5.0, 2.2),
        w_class: float = 2.0,
        w_pose: float = 5.0,
        aux_loss: bool = True,
        w_heatmap: float = 0.0,
        score_threshold: float = 0.5,
        ap_thresholds: tuple[float, ...] = (25.0, 50.0, 100.0, 150.0, 250.0, 500.0),
    ) -> None:
        if attention not in ATTENTIONS or fusion not in FUSIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS} and fusion one of {FUSIONS}, got "
                             f"{attention!r}, {fusion!r}")  # fmt: skip
        if min(depth, num_people, num_points) < 1 or dim % heads:
            raise ValueError(f"need depth, num_people, num_points >= 1 and heads dividing dim; got {depth}, "
                             f"{num_people}, {num_points}, {heads}/{dim}")  # fmt: skip
        if levels not in (1, 2, 3):
            raise ValueError(f"levels must be 1, 2 or 3 (the map, + a 2x finer, + a 2x coarser level), got {levels}")
        if len(space_size) != 3 or min(space_size) <= 0 or len(space_center) != 3:
            raise ValueError(f"space_center and space_size must be 3 numbers, sizes > 0; got {space_center}, "
                             f"{space_size}")  # fmt: skip
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=num_views)
        self.backbone = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        info = feature_dicts(self.backbone)
        fine = [i for i, d in enumerate(info) if d["reduction"] <= max_stride]
        self.feature_index = fine[-1] if fine else 0
        if hasattr(self.backbone, "prune_intermediate_layers"):
            self.backbone.prune_intermediate_layers([self.feature_index], prune_norm=True, prune_head=True)
        self.input_proj = nn.Conv2d(int(info[self.feature_index]["num_chs"]), dim, 1)
        # ViTDet's simple feature pyramid from the one map: a 2x finer level (transposed convolution) and a 2x
        # coarser one (max-pooling), the several levels of MvP's projective attention (Sec. 3.2)
        self.upsample = nn.ConvTranspose2d(dim, dim, 2, stride=2) if levels >= 2 else None
        self.levels = levels
        with torch.no_grad():
            self.map_size = tuple(self._features(torch.zeros(1, in_chans, img_size, img_size)).shape[-2:])
        h, w = self.map_size
        self.level_sizes = [(h, w), (2 * h, 2 * w), (h // 2, w // 2)][:levels]
        if min(min(size) for size in self.level_sizes) < 1:
            raise ValueError(f"levels={levels} needs a feature map of at least 2 x 2, got {self.map_size}")
        self.attention, self.num_people, self.aux_loss = attention, num_people, aux_loss
        self.weights, self.score_threshold = (w_class, w_pose), score_threshold
        self.ap_thresholds = tuple(float(t) for t in ap_thresholds)
        self.register_buffer("space_center", torch.tensor(space_center, dtype=torch.float32), persistent=False)
        self.register_buffer("space_size", torch.tensor(space_size, dtype=torch.float32), persistent=False)
        self.ray_conv = RayConv(dim) if ray_conv else None
        self.w_heatmap = w_heatmap
        self.heatmap_head = nn.Conv2d(dim, NUM_JOINTS, 1) if w_heatmap > 0 else None
        tokens = sum(a * b for a, b in self.level_sizes)  # dense attention reads every level's tokens
        self.key_pos = nn.Parameter(torch.randn(tokens, dim) * 0.02) if attention == "dense" else None
        # unit-variance embeddings (nn.Embedding's init, as Deformable DETR / MvP): the initial reference points
        # spread over the space instead of all starting at its centre
        self.person_embed = nn.Parameter(torch.randn(num_people, 2 * dim))
        self.joint_embed = nn.Parameter(torch.randn(NUM_JOINTS, 2 * dim))
        self.ref_point = nn.Linear(dim, 3)
        self.layers = nn.ModuleList(
            MvPDecoderLayer(dim, heads, ffn, attention, num_points, fusion, num_views, levels, coords)
            for _ in range(depth)
        )
        self.pose_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 3)) for _ in range(depth)
        )
        self.class_heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(depth))
        with torch.no_grad():
            for head in self.pose_heads:  # refinement starts as the identity
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
            for head in self.class_heads:  # focal-loss prior: confidence 0.01
                head.bias.fill_(-math.log(99.0))

    # ---- geometry ------------------------------------------------------------------------------------------------
    def to_world(self, ref: torch.Tensor) -> torch.Tensor:
        """Normalised points in [0, 1]^3 -> world metres."""
        return self.space_center + (ref - 0.5) * self.space_size

    def normalise(self, points: torch.Tensor) -> torch.Tensor:
        """World metres -> the normalised space (the inverse of :meth:`to_world`)."""
        return (points - self.space_center) / self.space_size + 0.5

    def feature_rays(
        self, K: torch.Tensor, cam_to_world: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Unit world rays (B * V, h, w, 3) through the pixel centres of a ``size`` map (default: the backbone's;
        K rescaled to the map)."""
        h, w = size or self.map_size
        scale = K.new_tensor([w / self.img_size, h / self.img_size, 1.0])[:, None]
        d, _ = camera_rays((K * scale).flatten(0, 1), h, w)
        return transform_points(cam_to_world.flatten(0, 1)[:, None, None], d, direction=True)

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("K", "cam_to_world") if k in batch}

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone.forward_intermediates(images, indices=[self.feature_index], intermediates_only=True)
        return self.input_proj(maps[-1])

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """Views (B, V, C, H, W) -> feature maps (B, V, dim, h, w) (no camera information yet)."""
        return self._features(image.flatten(0, 1)).unflatten(0, image.shape[:2])

    def pyramid(self, maps: torch.Tensor) -> list[torch.Tensor]:
        """The ``levels`` maps of (B * V, dim, h, w) features: the map itself, 2x finer, 2x coarser."""
        out = [maps]
        if self.upsample is not None:
            out.append(self.upsample(maps))
        if self.levels == 3:
            out.append(nn.functional.max_pool2d(maps, 2))
        return out

    def forward(
        self,
        batch_or_image: torch.Tensor | Mapping[str, Any],
        K: torch.Tensor | None = None,
        cam_to_world: torch.Tensor | None = None,
        features: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The views (or a batch dict holding them and the cameras), ``K`` (B, V, 3, 3), ``cam_to_world``
        (B, V, 4, 4) -> ``joints`` (B, N, 15, 3) world, ``logits`` (B, N) and every layer's (``aux_*``).

        ``features``: precomputed per-view feature levels that replace the backbone and the pyramid (the image is
        then ignored and may be None), a list of ``levels`` maps (B, V, dim, h_l, w_l); the dense attention needs
        them at ``level_sizes``. A diagnostic hook: ``benchmarks/mvp_oracle.py`` feeds ground-truth 2-D heatmaps
        so that only the decoder must learn."""
        image = batch_or_image
        if isinstance(batch_or_image, Mapping):
            if "image" not in batch_or_image and features is None:
                raise ValueError(f"batch has no 'image' (keys: {sorted(batch_or_image)})")
            image = batch_or_image.get("image")
            K, cam_to_world = batch_or_image.get("K", K), batch_or_image.get("cam_to_world", cam_to_world)
        if features is None:
            self.check_image(image)
            (B, V), dtype = image.shape[:2], image.dtype
        else:
            B, V = self._check_features(features)
            dtype = features[0].dtype
        if K is None or cam_to_world is None:
            raise ValueError("mvp needs the views' cameras: K (B, V, 3, 3) and cam_to_world (B, V, 4, 4), as "
                             "model(image, K=..., cam_to_world=...) or in the batch dict")  # fmt: skip
        check_view_cameras(K, cam_to_world, B, V)
        K, cam_to_world = K.to(dtype), cam_to_world.to(dtype)
        if features is None:
            levels = self.pyramid(self.forward_image(image).flatten(0, 1))
        else:
            levels = [m.flatten(0, 1) for m in features]
        extra = {}
        if self.heatmap_head is not None:  # 2-D joint evidence read from the features before the rays join them
            extra["heatmaps"] = self._heatmaps(levels).unflatten(0, (B, V))
        if self.ray_conv is not None:  # one RayConv, each level with the rays through its own pixel centres
            levels = [self.ray_conv(m, self.feature_rays(K, cam_to_world, m.shape[-2:])) for m in levels]
        levels = [m.unflatten(0, (B, V)) for m in levels]
        keys = None
        if self.key_pos is not None:
            tokens = torch.cat([m.flatten(3) for m in levels], -1).transpose(-1, -2)  # (B, V, sum hw, dim)
            keys = (tokens + self.key_pos).flatten(1, 2)
        queries = (self.person_embed[:, None] + self.joint_embed[None]).flatten(0, 1)  # hierarchical: (N * 15, 2d)
        pos, tgt = queries.expand(B, -1, -1).chunk(2, dim=-1)
        ref = self.ref_point(pos).sigmoid()
        all_joints, all_logits = [], []
        for layer, pose_head, class_head in zip(self.layers, self.pose_heads, self.class_heads, strict=True):
            tgt = layer(tgt, pos, self.to_world(ref), levels, keys, K, cam_to_world, (self.img_size, self.img_size))
            new_ref = (torch.logit(ref.clamp(1e-5, 1 - 1e-5)) + pose_head(tgt)).sigmoid()
            all_joints.append(self.to_world(new_ref).view(B, self.num_people, NUM_JOINTS, 3))
            all_logits.append(class_head(tgt).view(B, self.num_people, NUM_JOINTS).mean(-1))
            ref = new_ref.detach()
        joints, logits = torch.stack(all_joints), torch.stack(all_logits)
        return {"joints": joints[-1], "logits": logits[-1], "aux_joints": joints, "aux_logits": logits, **extra}

    def _check_features(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[int, int]:
        """(B, V) of ``forward``'s precomputed ``features``; a ValueError naming what was expected otherwise."""
        dim = self.input_proj.out_channels
        if not isinstance(features, (list, tuple)) or len(features) != self.levels:
            got = f"{len(features)} map(s)" if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"features must be a list of levels={self.levels} maps (B, V, {dim}, h, w), got {got}")
        B, V = features[0].shape[:2] if torch.is_tensor(features[0]) and features[0].ndim == 5 else (-1, -1)
        for i, m in enumerate(features):
            ok = torch.is_tensor(m) and m.ndim == 5 and tuple(m.shape[:3]) == (B, V, dim) and m.is_floating_point()
            if ok and self.attention == "dense":  # its key position embedding is sized for these maps
                ok = tuple(m.shape[-2:]) == tuple(self.level_sizes[i])
            if not ok:
                got = f"{tuple(m.shape)} {m.dtype}" if torch.is_tensor(m) else type(m).__name__
                want = self.level_sizes[i] if self.attention == "dense" else ("h", "w")
                raise ValueError(f"features level {i} must be a float (B, V, {dim}, {want[0]}, {want[1]}) map with "
                                 f"the B, V of level 0, got {got}")  # fmt: skip
        return int(B), int(V)

    # ---- loss and metrics ----------------------------------------------------------------------------------------
    def _targets(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        B = output["joints"].shape[0]
        gt, mask = batch.get("joints_3d"), batch.get("person_mask")
        ok = torch.is_tensor(gt) and gt.ndim == 4 and gt.shape[0] == B and gt.shape[2:] == (NUM_JOINTS, 3)
        if not ok or not gt.is_floating_point():
            got = f"{tuple(gt.shape)} {gt.dtype}" if torch.is_tensor(gt) else type(gt).__name__
            raise ValueError(f"batch['joints_3d'] must be float (B={B}, P, {NUM_JOINTS}, 3) world metres, got {got}")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(gt.shape[:2]):
            got = f"{tuple(mask.shape)} {mask.dtype}" if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"batch['person_mask'] must be bool {tuple(gt.shape[:2])}, got {got}")
        return gt, mask

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        gt, mask = self._targets(output, batch)
        target = self.normalise(gt.to(output["joints"].dtype))
        depth = output["aux_joints"].shape[0]
        total = output["joints"].new_zeros(())
        w_class, w_pose = self.weights
        for i in range(depth) if self.aux_loss else [depth - 1]:
            pred = self.normalise(output["aux_joints"][i])
            focal, l1 = set_loss(output["aux_logits"][i], pred, target, mask, w_class, w_pose)
            total = total + w_class * focal + w_pose * l1
        logs = {"class": focal.detach(), "joints": l1.detach()}
        if "heatmaps" in output:
            logs["heatmap"] = self._heatmap_loss(output["heatmaps"], gt, mask, batch)
            total = total + self.w_heatmap * logs["heatmap"]
        return {"loss": total, **logs}

    def _heatmaps(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Joint heatmap logits (B * V, 15, h, w) on the finest level (the 2x finer one when ``levels >= 2``: its
        supervision makes the upsampled map carry where in a patch a joint lies)."""
        assert self.heatmap_head is not None
        return self.heatmap_head(levels[1] if len(levels) > 1 else levels[0])

    def _heatmap_loss(
        self, heatmaps: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        size = tuple(heatmaps.shape[-2:])
        target = joint_heatmaps(gt, mask, batch["K"], batch["cam_to_world"], self.img_size, size)
        # squared error summed over each map (a Gaussian's mass is ~2 pi sigma^2 cells), mean over maps
        return ((heatmaps.sigmoid() - target) ** 2).sum((-1, -2)).mean()

    def heatmap_pretrain_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The 2-D joint-heatmap loss of the backbone alone (no decoder): the stand-in for MvP's 2-D-pose-pretrained
        backbone, a stage to train before the set loss (needs ``w_heatmap > 0``, which creates the head)."""
        if self.heatmap_head is None:
            raise ValueError("heatmap pretraining needs the 2-D heatmap head: build the model with w_heatmap > 0")
        image = batch["image"]
        self.check_image(image)
        B, V = image.shape[:2]
        check_view_cameras(batch["K"], batch["cam_to_world"], B, V)
        heatmaps = self._heatmaps(self.pyramid(self.forward_image(image).flatten(0, 1))).unflatten(0, (B, V))
        return self._heatmap_loss(heatmaps, *self._targets({"joints": heatmaps}, batch), batch)

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import CatMetric, MetricCollection, SumMetric

        cats = {k: CatMetric() for k in ("score", "error", "key")}
        return MetricCollection({**cats, "n_gt": SumMetric(), "n_scenes": SumMetric()})

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        gt, mask = self._targets(output, batch)
        scores = output["logits"].detach().sigmoid()
        start = int(metrics["n_scenes"].sum_value)  # people of scene s get keys s * P .. s * P + P - 1
        for b in range(gt.shape[0]):
            s, err, idx = greedy_eval(output["joints"][b].detach(), scores[b], gt[b], mask[b])
            metrics["score"].update(s.double())
            metrics["error"].update(1000 * err.double())
            metrics["key"].update(((start + b) * gt.shape[1] + idx).double())
        metrics["n_gt"].update(torch.tensor(float(mask.sum()), dtype=torch.float64))
        metrics["n_scenes"].update(torch.tensor(float(gt.shape[0]), dtype=torch.float64))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``ap<t>`` (percent), ``recall`` (percent, 500 mm), ``mpjpe`` (mm, true positives at 500 mm; 1e4 when
        there is none, a sentinel), ``people``."""
        arrays = [np.atleast_1d(metrics[k].compute().cpu().numpy()) for k in ("score", "error", "key")]
        total = int(float(metrics["n_gt"].compute()))
        out: dict[str, float | list] = {}
        for t in self.ap_thresholds:
            out[f"ap{t:g}"] = 100 * average_precision(*arrays, total, t)[0]
        _, recall, mpjpe = average_precision(*arrays, total, RECALL_MM)
        out |= {"recall": 100 * recall, "mpjpe": mpjpe if math.isfinite(mpjpe) else 1e4, "people": float(total)}
        return out

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """People sorted by confidence: ``joints_3d`` (B, N, 15, 3) world, ``score`` (B, N), ``valid`` (B, N)."""
        scores, order = output["logits"].sigmoid().sort(-1, descending=True)
        joints = output["joints"].gather(1, order[..., None, None].expand(-1, -1, NUM_JOINTS, 3))
        return {"joints_3d": joints, "score": scores, "valid": scores >= self.score_threshold}

    def draw_prediction(self, raw: Mapping[str, torch.Tensor], pred: Mapping[str, torch.Tensor], batch: Any) -> Any:
        """``vitlab predict``: a row per scene of ``raw`` (a collated stick_humans batch), a tile per view, the true
        skeletons (green) and the confident predicted people (red) projected with each camera (``skeleton_picture``)."""
        V = self.num_frames
        cams = (raw["K"][:, :V], raw["cam_to_world"][:, :V])
        return skeleton_picture(raw["views"][:, :V], *cams, pred["joints_3d"].cpu(), pred["valid"].cpu(),
                                raw["joints_3d"], raw["person_mask"])  # fmt: skip

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random views; cameras on a ring 4 m around the room looking at its centre (60 deg field of view); up to
        ``num_people`` people (at least one) with random skeletons near the centre (deterministic per generator)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        B, V, N, S = batch_size, self.num_frames, self.num_people, self.img_size
        azimuth = 2 * math.pi * (torch.arange(V) / V + 0.1 * torch.rand(B, V, generator=g))
        eye = torch.stack([4 * azimuth.cos(), 4 * azimuth.sin(), 1.5 + torch.rand(B, V, generator=g)], -1)
        c2w = look_at(eye, torch.tensor([0.0, 0.0, 0.9]).expand(B, V, 3))
        K = intrinsics_from_fov(torch.full((B, V), math.radians(60.0)), S, S)
        root = torch.cat([torch.rand(B, N, 2, generator=g) * 2 - 1, torch.full((B, N, 1), 0.9)], -1)
        joints = root[:, :, None] + 0.3 * torch.randn(B, N, NUM_JOINTS, 3, generator=g)
        mask = torch.arange(N)[None] < torch.randint(1, N + 1, (B, 1), generator=g)
        return {"image": self.example_clips(B, g), "K": K, "cam_to_world": c2w,
                "joints_3d": joints * mask[..., None, None], "person_mask": mask}  # fmt: skip


def batch_from_humans_views(
    batch: Mapping[str, torch.Tensor],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    views: int | None = None,
) -> dict[str, torch.Tensor]:
    """A collated ``stick_humans`` batch -> an mvp batch of its first ``views`` views (all when None): the views
    normalised by ``mean``/``std`` (left uint8 when not given, for the engine's loader), their cameras, the world
    joints and the person mask."""
    V = batch["views"].shape[1] if views is None else views
    if not 1 <= V <= batch["views"].shape[1]:
        raise ValueError(f"views={views}: the scenes hold {batch['views'].shape[1]} views")
    return {"image": normalise_views(batch["views"][:, :V], mean, std), "K": batch["K"][:, :V],
            "cam_to_world": batch["cam_to_world"][:, :V], "joints_3d": batch["joints_3d"],
            "person_mask": batch["person_mask"]}  # fmt: skip


def _humans_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any]:
    """``TaskSpec.data_adapter``: stick_humans scenes of ``num_views`` views (default 3), all of them used."""
    return int(task_kwargs.get("num_views", 3)), batch_from_humans_views


register_task(
    TaskSpec(
        name="mvp",
        task="pose3d",
        builder=MvP,
        metric="mpjpe",
        higher_is_better=False,
        paper=PAPER,
        kind="H",
        ref_metric=15.8,
        ref_source="MvP Table 1, CMU Panoptic, MPJPE (mm), PoseResNet-50, 5 views, 960x512",
        dataset="stick_humans",
        num_classes=1,
        in_chans=3,
        img_size=64,
        default_backbone="vit_micro_patch4_28",
        test_backbones=("vit_micro_patch4_28", "tiny_vit_1m_28"),
        test_kwargs=dict(img_size=16, num_views=2, dim=16, heads=2, depth=2, ffn=32, num_points=2, num_people=2),
        exportable=False,
        export_reason="the forward needs each view's cameras (K, cam_to_world) besides the image; the image-only "
        "export of the contract has none, and matching/metrics run on the CPU in numpy/scipy",
        data_adapter=_humans_adapter,
        description="MvP multi-view multi-person 3-D pose: shared backbone per view + RayConv, hierarchical joint "
        "queries, projective attention at projected 3-D joints (or dense cross-attention), iterative refinement, "
        "Hungarian set prediction (15-joint stick figures)",
    )
)
