"""VGGT-style multi-view geometry (paper 37, the review "DUSt3R -> VGGT"; anchor ``facebookresearch/vggt``).

Reconstructed from the review and the VGGT paper (Wang et al., CVPR 2025; no code copied), at toy scale:

- **Per-frame encoder**: any isotropic vitlab or timm ViT (``tasks.video.FrameEncoder``), shared by all frames;
  patch tokens projected to ``dim``.
- **Special tokens**: per frame one camera token and ``registers`` register tokens, learned, with one set for the
  first (reference) frame and another shared by the others, so the model knows which frame defines the world.
- **Alternating attention**: ``depth`` pairs of a frame-wise block (tokens of one frame) and a global block (the
  tokens of all frames together); 2-D RoPE on patch tokens (special tokens unrotated). ``global_attention=False``
  makes both blocks of a pair frame-wise (the ablation: no frame can see another).
- **Heads** (:mod:`.heads`): the camera head regresses the 9-D pose encoding (translation 3 of the frame's camera
  centre in frame 1's camera frame, unit quaternion 4 (w, x, y, z) of its camera-to-frame-1 rotation, vertical and
  horizontal field of view in radians) from the camera token, then refines it ``camera_iters - 1`` times (each
  iteration adds a delta predicted from the tokens modulated by the current estimate); dense heads (``head``:
  ``"dpt"``, the default, on every frame/global pair's concatenated outputs, or ``"linear"`` on the last layer) give
  depth (``exp``) with confidence and the pointmap in frame 1's camera frame with confidence; with ``track_queries
  > 0`` a tracking head follows a fixed grid of query pixels of frame 1 through every frame (track + visibility).
  Deviations: the refinement trunk is one transformer block (VGGT: several); the tracking head is one
  correlation + soft-argmax step on a dense feature head (VGGT: a CoTracker-style iterative tracker) with fixed
  grid queries instead of user-given points; DPT factors scaled down for patch-4 tokens.
- **Loss**: ground truth is normalised by the mean distance of its valid points (frame 1's camera frame), and the
  translation and depth with the same factor; camera: Huber on the pose encoding; depth and pointmap:
  confidence-weighted L1-like Euclidean error minus ``alpha log conf`` (not rescaling the prediction); with
  several camera iterations the camera loss is the weighted mean over iterations (weight ``0.8 ** (iters - k)``:
  later ones count more); tracks: Euclidean error in units of the image side on visible points plus the
  visibility's binary cross-entropy (targets: ``geometry.track_ground_truth``).
- **Metrics**: ``pointmap_err`` (scale-invariant, all frames), ``depth_absrel`` / ``depth_delta1`` of the depth head
  (median-aligned, all frames), ``rot_err_deg`` the angle between predicted and true rotation of frames 2.. (their
  rotation relative to frame 1), ``fov_err_deg``; with tracks ``track_err_px`` (mean pixel error on points
  visible in frames 2..) and ``track_vis_acc`` (percent of correct visibility calls, frames 2.., valid queries).

A batch holds ``image`` (B, V, C, H, W), ``pointmap`` (B, V, H, W, 3) in frame 1's camera frame, ``depth`` and
``valid`` (B, V, H, W), ``K`` (B, V, 3, 3) and ``cam_to_world`` (B, V, 4, 4); :func:`frames_from_render3d` makes one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers.camera import invert_pose, transform_points
from ...layers.pos_embed import grid_positions, rope_2d_angles
from .._registry import register_task
from ..base import TaskSpec
from .dust3r import POINTMAP_SPEC, CrossViewBlock, Dust3R, normalise_views
from .geometry import depth_errors, rotation_angle_deg, scale_invariant_error, track_ground_truth
from .heads import CameraHead, DenseHead, TrackHead, query_grid

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["VGGT", "frames_from_render3d", "matrix_to_quaternion", "pose_encoding", "quaternion_to_matrix"]

METRICS = ("pointmap_err", "depth_absrel", "depth_delta1", "rot_err_deg", "fov_err_deg")
TRACK_METRICS = ("track_err_px", "track_vis_acc")
ITER_GAMMA = 0.8  # weight of camera iteration k of K: ITER_GAMMA ** (K - k)
NUM_FRAMES = 4  # frames per sample by default


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(..., 4)`` (w, x, y, z), w >= 0, of rotations ``(..., 3, 3)``."""
    m = R.double()
    tr = m.diagonal(dim1=-2, dim2=-1)
    # each candidate is 4 |q_k|^2 - 1 + 1: pick the largest component (Shepperd) for a stable division
    sq = torch.stack(
        [
            1 + tr.sum(-1),
            1 + tr[..., 0] - tr[..., 1] - tr[..., 2],
            1 - tr[..., 0] + tr[..., 1] - tr[..., 2],
            1 - tr[..., 0] - tr[..., 1] + tr[..., 2],
        ],
        -1,
    )
    s = sq.clamp_min(0).sqrt() * 2  # 4 |q_k|
    a, b = m[..., 2, 1], m[..., 1, 2]
    c, d = m[..., 0, 2], m[..., 2, 0]
    e, f = m[..., 1, 0], m[..., 0, 1]
    cands = torch.stack(
        [
            torch.stack([s[..., 0] / 4, (a - b) / s[..., 0], (c - d) / s[..., 0], (e - f) / s[..., 0]], -1),
            torch.stack([(a - b) / s[..., 1], s[..., 1] / 4, (f + e) / s[..., 1], (c + d) / s[..., 1]], -1),
            torch.stack([(c - d) / s[..., 2], (f + e) / s[..., 2], s[..., 2] / 4, (b + a) / s[..., 2]], -1),
            torch.stack([(e - f) / s[..., 3], (c + d) / s[..., 3], (b + a) / s[..., 3], s[..., 3] / 4], -1),
        ],
        -2,
    )
    q = cands.gather(-2, sq.argmax(-1)[..., None, None].expand(*sq.shape[:-1], 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q).to(R.dtype)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotations ``(..., 3, 3)`` of quaternions ``(..., 4)`` (w, x, y, z), normalised first."""
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        -1,
    ).unflatten(-1, (3, 3))


def pose_encoding(cam_to_world: torch.Tensor, K: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The 9-D encoding ``(B, V, 9)`` of each camera relative to camera 1: centre 3, quaternion 4, FoV (y, x) 2."""
    rel = invert_pose(cam_to_world[:, :1]) @ cam_to_world  # camera v -> camera 1
    fov_y = 2 * torch.atan(H / (2 * K[..., 1, 1]))
    fov_x = 2 * torch.atan(W / (2 * K[..., 0, 0]))
    return torch.cat([rel[..., :3, 3], matrix_to_quaternion(rel[..., :3, :3]), fov_y[..., None], fov_x[..., None]], -1)


class VGGT(Dust3R):
    """Frames -> per-frame camera pose encoding, depth and pointmap in frame 1's frame (module docstring).

    Reuses ``Dust3R``'s encoder, checks and example batch (random scene, ``num_frames`` cameras); the decoders
    and heads are replaced by the alternating aggregator and VGGT's heads.

    Args:
        num_frames: frames per sample (>= 2).
        dim, depth, heads, registers: the aggregator's width, frame/global block pairs, heads, register tokens.
        global_attention: False makes every block frame-wise (the ablation).
        alpha: weight of ``-log(confidence)``; camera_weight: weight of the camera loss.
        head: the dense heads, "dpt" (default: the better of the two at toy scale) or "linear".
        camera_iters: camera-head iterations (1: one estimate, no refinement).
        track_queries: query pixels of frame 1 (a square number, a grid) to track; 0: no tracking head.
        track_dim: the tracking head's feature width; track_tol: relative depth tolerance of the visibility
        target; dpt_features: the DPT heads' fusion width.
    """

    task_name = "vggt"
    target_keys = ("pointmap", "depth")

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int,
        in_chans: int,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        num_frames: int = NUM_FRAMES,
        dim: int = 64,
        depth: int = 2,
        heads: int = 2,
        registers: int = 2,
        global_attention: bool = True,
        alpha: float = 0.2,
        camera_weight: float = 1.0,
        head: str = "dpt",
        camera_iters: int = 1,
        track_queries: int = 0,
        track_dim: int = 16,
        track_tol: float = 0.05,
        dpt_features: int = 32,
    ) -> None:
        if num_frames < 2:
            raise ValueError(f"vggt needs at least 2 frames (frame 1 defines the world), got num_frames={num_frames}")
        super().__init__(
            backbone,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            backbone_kwargs=backbone_kwargs,
            dec_dim=dim,
            dec_depth=1,
            dec_heads=heads,
            alpha=alpha,
            head="linear",  # Dust3R's heads are dropped below: the cheap ones
        )
        self.num_frames = num_frames
        del self.decoders, self.norms, self.heads  # Dust3R's decoders and heads are not used
        self.global_attention, self.camera_weight, self.registers = global_attention, camera_weight, registers
        # [reference frame, other frames] x (camera + registers) tokens
        self.special = nn.Parameter(torch.randn(2, 1 + registers, dim) * 0.02)
        self.blocks = nn.ModuleList(CrossViewBlock(dim, heads, cross=False) for _ in range(2 * depth))
        self.norm = nn.LayerNorm(dim)
        self.head = head
        # linear: the last (normed) layer; dpt: every frame/global pair's two outputs, concatenated (VGGT)
        width, taps = (dim, 1) if head == "linear" else (2 * dim, depth)
        self.depth_head = DenseHead(head, width, 2, self.patch, taps, dpt_features)
        self.point_head = DenseHead(head, width, 4, self.patch, taps, dpt_features)
        self.track_queries, self.track_tol = track_queries, track_tol
        if track_queries:
            self.register_buffer("queries", query_grid(track_queries, img_size), persistent=False)
            self.track_features = DenseHead(head, width, track_dim, self.patch, taps, dpt_features)
            self.track_head = TrackHead(track_dim)
        self.camera_head = CameraHead(dim, camera_iters, heads)  # last: its first MLP inits as with camera_iters=1

    def check_image(self, image: Any) -> None:
        try:
            super(Dust3R, self).check_image(image)
        except ValueError as err:
            raise ValueError(f"{err} [vggt takes {self.num_frames} frames (B, V, {self.in_chans}, H, W)]") from None

    def forward_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        B, V = image.shape[:2]
        side = self.img_size // self.patch
        patches = self.embed(self.encoder.patch_tokens(self.encoder(image)))  # (B, V, N, D)
        N, D, S = patches.shape[2], patches.shape[3], 1 + self.registers
        special = torch.cat([self.special[:1], self.special[1:].expand(V - 1, -1, -1)])  # (V, S, D)
        x = torch.cat([special.expand(B, -1, -1, -1), patches], 2)  # (B, V, S + N, D)
        angles = rope_2d_angles(grid_positions((side, side), image.device) + 1, D // self.dec_heads)
        angles = torch.cat([angles.new_zeros(S, angles.shape[-1]), angles])  # special tokens unrotated
        taps: list[torch.Tensor] = []
        pair = x
        for i, block in enumerate(self.blocks):
            if i % 2 and self.global_attention:  # global: all frames' tokens together
                x = block(x.flatten(1, 2), x, angles.repeat(V, 1)).view(B, V, S + N, D)
            else:  # frame-wise
                x = block(x.flatten(0, 1), x, angles).view(B, V, S + N, D)
            if i % 2:
                taps.append(torch.cat([pair, x], -1)[:, :, S:].flatten(0, 1))
            else:
                pair = x
        x = self.norm(x)
        if self.head == "linear":
            taps = [x[:, :, S:].flatten(0, 1)]
        poses = self.camera_head(x[:, :, 0])
        frames = (B, V, self.img_size, self.img_size)
        d = self.depth_head(taps).view(*frames, 2)
        pts = self.point_head(taps).view(*frames, 4)
        out = {
            "pose": poses[:, -1],
            "pose_iters": poses,
            "depth": d[..., 0].exp(),
            "depth_conf": 1 + d[..., 1].exp(),
            "pointmap": pts[..., :3],
            "confidence": 1 + pts[..., 3].exp(),
        }
        if self.track_queries:
            feats = self.track_features(taps).view(*frames, -1)
            out["tracks"], out["track_vis"] = self.track_head(feats, self.queries)
        return out

    def _gt(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        gt, valid = self._targets(output, batch)
        for key in ("cam_to_world", "K", "depth"):
            if key not in batch:
                raise ValueError(f"batch has no {key!r} (vggt's camera and depth targets; keys: {sorted(batch)})")
        if tuple(batch["depth"].shape) != tuple(valid.shape):
            raise ValueError(f"batch['depth'] must be {tuple(valid.shape)}, got {tuple(batch['depth'].shape)}")
        w = valid.float()
        scale = (gt.norm(dim=-1) * w).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp_min(1)
        scale = scale.clamp_min(1e-8)
        pose = pose_encoding(batch["cam_to_world"], batch["K"], self.img_size, self.img_size)
        pose = torch.cat([pose[..., :3] / scale[:, None, None], pose[..., 3:]], -1)
        return gt / scale.view(-1, 1, 1, 1, 1), batch["depth"] / scale.view(-1, 1, 1, 1), valid, pose

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        gt, depth, valid, pose = self._gt(output, batch)
        w = valid.float()

        def conf_term(err: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
            return ((err * conf - self.alpha * conf.log()) * w).sum() / w.sum().clamp_min(1)

        pts = conf_term((output["pointmap"] - gt).norm(dim=-1), output["confidence"])
        dep = conf_term((output["depth"] - depth).abs(), output["depth_conf"])
        iters = output.get("pose_iters", output["pose"][:, None])  # (B, K, V, 9)
        K = iters.shape[1]
        weights = [ITER_GAMMA ** (K - 1 - k) for k in range(K)]
        per_iter = [F.huber_loss(iters[:, k], pose) for k in range(K)]
        cam = sum(w * term for w, term in zip(weights, per_iter, strict=True)) / sum(weights)
        out = {"loss": pts + dep + self.camera_weight * cam, "points": pts, "depth": dep, "camera": cam}
        out["camera_last"] = per_iter[-1].detach()
        if self.track_queries:
            track, vis = self._track_terms(output, batch)
            out["loss"] = out["loss"] + track + vis
            out["track"], out["track_vis"] = track, vis
        return out

    def _track_targets(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return track_ground_truth(
            self.queries, batch["depth"], batch["valid"], batch["K"], batch["cam_to_world"], self.track_tol
        )

    def _track_terms(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """Track error (units of the image side) on visible points and visibility BCE on valid queries."""
        uv, visible, query_valid = self._track_targets(batch)
        w = visible.float()
        err = (output["tracks"] - uv).norm(dim=-1) / self.img_size
        track = (err * w).sum() / w.sum().clamp_min(1)
        m = query_valid[:, None].expand_as(visible).float()
        bce = F.binary_cross_entropy_with_logits(output["track_vis"], w, reduction="none")
        return track, (bce * m).sum() / m.sum().clamp_min(1)

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MeanMetric, MetricCollection

        return MetricCollection({k: MeanMetric() for k in self._metric_names()})

    def _metric_names(self) -> tuple[str, ...]:
        return METRICS + (TRACK_METRICS if self.track_queries else ())

    def evaluate(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample metrics ``{name: (B,)}`` (module docstring)."""
        gt, depth, valid, pose = self._gt(output, batch)
        pred = output["pointmap"].detach().float()
        absrel, delta = depth_errors(output["depth"].detach().flatten(1), depth.flatten(1), valid.flatten(1))
        R = quaternion_to_matrix(output["pose"][:, 1:, 3:7].detach().double())
        rot = rotation_angle_deg(R, quaternion_to_matrix(pose[:, 1:, 3:7].double())).mean(1).float()
        fov = torch.rad2deg((output["pose"][..., 7:].detach() - pose[..., 7:]).abs()).mean((1, 2))
        values = {
            "pointmap_err": scale_invariant_error(pred, gt, valid),
            "depth_absrel": absrel,
            "depth_delta1": 100 * delta,
            "rot_err_deg": rot,
            "fov_err_deg": fov,
        }
        if self.track_queries and "tracks" in output:
            uv, visible, query_valid = (t[:, 1:] if t.ndim > 2 else t for t in self._track_targets(batch))
            err = (output["tracks"][:, 1:].detach() - uv).norm(dim=-1)
            w = visible.float()
            values["track_err_px"] = (err * w).sum((1, 2)) / w.sum((1, 2))  # NaN: nothing visible (no weight)
            m = query_valid[:, None].expand_as(visible).float()
            hit = ((output["track_vis"][:, 1:].detach() > 0) == visible).float()
            values["track_vis_acc"] = 100 * (hit * m).sum((1, 2)) / m.sum((1, 2))
        return values

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        """Means over samples; a sample whose metric is undefined (NaN: no visible track point) gets no weight."""
        weight = batch["valid"].flatten(2).any(-1).all(-1).float()
        for key, value in self.evaluate(output, batch).items():
            finite = torch.isfinite(value)
            metrics[key].update(torch.where(finite, value, 0), weight * finite)

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        return {k: float(metrics[k].compute()) for k in self._metric_names() if metrics[k].update_count}

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"pointmap", "confidence", "depth" (B, V, H, W), "pose" (B, V, 9)}``, with tracks ``"tracks"``
        (B, V, Q, 2) and ``"track_visible"`` (B, V, Q) bool."""
        out = {k: output[k] for k in ("pointmap", "confidence", "depth", "pose")}
        if "tracks" in output:
            out["tracks"], out["track_visible"] = output["tracks"], output["track_vis"] > 0
        return out


def frames_from_render3d(
    batch: Mapping[str, torch.Tensor], mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> dict[str, torch.Tensor]:
    """A collated Render3D batch of V views -> a vggt batch (every view; pointmaps in view 1's camera frame); views
    normalised by ``mean``/``std``, uint8 when not given."""
    to_view1 = invert_pose(batch["cam_to_world"][:, 0])[:, None, None, None]
    pointmap = torch.where(batch["valid"][..., None], transform_points(to_view1, batch["pointmap"]), 0)
    return {
        "image": normalise_views(batch["views"], mean, std),
        "pointmap": pointmap,
        "valid": batch["valid"],
        "K": batch["K"],
        "cam_to_world": batch["cam_to_world"],
        "depth": batch["depth"],
    }


def _frames_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any]:
    """``TaskSpec.data_adapter``: render3d scenes of ``num_frames`` views, converted by :func:`frames_from_render3d`."""
    return task_kwargs.get("num_frames", NUM_FRAMES), frames_from_render3d


register_task(
    TaskSpec(
        name="vggt",
        builder=VGGT,
        **POINTMAP_SPEC,
        description="VGGT-style multi-view geometry: per-frame camera and register tokens, alternating frame-wise "
        "and global attention, iterative camera head (9-D pose encoding), linear or DPT depth and pointmap heads, "
        "optional tracking head",
        test_kwargs={"img_size": 16, "num_frames": 3, "dim": 32, "depth": 1},
        data_adapter=_frames_adapter,
        backbones_reason="frame-wise and global attention run over every frame's patch tokens on one shared grid "
        "(with 2-D RoPE); a hierarchical backbone has no single token grid",
    )
)
