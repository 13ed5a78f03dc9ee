"""DUSt3R-style two-view pointmap regression (paper 37, the review "DUSt3R -> VGGT", arXiv 2507.08448).

Reconstructed from the review and DUSt3R (Wang et al., CVPR 2024; anchor ``naver/dust3r``; no code copied):

- **Shared encoder**: any isotropic vitlab or timm ViT (by name, through the model contract:
  ``tasks.video.FrameEncoder``) embeds both views with the same weights; its patch tokens are kept (prefix tokens
  dropped). Deviation: the encoder keeps the backbone's own position embedding (the contract gives no hook to put
  2-D RoPE inside a named backbone); the decoders use 2-D RoPE (``layers.pos_embed``) in every attention.
- **Two decoders** (own weights each) of ``dec_depth`` blocks; block ``i`` of view ``v`` runs self-attention,
  cross-attention to the other view's tokens as they leave block ``i - 1``, and an MLP. ``cross_view=False``
  drops the cross-attention (the ablation: then view 2 cannot know where view 1's camera is).
- **Head** per view (``head``): ``"dpt"`` (the default: better than linear at toy scale,
  ``benchmarks/results/pointmaps.md``), DUSt3R's DPT head (``heads.DenseHead`` reusing ``layers.dpt.DPTHead``) on
  the encoder's projected tokens and every decoder block's output; ``"linear"``, every token of the last decoder
  block -> ``patch x patch x 4`` values (pixel shuffle). Either gives the pointmap of BOTH views in
  view 1's camera frame (``pts_mode="exp"``: DUSt3R's ``v / |v| * expm1(|v|)``; ``"linear"``: raw) and the
  confidence ``1 + exp(c)``.
- **Loss** (``geometry.pointmap_loss``): normalise prediction and ground truth by their mean distance, per-pixel
  Euclidean error, times the confidence minus ``alpha log(confidence)`` (``confidence=False``: the plain error).
- **Metrics** (valid pixels): ``pointmap_err`` scale-invariant relative pointmap error (both views), view 1's depth
  (z of its pointmap) ``depth_absrel`` and ``depth_delta1`` (percent) after median scale alignment, and
  ``rot_err_deg``: view 2's relative rotation recovered by Procrustes (Umeyama with scale) from its ground-truth
  camera-frame points (``cam_to_world`` of the batch) to its predicted points in view 1's frame, against the true
  relative rotation.

CroCo cross-view completion pretraining (DUSt3R's initialisation) is :mod:`.croco` (it runs :meth:`Dust3R.decode`).

Deviations: DUSt3R's symmetric (2, 1) pass is not run; the DPT head's resampling factors are scaled down for patch-4
tokens (``heads.dpt_factors``); global alignment of many views is not here (:mod:`.global_align`).

A batch holds ``image`` (B, 2, C, H, W) normalised views, ``pointmap`` (B, 2, H, W, 3) in view 1's frame, ``valid``
(B, 2, H, W), and for the rotation metric ``cam_to_world`` (B, 2, 4, 4) (``K`` (B, 2, 3, 3) is checked when given);
:func:`pairs_from_render3d` makes one of a collated Render3D batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ...layers.camera import (
    CameraError,
    axis_angle_to_matrix,
    check_intrinsics,
    check_pose,
    intrinsics_from_fov,
    invert_pose,
    pixel_grid,
    pose_from_rt,
    transform_points,
    unproject,
)
from ...layers.pos_embed import apply_rope, grid_positions, rope_2d_angles
from ...models import Paper
from .._registry import register_task
from ..base import TaskSpec
from ..video.base import VideoTaskModel
from ..video.frames import FrameEncoder
from .geometry import depth_errors, pointmap_loss, rotation_angle_deg, scale_invariant_error, umeyama
from .heads import DenseHead

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["PAPER", "CrossViewBlock", "Dust3R", "pairs_from_render3d"]

PAPER = Paper(37, "Review of Feed-forward 3D Reconstruction: From DUSt3R to VGGT", "2507.08448", "", kind="H")
PTS_MODES = ("exp", "linear")
METRICS = ("pointmap_err", "depth_absrel", "depth_delta1", "rot_err_deg")


class _RopeAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (default ``x``), queries and keys rotated by 2-D RoPE."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"dec_heads {heads} must divide dec_dim {dim} into head widths that are multiples of 4")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        ctx = x if context is None else context
        h = self.heads
        q = apply_rope(self.q(x).view(B, N, h, D // h).transpose(1, 2), angles)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, apply_rope(k, angles), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossViewBlock(nn.Module):
    """Pre-norm decoder block: self-attention, cross-attention to the other view (unless ``cross=False``), MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross: bool = True) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _RopeAttention(dim, heads)
        self.cross = cross
        if cross:
            self.norm2, self.norm_other = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.cross_attn = _RopeAttention(dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, other: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), angles)
        if self.cross:
            x = x + self.cross_attn(self.norm2(x), angles, self.norm_other(other))
        return x + self.mlp(self.norm3(x))


