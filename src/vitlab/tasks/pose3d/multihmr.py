"""Multi-HMR-style one-stage multi-person 3-D pose (paper 35, Baradel et al., ECCV 2024, arXiv 2402.14654).

Written from the paper and the notes in ``research/missing_papers.md`` §35 (anchor ``naver/multi-hmr``; no code
copied). SMPL-X is licence-gated, so the body model is vitlab's 15-joint stick figure (``data.synthetic.humans``).
``pose="rotations"`` keeps the paper's parametrisation on it: the head regresses the body's orientation in the
camera frame and each bone's rotation (6-D, added to an upright person facing the camera) and the 4 shape
parameters, and the joints come out of the kinematic tree (``skeleton_from_rotations``); ``pose="joints"`` (the
default: better at CPU budgets, ``benchmarks/results/multihmr.md``) regresses the 15 root-relative joints directly.

- **Backbone**: any plain (isotropic) ViT by name (``tasks._backbone.PlainViTTrunk``); its patch tokens.
- **Camera-ray token encoding** (``ray_embed=True``): the ray ``K^-1 [u, v, 1]`` at each token centre, Fourier-coded
  (``layers.camera_embed.FourierRayEmbed``, concatenated as in the paper), then one linear layer to ``head_dim``.
  ``ray_embed=False`` feeds the tokens alone. Without ``K`` a fake camera is used: principal point at the centre,
  60 deg field of view (as the official demo, multi-hmr#36).
- **Detection**: per token a person-centre score (sigmoid; CenterNet focal loss against a Gaussian target drawn at
  the token stride from the people's projected pelvis, ``sigma`` tokens, exactly 1 in the cell holding the centre)
  and a 2-D offset inside the token (L1, in token units). At inference: threshold + 3x3 max-pool NMS, the
  ``max_people`` best peaks become queries (a fixed number, a validity mask; so the model exports).
- **Human Prediction Head** (``head="hph"``): one query per person = its token + learned row/column embeddings;
  ``hph_depth`` blocks of self-attention among persons, cross-attention to all tokens (which also carry the
  row/column embeddings: deviation, the paper adds them at detected locations only) and an MLP; then
  root-relative joints (15 x 3, camera frame, metres) and the root's **log-nearness**.
  ``head="mlp"``: the baseline, an MLP on the person's token alone.
- **Depth as log-nearness normalised by focal length**: ``n = log(f / (f_ref z))`` with ``f_ref = img_size``
  (:func:`depth_to_nearness`, :func:`nearness_to_depth`; clipped at 50 m), so the head predicts the
  camera-independent apparent size and ``K`` turns it into metres. The root is ``z K^-1 [u, v, 1]`` at the
  detected centre.
- **2-D reprojection loss** (``w_reproj``, §3.3; :func:`reprojection_loss`): each ground-truth person's query
  is placed at its true cell + the predicted offset and the predicted depth, its root-relative joints added, the
  result projected with the image's ``K`` and compared (L1, divided by the image size) with the true 2-D joints
  that are visible (in the image and not occluded; ``joints_2d``, ``joints_vis``). Its gradient reaches the
  joints, the nearness and the offset. Default weight 5, as ``w_joints``: an error of 1/20 of the image (2-3 px
  at 48 px) then weighs as much as 5 cm of 3-D joint error. The paper switches it on after a start epoch; here it
  is on from the first step (the 3-D losses start it from the same teacher-forced queries).
- **Body-model losses** (``pose="rotations"``): L1 on the rotation matrices (orientation and 14 bones, ``w_rot``)
  and on the shape (``w_shape``), beside the joint and 2-D losses on the joints the tree makes.
- **Training** uses the ground-truth centres as queries (teacher forcing); evaluation the detections.
- **Metrics**: detection F1 (a detection matches the nearest unmatched person within ``match_px`` pixels),
  root-relative MPJPE (mm), PA-MPJPE (after a similarity Procrustes fit: articulation without global orientation
  and scale), root depth error |z| (mm) and MRPE (mm, root position) on matched people.

Deviations and what is missing: no SMPL-X (licence-gated), so no mesh, vertices, hands, face or expression; the
3-D and 2-D losses are on joints (the paper's also on vertices); the query is not concatenated with a mean-body
initialisation (the rotation outputs are added to one); the row/column embeddings are added to all tokens (the
paper: at detected locations only); no DINOv2 initialisation (the backbone trains from scratch on synthetic scenes;
``conv_stem`` is offered instead); no 2-D loss start epoch; one scale (no multi-resolution training).

Batch (:func:`batch_from_humans` makes one from a collated ``stick_humans`` batch): ``image`` (B, 3, H, W),
``K`` (B, 3, 3), ``centre_2d`` (B, P, 2) pixels, ``person_mask`` (B, P) bool (present and centre in the image),
``joints_cam`` (B, P, 15, 3) camera frame (OpenCV), metres; for the 2-D loss ``joints_2d`` (B, P, 15, 2) pixels
and ``joints_vis`` (B, P, 15) bool (visible joints of people present; not needed when ``w_reproj=0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from timm.layers import Mlp

from ...data.synthetic.humans import NUM_JOINTS, body_turn, local_rotations, skeleton_from_rotations
from ...layers.camera import (
    axis_angle_to_matrix,
    check_intrinsics,
    intrinsics_from_fov,
    invert_pose,
    matrix_to_rotation_6d,
    random_rotation,
    rotation_6d_to_matrix,
    transform_points,
)
from ...layers.camera_embed import FourierRayEmbed
from ...models import Paper
from .._backbone import PlainViTTrunk
from .._registry import register_task
from ..base import TaskModel, TaskSpec
from ..multiview.dust3r import normalise_views
from .draw import PRED_COLOUR, TRUE_COLOUR, draw_skeletons, project_skeletons, skeleton_rows
from .multihmr_parts import (
    HPHBlock,
    centre_focal_loss,
    centre_target,
    depth_to_nearness,
    match_detections,
    nearness_to_depth,
    peak_nms,
    person_errors,
    project_people,
    reprojection_loss,
)

SUM_KEYS = ("tp", "fp", "fn", "n_matched", "mpjpe_sum", "pa_mpjpe_sum", "depth_sum", "mrpe_sum")

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = [
    "PAPER",
    "MultiHMR",
    "batch_from_humans",
    "centre_focal_loss",
    "centre_target",
    "depth_to_nearness",
    "match_detections",
    "nearness_to_depth",
    "peak_nms",
    "reprojection_loss",
]

PAPER = Paper(35, "Multi-HMR: Multi-Person Whole-Body Human Mesh Recovery in a Single Shot", "2402.14654", "")
HEADS = ("hph", "mlp")
POSE_OUTPUTS = ("rotations", "joints")
# a person standing upright and facing the camera, its body axes (x forward, y left, z up) as columns in the
# OpenCV camera frame: the rotation head's starting point (the paper adds its outputs to mean SMPL-X parameters)
_FACING_CAMERA = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
CAMERA_KEYS = ("K", "centre_2d", "person_mask")


class MultiHMR(TaskModel):
    """Image (+ K) -> person-centre scores, offsets and per-person root-relative 3-D joints and depth (module doc).

    Args:
        head_dim, hph_depth, hph_heads: the heads' width, HPH blocks, attention heads.
        head: "hph" (Human Prediction Head) or "mlp" (the MLP on the person's token).
        pose: "rotations" (the paper's parametrisation: the body's orientation in the camera frame and each bone's
            rotation in 6-D, and the 4 shape parameters, through the stick figure's kinematic tree) or "joints"
            (the 15 root-relative joints regressed directly).
        conv_stem: the backbone's patchify replaced by a stack of stride-2 3x3 convolutions (``PlainViTTrunk``;
            a deviation: the paper starts from DINOv2 weights, which this CPU setting cannot download).
        ray_embed: concatenate the Fourier-coded token rays (False: no camera information reaches the heads).
        ray_bands, ray_max_resolution: the Fourier code's bands and top frequency (``FourierRayEmbed``).
        max_people: queries at inference (the best peaks after NMS).
        threshold, sigma, match_px: detection threshold, target Gaussian width (tokens), matching radius (pixels,
            default img_size / 8).
        w_offset, w_joints, w_depth, w_reproj: loss weights (``w_reproj``: the 2-D reprojection loss; 0 turns it off
            and the batch then needs no 2-D joints).
        w_rot, w_shape: weights of the L1 losses on the rotation matrices and the shape (``pose="rotations"``).
    """

    task_name = "multihmr"
    batch_keys = ("image", "K", "centre_2d", "person_mask")
    # what postprocess predicts (pose="rotations" also trains on the batch's orient, local_rot and shape)
    target_keys = ("joints_cam", "joints_2d", "joints_vis")
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
        head: str = "hph",
        pose: str = "joints",
        conv_stem: bool = False,
        ray_embed: bool = True,
        head_dim: int = 64,
        hph_depth: int = 2,
        hph_heads: int = 4,
        ray_bands: int = 8,
        ray_max_resolution: float = 16.0,
        max_people: int = 3,
        threshold: float = 0.3,
        sigma: float = 1.0,
        match_px: float | None = None,
        w_offset: float = 1.0,
        w_joints: float = 5.0,
        w_depth: float = 1.0,
        w_reproj: float = 5.0,
        w_rot: float = 1.0,
        w_shape: float = 1.0,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if pose not in POSE_OUTPUTS:
            raise ValueError(f"pose must be one of {POSE_OUTPUTS}, got {pose!r}")
        if max_people < 1 or hph_depth < 1 or head_dim % hph_heads:
            raise ValueError(f"need max_people >= 1, hph_depth >= 1, hph_heads dividing head_dim; got "
                             f"{max_people}, {hph_depth}, {hph_heads}/{head_dim}")  # fmt: skip
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        self.trunk = PlainViTTrunk(backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs,
                                   conv_stem=conv_stem)  # fmt: skip
        p = self.trunk.patch_size
        if img_size % p:
            raise ValueError(f"img_size {img_size} must be a multiple of the backbone's patch size {p}")
        self.patch, self.side = p, img_size // p
        self.head, self.ray_embed, self.max_people = head, ray_embed, max_people
        self.threshold, self.sigma = threshold, sigma
        self.match_px = float(match_px) if match_px is not None else img_size / 8
        self.weights = (w_offset, w_joints, w_depth, w_reproj)
        self.pose, self.w_rot, self.w_shape = pose, w_rot, w_shape
        D = self.trunk.embed_dim
        self.rays = FourierRayEmbed(D, ray_bands, ray_max_resolution) if ray_embed else None
        self.proj = nn.Sequential(nn.Linear(self.rays.out_dim if ray_embed else D, head_dim), nn.LayerNorm(head_dim))
        self.score = nn.Linear(head_dim, 1)
        self.offset = nn.Linear(head_dim, 2)
        if head == "hph":
            self.row_embed = nn.Parameter(torch.randn(self.side, head_dim) * 0.02)
            self.col_embed = nn.Parameter(torch.randn(self.side, head_dim) * 0.02)
            self.blocks = nn.ModuleList(HPHBlock(head_dim, hph_heads) for _ in range(hph_depth))
            self.norm = nn.LayerNorm(head_dim)
        else:
            self.mlp = Mlp(head_dim, 2 * head_dim, head_dim)
        if pose == "rotations":  # 6-D orientation, 6-D per bone (not the root's), 4 shape; added to a start
            start = torch.cat([matrix_to_rotation_6d(_FACING_CAMERA),
                               matrix_to_rotation_6d(torch.eye(3)).repeat(NUM_JOINTS - 1), torch.ones(4)])  # fmt: skip
            self.register_buffer("pose_start", start, persistent=False)
        self.out = nn.Linear(head_dim, (6 * NUM_JOINTS + 4 if pose == "rotations" else 3 * NUM_JOINTS) + 1)

    # ---- cameras -------------------------------------------------------------------------------------------------
    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in CAMERA_KEYS if k in batch}

    def default_intrinsics(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The fake camera for unknown intrinsics: principal point at the centre, 60 deg field of view."""
        K = intrinsics_from_fov(torch.tensor(math.radians(60.0)), self.img_size, self.img_size)
        return K.to(device).expand(batch_size, 3, 3)

    def token_rays(self, K: torch.Tensor) -> torch.Tensor:
        """``K^-1 [u, v, 1]`` at the token centres, (B, side * side, 3), row-major."""
        c = (torch.arange(self.side, device=K.device, dtype=K.dtype) + 0.5) * self.patch
        v, u = torch.meshgrid(c, c, indexing="ij")
        uv1 = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)
        return uv1 @ torch.linalg.inv(K).transpose(-1, -2)

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        batch_or_image: torch.Tensor | Mapping[str, Any],
        K: torch.Tensor | None = None,
        centre_2d: torch.Tensor | None = None,
        person_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The image (or a batch dict holding it and ``K``), ``K`` (B, 3, 3) and, for teacher forcing, the
        people's ``centre_2d`` (B, P, 2) and ``person_mask`` (B, P)."""
        if isinstance(batch_or_image, Mapping):
            K = batch_or_image.get("K", K)
            centre_2d = batch_or_image.get("centre_2d", centre_2d)
            person_mask = batch_or_image.get("person_mask", person_mask)
        image = batch_or_image["image"] if isinstance(batch_or_image, Mapping) and "image" in batch_or_image else None
        x = super().forward(batch_or_image if image is None else image)  # checks the image; the token features
        B = x.shape[0]
        if K is None:
            K = self.default_intrinsics(B, x.device)
        else:
            if not torch.is_tensor(K) or tuple(K.shape) != (B, 3, 3):
                raise ValueError(f"K must be (B, 3, 3) = ({B}, 3, 3), got {getattr(K, 'shape', type(K))}")
            check_intrinsics(K, "K")
        feats = self.proj(self.rays(x, self.token_rays(K.to(x.dtype))) if self.rays is not None else x)
        logits = self.score(feats).view(B, self.side, self.side)
        offset = self.offset(feats).view(B, self.side, self.side, 2)
        out = {"score_logits": logits, "offset": offset}
        scores = logits.sigmoid()
        idx, top, valid = peak_nms(scores, self.max_people, self.threshold)
        off = offset.flatten(1, 2).gather(1, idx[..., None].expand(-1, -1, 2))
        cell = torch.stack([idx % self.side, idx // self.side], -1).to(x.dtype)
        centre = (cell + off) * self.patch
        out |= {f"det_{k}": v for k, v in self._people(feats, idx, valid, centre, K).items()}
        out["det_joints_2d"] = project_people(out["det_joints_rel"], out["det_depth"], centre, K)
        out |= {"det_score": top, "det_valid": valid}
        if centre_2d is not None and person_mask is not None:
            bad = centre_2d.ndim != 3 or centre_2d.shape[0] != B or centre_2d.shape[-1] != 2
            if bad or person_mask.shape != centre_2d.shape[:2]:
                raise ValueError(f"centre_2d must be (B, P, 2) and person_mask (B, P), got "
                                 f"{tuple(centre_2d.shape)}, {tuple(person_mask.shape)}")  # fmt: skip
            gcell = (centre_2d / self.patch).floor().clamp(0, self.side - 1).long()
            gidx = gcell[..., 1] * self.side + gcell[..., 0]
            out |= {f"gt_{k}": v for k, v in self._people(feats, gidx, person_mask, centre_2d, K).items()}
        return out

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.trunk.embed(image)
        tokens = self.trunk.run_blocks(tokens, grid, 0, self.trunk.depth)
        return tokens[:, self.trunk.num_prefix_tokens :]

    def _people(self, feats, idx, valid, centre, K) -> dict[str, torch.Tensor]:
        """Per-query head: tokens at flat ``idx`` (B, Q) -> root-relative joints, nearness, depth and root."""
        B, Q = idx.shape
        q = feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1]))
        if self.head == "hph":
            pos = (self.row_embed[:, None] + self.col_embed[None]).flatten(0, 1)  # (N, d)
            q = q + pos[idx]
            tokens = feats + pos
            for blk in self.blocks:
                q = blk(q, tokens, valid)
            q = self.norm(q)
        else:
            q = self.mlp(q)
        raw = self.out(q)
        nearness = raw[..., -1]
        body = {}
        if self.pose == "rotations":
            params = raw[..., :-1] + self.pose_start
            rot = rotation_6d_to_matrix(params[..., : 6 * NUM_JOINTS].unflatten(-1, (NUM_JOINTS, 6)))
            body = {"orient": rot[:, :, 0], "local_rot": rot[:, :, 1:], "shape": params[..., 6 * NUM_JOINTS :]}
            local = torch.cat([torch.eye(3, dtype=rot.dtype, device=rot.device).expand_as(rot[:, :, :1]),
                               rot[:, :, 1:]], 2)  # fmt: skip
            joints = skeleton_from_rotations(local, body["shape"]) @ body["orient"].transpose(-1, -2)
        else:
            joints = raw[..., :-1].reshape(B, Q, NUM_JOINTS, 3)
            joints = joints - joints[:, :, :1]  # root-relative by construction
        focal = K[:, None, 0, 0]
        depth = nearness_to_depth(nearness, focal, float(self.img_size))
        uv1 = torch.cat([centre, torch.ones_like(centre[..., :1])], -1)
        ray = uv1 @ torch.linalg.inv(K).transpose(-1, -2)
        root = ray * depth[..., None]
        return {"joints_rel": joints, "nearness": nearness, "depth": depth, "root": root, "centre": centre, **body}

    # ---- loss and metrics ----------------------------------------------------------------------------------------
    def _targets(
        self,
        output: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        two_d: bool = False,
        rotations: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        B = output["score_logits"].shape[0]
        specs = (("K", (3, 3), torch.float32), ("centre_2d", (2,), torch.float32), ("person_mask", (), torch.bool),
                 ("joints_cam", (NUM_JOINTS, 3), torch.float32))  # fmt: skip
        if two_d:
            specs += (("joints_2d", (NUM_JOINTS, 2), torch.float32), ("joints_vis", (NUM_JOINTS,), torch.bool))
        if rotations:
            specs += (("orient", (3, 3), torch.float32), ("local_rot", (NUM_JOINTS, 3, 3), torch.float32),
                      ("shape", (4,), torch.float32))  # fmt: skip
        for key, tail, dtype in specs:
            v = batch.get(key)
            ok = torch.is_tensor(v) and v.dtype == dtype and v.shape[0] == B
            ok = ok and tuple(v.shape[v.ndim - len(tail) :]) == tail
            if not ok or (key != "K" and v.shape[1] != batch["person_mask"].shape[1]):
                got = f"{tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else type(v).__name__
                raise ValueError(f"batch[{key!r}] must be {dtype} (B, [P,] {', '.join(map(str, tail))}), got {got}")
        return batch["K"], batch["centre_2d"], batch["person_mask"], batch["joints_cam"]

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        w_off, w_joints, w_depth, w_reproj = self.weights
        K, centres, mask, joints = self._targets(output, batch, two_d=w_reproj > 0, rotations=self.pose == "rotations")
        if "gt_joints_rel" not in output:
            raise ValueError("multihmr's loss needs the teacher-forced outputs: call the model with centre_2d and "
                             "person_mask (model(image, **model.forward_kwargs(batch)))")  # fmt: skip
        target = centre_target(centres, mask.float(), self.side, self.patch, self.sigma)
        focal = centre_focal_loss(output["score_logits"], target)
        m = mask.float()
        npeople = m.sum().clamp_min(1)
        c = centres / self.patch
        gcell = c.floor().clamp(0, self.side - 1).long()
        gidx = gcell[..., 1] * self.side + gcell[..., 0]
        off = output["offset"].flatten(1, 2).gather(1, gidx[..., None].expand(-1, -1, 2))
        l_off = ((off - (c - gcell)).abs().sum(-1) * m).sum() / npeople
        rel = joints - joints[:, :, :1]
        l_joints = ((output["gt_joints_rel"] - rel).abs().mean((-1, -2)) * m).sum() / npeople
        n_gt = depth_to_nearness(joints[:, :, 0, 2], K[:, None, 0, 0], float(self.img_size))
        l_depth = ((output["gt_nearness"] - n_gt).abs() * m).sum() / npeople
        total = focal + w_off * l_off + w_joints * l_joints + w_depth * l_depth
        losses = {"focal": focal, "offset": l_off, "joints": l_joints, "nearness": l_depth}
        if self.pose == "rotations":  # the paper's L1 on the body-model parameters (rotation matrices, shape)
            rot_err = torch.cat(
                [
                    (output["gt_orient"] - batch["orient"]).abs().mean((-1, -2))[..., None],
                    (output["gt_local_rot"] - batch["local_rot"][:, :, 1:]).abs().mean((-1, -2)),
                ],
                -1,
            )
            losses["rotations"] = (rot_err.mean(-1) * m).sum() / npeople
            losses["shape"] = ((output["gt_shape"] - batch["shape"]).abs().mean(-1) * m).sum() / npeople
            total = total + self.w_rot * losses["rotations"] + self.w_shape * losses["shape"]  # fmt: skip
        if w_reproj > 0:
            # §3.3's 2-D loss: the person placed from the predicted offset at its true cell, the predicted depth and
            # its joints, projected with K, against the visible 2-D joints of the people present
            centre = (gcell + off) * self.patch
            vis = batch["joints_vis"] & mask[..., None]
            losses["reproj"] = reprojection_loss(output["gt_joints_rel"], output["gt_depth"], centre, K,
                                                 batch["joints_2d"], vis, float(self.img_size))  # fmt: skip
            total = total + w_reproj * losses["reproj"]
        return {"loss": total, **losses}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection, SumMetric

        return MetricCollection({k: SumMetric() for k in SUM_KEYS})

    def evaluate(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, float]:
        """Counts and sums over the batch: tp, fp, fn, matched people and their MPJPE / |z| / MRPE sums (mm)."""
        _, centres, mask, joints = self._targets(output, batch)
        sums = dict.fromkeys(SUM_KEYS, 0.0)
        rel = joints - joints[:, :, :1]
        for b in range(centres.shape[0]):
            valid = output["det_valid"][b]
            pairs = match_detections(output["det_centre"][b], valid, centres[b], mask[b], self.match_px)
            sums["tp"] += len(pairs)
            sums["fp"] += int(valid.sum()) - len(pairs)
            sums["fn"] += int(mask[b].sum()) - len(pairs)
            for q, p in pairs:
                errors = person_errors(output["det_joints_rel"][b, q], rel[b, p], output["det_root"][b, q],
                                       joints[b, p, 0])  # fmt: skip
                for key, value in errors.items():
                    sums[f"{key}_sum"] += value
                sums["n_matched"] += 1
        return sums

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        for key, value in self.evaluate(output, batch).items():
            metrics[key].update(torch.tensor(value, dtype=torch.float64))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``f1`` (percent), ``mpjpe``, ``pa_mpjpe``, ``depth_err``, ``mrpe`` (mm on matched people; 0 matched: 1e4,
        a sentinel)."""
        s = {k: float(m.compute()) for k, m in metrics.items()}
        f1 = 200 * s["tp"] / max(2 * s["tp"] + s["fp"] + s["fn"], 1)
        n = s["n_matched"]
        per = {k: (s[f"{k}_sum"] / n if n else 1e4) for k in ("mpjpe", "pa_mpjpe", "depth", "mrpe")}
        return {"f1": f1, "mpjpe": per["mpjpe"], "pa_mpjpe": per["pa_mpjpe"], "depth_err": per["depth"],
                "mrpe": per["mrpe"], "matched": n}  # fmt: skip

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detected people: ``joints_cam`` (B, Q, 15, 3) camera frame, their projection ``joints_2d`` (B, Q, 15, 2)
        pixels, ``joints_vis`` (B, Q, 15) (the detection's validity per joint), ``centre_2d`` (B, Q, 2), ``valid``,
        ``score``."""
        joints = output["det_joints_rel"] + output["det_root"][:, :, None]
        vis = output["det_valid"][..., None].expand(-1, -1, NUM_JOINTS)
        return {"joints_cam": joints, "joints_2d": output["det_joints_2d"], "joints_vis": vis,
                "centre_2d": output["det_centre"], "valid": output["det_valid"],
                "score": output["det_score"]}  # fmt: skip

    def draw_prediction(self, raw: Mapping[str, torch.Tensor], pred: Mapping[str, torch.Tensor], batch: Any) -> Any:
        """``vitlab predict``: a row per scene of ``raw`` (a collated stick_humans batch; ``batch`` is the model's
        input): view 1 with the true skeletons (green) | the view with the detected people's skeletons (red)."""
        rows = []
        for b in range(raw["views"].shape[0]):
            view, K = raw["views"][b, 0], raw["K"][b, 0]
            true = [(uv, TRUE_COLOUR) for uv, m in zip(raw["joints_2d"][b, 0], raw["person_mask"][b], strict=True) if m]
            found = pred["joints_cam"][b][pred["valid"][b]].cpu()
            guess = [(uv, PRED_COLOUR) for uv in project_skeletons(found, K)]
            rows.append([draw_skeletons(view, true), draw_skeletons(view, guess)])
        return skeleton_rows(rows)

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random images, random focal lengths (50-70 deg), ``max_people`` slots with 1..max_people people at
        random centres 2-5 m away, back-projected consistently with K, with random orientations, bone rotations
        and shapes and the root-relative skeletons they make."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        B, P, S = batch_size, self.max_people, self.img_size
        image = torch.randn(B, self.in_chans, S, S, generator=g)
        fov = torch.deg2rad(50 + 20 * torch.rand(B, generator=g))
        K = intrinsics_from_fov(fov, S, S)
        centre = 2 + (S - 4) * torch.rand(B, P, 2, generator=g)
        mask = torch.arange(P)[None] < torch.randint(1, P + 1, (B, 1), generator=g)
        z = 2 + 3 * torch.rand(B, P, generator=g)
        uv1 = torch.cat([centre, torch.ones(B, P, 1)], -1)
        root = (uv1 @ torch.linalg.inv(K).transpose(-1, -2)) * z[..., None]
        orient = random_rotation(B * P, generator=g).view(B, P, 3, 3)
        local = axis_angle_to_matrix(0.3 * torch.randn(B, P, NUM_JOINTS, 3, generator=g))
        shape = 1 + 0.05 * torch.randn(B, P, 4, generator=g)
        rel = skeleton_from_rotations(local, shape) @ orient.transpose(-1, -2)
        joints = (root[:, :, None] + rel) * mask[..., None, None]
        uv = joints @ K[:, None].transpose(-1, -2)
        uv = uv[..., :2] / uv[..., 2:].clamp_min(1e-6)
        vis = mask[..., None] & (torch.rand(B, P, NUM_JOINTS, generator=g) < 0.8)
        return {"image": image, "K": K, "centre_2d": centre * mask[..., None], "person_mask": mask,
                "joints_cam": joints, "joints_2d": uv * vis[..., None], "joints_vis": vis, "orient": orient,
                "local_rot": local, "shape": shape}  # fmt: skip


def batch_from_humans(
    batch: Mapping[str, torch.Tensor],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    view: int = 0,
) -> dict[str, torch.Tensor]:
    """A collated ``stick_humans`` batch -> a multihmr batch of view ``view``: the image normalised by ``mean``/``std``
    (left uint8 when not given: the engine's loader normalises it), ``K``, the projected pelvis, a mask of people
    present whose pelvis lies in the image, joints in that camera's frame, their 2-D joints (pixels) and which are
    visible (in the image, not occluded) for the reprojection loss; for ``pose="rotations"`` the body's
    orientation in that camera's frame ``orient`` (B, P, 3, 3), the bones' rotations ``local_rot`` (B, P, 15, 3, 3)
    and ``shape`` (B, P, 4)."""
    image = normalise_views(batch["views"][:, view : view + 1], mean, std)[:, 0]
    w2c = invert_pose(batch["cam_to_world"][:, view])
    joints = transform_points(w2c[:, None, None], batch["joints_3d"])
    mask = batch["person_mask"] & batch["in_image"][:, view, :, 0]
    vis = batch["visible"][:, view] & mask[..., None]
    orient = w2c[:, None, :3, :3] @ body_turn(batch["yaw"])
    return {"image": image, "K": batch["K"][:, view], "centre_2d": batch["centre_2d"][:, view],
            "person_mask": mask, "joints_cam": joints * mask[..., None, None],
            "joints_2d": torch.nan_to_num(batch["joints_2d"][:, view]) * vis[..., None], "joints_vis": vis,
            "orient": orient, "local_rot": local_rotations(batch["angles"]), "shape": batch["shape"]}  # fmt: skip


def _humans_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any]:
    """``TaskSpec.data_adapter``: single-view stick_humans scenes, converted by :func:`batch_from_humans`."""
    return 1, batch_from_humans


register_task(
    TaskSpec(
        name="multihmr",
        task="pose3d",
        builder=MultiHMR,
        metric="mpjpe",
        higher_is_better=False,
        paper=PAPER,
        kind="H",
        dataset="stick_humans",
        data_adapter=_humans_adapter,
        num_classes=1,
        in_chans=3,
        img_size=64,
        default_backbone="vit_micro_patch4_28",
        test_backbones=("vit_micro_patch4_28", "univitar_nano_patch4_28"),
        test_kwargs={"img_size": 16, "head_dim": 32, "hph_depth": 1, "hph_heads": 2},
        backbones="isotropic",
        backbones_reason="the person queries are tokens of one token grid with row/column embeddings and the rays "
        "are taken at that grid's token centres; a hierarchical backbone has no single grid",
        description="Multi-HMR-style multi-person 3-D pose: ViT tokens + Fourier ray embedding, CenterNet person "
        "centres and offsets, Human Prediction Head (person queries cross-attending to tokens), root-relative "
        "joints and focal-normalised log-nearness depth (15-joint stick figures instead of SMPL-X)",
    )
)