class Dust3R(VideoTaskModel):
    """Two views -> both pointmaps in view 1's frame and their confidences (module docstring).

    Args:
        dec_dim, dec_depth, dec_heads, mlp_ratio: the decoders' width, blocks per decoder, heads, MLP ratio.
        cross_view: cross-attention between the decoders (False: the ablation without it).
        confidence: the confidence-weighted loss (False: the plain normalised Euclidean error).
        alpha: weight of ``-log(confidence)``.
        pts_mode: "exp" (DUSt3R's ``v / |v| expm1(|v|)``) or "linear".
        num_frames: the number of views; DUSt3R takes pairs, so it must be 2.
        head: "dpt" (default: the better of the two at toy scale, benchmarks/results/pointmaps.md) or "linear".
        dpt_features: the DPT head's fusion width.
    """

    task_name = "dust3r"
    batch_keys = ("image", "valid")
    target_keys = ("pointmap",)
    primary_metric = "pointmap_err"
    higher_is_better = False

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int,
        in_chans: int,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        num_frames: int = 2,
        dec_dim: int = 64,
        dec_depth: int = 2,
        dec_heads: int = 2,
        mlp_ratio: float = 4.0,
        cross_view: bool = True,
        confidence: bool = True,
        alpha: float = 0.2,
        pts_mode: str = "exp",
        head: str = "dpt",
        dpt_features: int = 32,
    ) -> None:
        if num_frames != 2:
            raise ValueError(f"dust3r takes pairs of views: num_frames must be 2, got {num_frames}")
        if pts_mode not in PTS_MODES:
            raise ValueError(f"pts_mode must be one of {PTS_MODES}, got {pts_mode!r}")
        if dec_depth < 1 or alpha < 0:
            raise ValueError(f"dec_depth must be >= 1 and alpha >= 0, got {dec_depth}, {alpha}")
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=2)
        self.encoder = FrameEncoder(
            backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs, pool="avg"
        )
        self.patch = img_size // self._grid_side(backbone, img_size)
        self.cross_view, self.confidence, self.alpha, self.pts_mode = cross_view, confidence, alpha, pts_mode
        self.dec_heads = dec_heads
        self.embed = nn.Linear(self.encoder.embed_dim, dec_dim)
        self.decoders = nn.ModuleList(
            nn.ModuleList(CrossViewBlock(dec_dim, dec_heads, mlp_ratio, cross_view) for _ in range(dec_depth))
            for _ in range(2)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dec_dim) for _ in range(2))
        self.head = head
        taps = 1 if head == "linear" else 1 + dec_depth  # dpt: the embedded encoder tokens and every block
        self.heads = nn.ModuleList(DenseHead(head, dec_dim, 4, self.patch, taps, dpt_features) for _ in range(2))

    def _grid_side(self, backbone: str, img_size: int) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, 1, self.in_chans, img_size, img_size)
            n = self.encoder.patch_tokens(self.encoder(probe)).shape[-2]
        side = round(n**0.5)
        if side * side != n or img_size % side:
            raise ValueError(
                f"backbone {backbone!r} gives {n} patch tokens at {img_size} px; dust3r needs one token per patch of a "
                "square grid dividing the image (one token sequence of a plain ViT)"
            )
        return side

    def check_image(self, image: Any) -> None:
        try:
            super().check_image(image)
        except ValueError as err:
            raise ValueError(f"{err} [dust3r takes a pair of views (B, 2, {self.in_chans}, H, W)]") from None

    def decode(self, view1: torch.Tensor, view2: torch.Tensor) -> list[list[torch.Tensor]]:
        """Both decoders on embedded tokens ``(B, N, dec_dim)`` of the two views (one square grid each): per view,
        its input and every block's output (the last one not yet normed). Also CroCo's pretraining path (.croco)."""
        side = self.img_size // self.patch
        angles = rope_2d_angles(grid_positions((side, side), view1.device), view1.shape[-1] // self.dec_heads)
        x = [view1, view2]
        taps: list[list[torch.Tensor]] = [[x[0]], [x[1]]]
        for blk1, blk2 in zip(*self.decoders, strict=True):
            x = [blk1(x[0], x[1], angles), blk2(x[1], x[0], angles)]
            taps[0].append(x[0]), taps[1].append(x[1])
        return taps

    def forward_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.embed(self.encoder.patch_tokens(self.encoder(image)))  # (B, 2, N, dec_dim)
        taps = self.decode(tokens[:, 0], tokens[:, 1])
        x = [taps[0][-1], taps[1][-1]]
        maps = []
        for v in range(2):
            layers = [*taps[v][:-1], self.norms[v](x[v])][-self.heads[v].taps :]
            maps.append(self.heads[v](layers))
        raw = torch.stack(maps, 1)  # (B, 2, H, W, 4)
        pts = raw[..., :3]
        if self.pts_mode == "exp":
            norm = pts.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            pts = pts / norm * torch.expm1(norm)
        return {"pointmap": pts, "confidence": 1 + raw[..., 3].exp()}

    def _targets(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        pred = output["pointmap"]
        B, V, H, W, _ = pred.shape
        for key, shape, dtype in (("pointmap", (B, V, H, W, 3), torch.float32), ("valid", (B, V, H, W), torch.bool)):
            value = batch.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
                got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"batch[{key!r}] must be {dtype} {shape} (view 1's frame), got {got}")
        if not bool(torch.isfinite(batch["pointmap"][batch["valid"]]).all()):
            raise ValueError("batch['pointmap'] holds NaN or infinite values at valid pixels")
        for key, tail, check in (("cam_to_world", (4, 4), check_pose), ("K", (3, 3), check_intrinsics)):
            if key in batch:
                cams = batch[key]
                if not isinstance(cams, torch.Tensor) or tuple(cams.shape) != (B, V, *tail):
                    got = tuple(cams.shape) if isinstance(cams, torch.Tensor) else type(cams).__name__
                    raise CameraError(f"batch[{key!r}] must be {(B, V, *tail)}: one per view of {V} views; got {got}")
                check(cams, f"batch[{key!r}]")
        return batch["pointmap"], batch["valid"]

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        gt, valid = self._targets(output, batch)
        conf = output["confidence"] if self.confidence else None
        loss = pointmap_loss(output["pointmap"], gt, valid, conf, self.alpha)
        plain = pointmap_loss(output["pointmap"].detach(), gt, valid)
        return {"loss": loss, "regr": plain}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MeanMetric, MetricCollection

        return MetricCollection({k: MeanMetric() for k in METRICS})

    def evaluate(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample metrics ``{name: (B,)}`` (module docstring); ``rot_err_deg`` needs ``batch['cam_to_world']``."""
        gt, valid = self._targets(output, batch)
        pred = output["pointmap"].detach().float()
        absrel, delta = depth_errors(pred[:, 0, ..., 2], gt[:, 0, ..., 2], valid[:, 0])
        values = {"pointmap_err": scale_invariant_error(pred, gt, valid), "depth_absrel": absrel}
        values["depth_delta1"] = 100 * delta
        if "cam_to_world" in batch:
            c2w = batch["cam_to_world"].double()
            rel = invert_pose(c2w[:, 0]) @ c2w[:, 1]  # view 2's camera -> view 1's camera
            src = transform_points(invert_pose(rel)[:, None, None], gt[:, 1].double())  # view 2's camera frame
            _, R, _ = umeyama(src.flatten(1, 2), pred[:, 1].flatten(1, 2), valid[:, 1].flatten(1).double())
            values["rot_err_deg"] = rotation_angle_deg(R, rel[:, :3, :3]).float()
        return values

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        weight = batch["valid"].flatten(2).any(-1).all(-1).float() if "valid" in batch else None
        for key, value in self.evaluate(output, batch).items():
            metrics[key].update(value, weight)

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """The means of the per-sample metrics; a metric that got no sample (no ``cam_to_world``) is left out."""
        return {k: float(metrics[k].compute()) for k in METRICS if metrics[k].update_count}

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"pointmap": (B, 2, H, W, 3), "confidence": (B, 2, H, W), "depth": view 1's z (B, H, W)}``."""
        pts = output["pointmap"]
        return {"pointmap": pts, "confidence": output["confidence"], "depth": pts[:, 0, ..., 2]}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random views and a consistent random scene: random z-depths seen by view 1 at the origin and the other
        views at random poses (deterministic for a seeded ``generator``)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        B, V, S = batch_size, self.num_frames, self.img_size
        image = self.example_clips(B, g)
        K = intrinsics_from_fov(torch.full((B, V), 1.0), S, S)
        R = axis_angle_to_matrix(0.3 * torch.randn(B, V - 1, 3, generator=g))
        others = pose_from_rt(R, 0.3 * torch.randn(B, V - 1, 3, generator=g))
        c2w = torch.cat([torch.eye(4).expand(B, 1, 4, 4), others], 1)
        depth = 1 + 2 * torch.rand(B, V, S, S, generator=g)
        cam, _ = unproject(pixel_grid(S, S), K[:, :, None, None], None, None, depth)
        pointmap = transform_points(c2w[:, :, None, None], cam)
        valid = torch.rand(B, V, S, S, generator=g) < 0.9
        return {"image": image, "pointmap": pointmap, "valid": valid, "depth": depth, "K": K, "cam_to_world": c2w}


def normalise_views(views: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> torch.Tensor:
    """uint8 views (B, V, C, H, W) -> ``(x / 255 - mean) / std`` float; left uint8 when ``mean`` is None (the engine's
    loader normalises ``image`` itself, so a converter it calls must not)."""
    if mean is None or std is None:
        return views
    m, s = torch.tensor(mean).view(1, 1, -1, 1, 1), torch.tensor(std).view(1, 1, -1, 1, 1)
    return (views.float() / 255 - m) / s


def pairs_from_render3d(
    batch: Mapping[str, torch.Tensor], mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> dict[str, torch.Tensor]:
    """A collated Render3D batch (``Render3DDataset.collate``) -> a dust3r batch: views normalised by ``mean``/``std``
    (uint8 when not given), pointmaps of the first two views in view 1's camera frame, their valid masks and cameras."""
    if batch["views"].shape[1] < 2:
        raise ValueError(f"dust3r needs scenes of at least 2 views, got views {tuple(batch['views'].shape)}")
    c2w = batch["cam_to_world"][:, :2]
    to_view1 = invert_pose(c2w[:, 0])[:, None, None, None]
    pointmap = torch.where(batch["valid"][:, :2, ..., None], transform_points(to_view1, batch["pointmap"][:, :2]), 0)
    return {"image": normalise_views(batch["views"][:, :2], mean, std), "pointmap": pointmap,
            "valid": batch["valid"][:, :2], "K": batch["K"][:, :2], "cam_to_world": c2w,
            "depth": batch["depth"][:, :2]}  # fmt: skip


def _pairs_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any]:
    """``TaskSpec.data_adapter``: render3d scenes of 2 views, converted by :func:`pairs_from_render3d`."""
    return 2, pairs_from_render3d


# what the pointmap task models (dust3r, vggt) share in the registry
POINTMAP_SPEC = {
    "task": "pointmaps", "metric": "pointmap_err", "higher_is_better": False, "paper": PAPER, "kind": "H",
    "dataset": "render3d", "num_classes": 1, "in_chans": 3, "img_size": 32, "default_backbone": "vit_micro_patch4_28",
    "test_backbones": ("vit_micro_patch4_28", "univitar_nano_patch4_28"), "backbones": "isotropic",
}  # fmt: skip

register_task(
    TaskSpec(
        name="dust3r",
        builder=Dust3R,
        **POINTMAP_SPEC,
        description="DUSt3R-style two-view pointmaps: shared ViT encoder, cross-attending RoPE decoders, linear "
        "or DPT heads -> both pointmaps in view 1's frame with confidences, confidence-weighted normalised loss",
        test_kwargs={"img_size": 16, "dec_dim": 32, "dec_depth": 1},
        data_adapter=_pairs_adapter,
        backbones_reason="the decoders cross-attend between the two views' patch tokens on one shared grid (with "
        "2-D RoPE); a hierarchical backbone has no single token grid",
    )
)
