"""UCPE (paper 40, "Unified Camera Positional Encoding", arXiv:2512.07237): camera encodings for novel-view synthesis.

A deterministic novel-view-synthesis transformer at CPU scale. One source view (the normalised ``image``) and the
cameras of the source and the target view (``K``, ``cam_to_world``, ``distortion``, ``xi``: ``(B, 2, ...)``, view 0
the source, conventions of :mod:`vitlab.layers.camera`) go in; the target view comes out. Tokens: the backbone's
embedding of the source view (prefix tokens first) followed by one "target-ray" token per target patch (a learned
vector plus the backbone's position embedding); the backbone's blocks run over both, a linear head un-patchifies the
target tokens. The camera encoding (``encoding``) is one of

- ``"none"``: no camera information at all (the target tokens only know their patch position);
- ``"plucker"``: absolute Plücker maps of every view (``PluckerEmbed``: per-pixel ``(d, o x d)`` of each patch, a
  linear layer, added to the tokens; the same as concatenating them and projecting);
- ``"prope"``: PRoPE in the camera branch: ``[K 0; 0 1] world_to_cam`` per view on half the head dims, RoPE of the
  patch position on the rest;
- ``"relray"``: UCPE's relative ray encoding in the camera branch: one world->ray SE(3) frame per token, RoPE of the
  token ray's camera-frame azimuth/elevation on the rest (so the lens only enters through the rays);
- ``"relray_absmap"``: ``"relray"`` plus UCPE's absolute orientation (Lat-Up) map added to the branch input.

The relative encodings sit in UCPE's parallel, zero-initialised attention adapter (``CameraAttentionAdapter``) on
every block, not in the main attention: that is the paper's design (the pretrained attention stays as it is) and it
keeps the backbone's blocks unchanged, so ``"none"`` and ``"plucker"`` run the very same network without branches.
Prefix (class) tokens get the source camera's world->camera frame (PRoPE: the source view's matrix) and zero
angles, so the relative encodings stay independent of the world frame. Only timm ``VisionTransformer`` backbones: the
two views' tokens share the blocks, which vitlab's grid-aware blocks do not allow.

Deviation from the paper: UCPE adapts a pretrained video diffusion model (Wan 2.1) and generates; this is a small
regression model trained from scratch on Render3D (L1 or L2 on pixels), evaluated by PSNR and SSIM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.synthetic.render3d import sample_orbit_cameras
from ...layers.backbone import IsotropicBackbone
from ...layers.camera import Cameras, camera_rays
from ...layers.camera_attention import (
    CameraAttentionAdapter,
    patch_rope_angles,
    prope_transforms,
    ray_rope_angles,
    relative_ray_transforms,
    tokens_from_views,
)
from ...layers.camera_embed import PluckerEmbed, absolute_orientation_map
from ...layers.camera_lens import lens_project
from ...models import Paper
from .._backbone import PlainViTTrunk
from .._registry import register_task
from ..base import TaskModel, TaskSpec

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["ENCODINGS", "PIXEL_MEAN", "PIXEL_STD", "UCPENovelView", "nvs_batch"]

ENCODINGS = ("none", "plucker", "prope", "relray", "relray_absmap")
CAMERA_KEYS = ("K", "cam_to_world", "distortion", "xi")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # fixed normalisation of RGB in [0, 1]; metrics undo it
WORLD_UP = (0.0, 0.0, 1.0)  # Render3D's world is z-up (look_at's default)
PAPER = Paper(40, "Unified Camera Positional Encoding for Controlled Video Generation", "2512.07237",
              "https://github.com/chengzhag/UCPE", kind="C")  # fmt: skip


def nvs_batch(sample: Mapping[str, torch.Tensor], normalise_image: bool = True) -> dict[str, torch.Tensor]:
    """A collated Render3D 2-view batch (``views`` uint8 ``(B, 2, 3, H, W)`` and cameras) -> this task's batch.

    ``image`` is view 0, ``target`` view 1, both normalised with ``PIXEL_MEAN``/``PIXEL_STD``; with
    ``normalise_image=False`` ``image`` stays uint8 (the engine's loader normalises it with the data set's mean/std).
    """
    views = sample["views"]
    if views.ndim != 5 or views.shape[1] != 2:
        raise ValueError(f"views must be (B, 2, 3, H, W) (source, target), got {tuple(views.shape)}")
    scaled = (views.float() / 255 - PIXEL_MEAN) / PIXEL_STD
    image = scaled[:, 0] if normalise_image else views[:, 0]
    return {"image": image, "target": scaled[:, 1], **{k: sample[k].float() for k in CAMERA_KEYS}}


def _engine_batch(sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return nvs_batch(sample, normalise_image=False)


def _nvs_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any]:
    """``TaskSpec.data_adapter``: render3d scenes of 2 views (source, target), converted by :func:`nvs_batch`."""
    return 2, _engine_batch


class UCPENovelView(TaskModel):
    """Novel-view synthesis over [source tokens; target-ray tokens] with a chosen camera encoding (module docstring).

    ``forward(image (B, 3, H, W), K=, cam_to_world=, distortion=, xi=)`` (or the batch dict) -> the target view
    ``(B, 3, H, W)`` in the normalised space. ``compress``: the camera branch's width is ``embed_dim // compress``.
    """

    batch_keys = ("image", *CAMERA_KEYS)
    target_keys = ("target",)
    primary_metric = "psnr"
    higher_is_better = True

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int,
        in_chans: int,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        encoding: str = "relray",
        compress: int = 2,
        loss: str = "l1",
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
        if in_chans != 3:
            raise ValueError(f"in_chans must be 3 (one RGB source view), got {in_chans}")
        self.trunk = PlainViTTrunk(backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs)
        if isinstance(self.trunk.backbone, IsotropicBackbone):
            raise ValueError(
                f"backbone {backbone!r} is a vitlab isotropic model; ucpe_nvs needs a timm VisionTransformer "
                "(two views share its blocks, vitlab's blocks read one view's grid)"
            )
        p, dim = self.trunk.patch_size, self.trunk.embed_dim
        if img_size % p:
            raise ValueError(f"img_size {img_size} must be a multiple of {backbone!r}'s patch {p}")
        self.encoding, self.loss_kind, self.grid = encoding, loss, img_size // p
        blocks = list(self.trunk.backbone.blocks)
        self.trunk.backbone.blocks = nn.Sequential()
        if encoding in ("prope", "relray", "relray_absmap"):
            orient = 3 if encoding == "relray_absmap" else 0
            self.blocks = nn.ModuleList(CameraAttentionAdapter(b, compress, orientation_dim=orient) for b in blocks)
            branch = self.blocks[0].camera_attn
            self.rope_dims = branch.head_dim - branch.head_dim // 2
        else:
            self.blocks = nn.ModuleList(blocks)
        self.plucker = PluckerEmbed(dim, p) if encoding == "plucker" else None
        self.target_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.target_token, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, p * p * 3)

    # -- inputs --------------------------------------------------------------------------------------------------
    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in CAMERA_KEYS if k in batch}

    def _cameras(self, image: torch.Tensor, cams: dict[str, Any]) -> Cameras:
        if cams.get("K") is None or cams.get("cam_to_world") is None:
            raise ValueError("ucpe_nvs needs the cameras: pass K (B, 2, 3, 3) and cam_to_world (B, 2, 4, 4)")
        K, pose = cams["K"], cams["cam_to_world"]
        B = image.shape[0]
        if not torch.is_tensor(K) or not torch.is_tensor(pose) or K.ndim != 4 or pose.ndim != 4:
            raise ValueError("K must be (B, V, 3, 3) and cam_to_world (B, V, 4, 4) tensors")
        for name, t in (("K", K), ("cam_to_world", pose)):
            if tuple(t.shape[:2]) != (B, 2):
                raise ValueError(
                    f"{name} must hold 2 views (source, target) for each of the {B} images, got view shape "
                    f"{tuple(t.shape[:2])}"
                )
        dist, xi = cams.get("distortion"), cams.get("xi")
        dtype = image.dtype
        # Cameras checks that the views agree, that K is invertible and that poses are rotations (CameraError)
        return Cameras(
            K.to(dtype), pose.to(dtype), (self.img_size, self.img_size),
            None if dist is None else dist.to(dtype), None if xi is None else xi.to(dtype),
        )  # fmt: skip

    def _token_rays(self, cams: Cameras) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Camera-frame unit rays through the patch centres ``(B, V, N, 3)`` (invalid ones: the optical axis)."""
        p = self.trunk.patch_size
        scale = torch.tensor([1.0 / p, 1.0 / p, 1.0], dtype=cams.K.dtype, device=cams.K.device)
        rays, valid = camera_rays(scale[:, None] * cams.K, self.grid, self.grid, cams.distortion, cams.xi)
        axis = torch.tensor([0.0, 0.0, 1.0], dtype=rays.dtype, device=rays.device)
        rays = torch.where(valid[..., None] & torch.isfinite(rays), rays, axis)
        return rays.flatten(2, 3), valid.flatten(2, 3), cams.cam_to_world

    def _camera_context(self, cams: Cameras, prefix: int) -> dict[str, torch.Tensor | None]:
        """Per-token 4x4 transforms, RoPE angles (and orientation features) for the camera branch."""
        B, N = cams.K.shape[0], self.grid * self.grid
        rays_cam, _, pose = self._token_rays(cams)  # (B, V, N, 3)
        if self.encoding == "prope":
            mats = tokens_from_views(prope_transforms(cams.world_to_cam, cams.K, cams.image_size), N)
            rc = torch.arange(self.grid, dtype=rays_cam.dtype, device=rays_cam.device)
            pos = torch.stack(torch.meshgrid(rc, rc, indexing="ij"), -1).reshape(1, 1, N, 2).expand(B, 2, N, 2)
            angles = patch_rope_angles(pos, self.rope_dims)
        else:
            R = pose[:, :, None, :3, :3]
            rays_world = (R @ rays_cam.unsqueeze(-1)).squeeze(-1)
            mats = relative_ray_transforms(rays_world, pose[:, :, None, :3, 3], R[..., 1]).flatten(1, 2)
            angles = ray_rope_angles(rays_cam, self.rope_dims)
        angles = angles.flatten(1, 2)
        # prefix tokens sit in the source camera's frame (PRoPE: its matrix), not the identity: the identity is a
        # world-fixed frame and would make the encoding depend on the world frame again
        src = mats[:, :1] if self.encoding == "prope" else cams.world_to_cam[:, :1]
        zeros = angles.new_zeros(B, prefix, angles.shape[-1])
        context = {"transforms": torch.cat((src.expand(B, prefix, 4, 4), mats), 1),
                   "rope_angles": torch.cat((zeros, angles), 1)}  # fmt: skip
        context["orientation"] = None
        if self.encoding == "relray_absmap":
            dist = None if cams.distortion is None else cams.distortion[:, :, None]
            xi = None if cams.xi is None else cams.xi[:, :, None]

            def project(d: torch.Tensor) -> torch.Tensor:
                return lens_project(d, dist, xi)[0]

            poses = pose[:, :, None].expand(B, 2, N, 4, 4)
            orient = absolute_orientation_map(rays_cam, poses, world_up=WORLD_UP, project=project).flatten(1, 2)
            context["orientation"] = torch.cat((orient.new_zeros(B, prefix, 3), orient), 1)
        return context

    # -- the model -----------------------------------------------------------------------------------------------
    def forward(
        self,
        batch_or_image: torch.Tensor | Mapping[str, Any],
        K: torch.Tensor | None = None,
        cam_to_world: torch.Tensor | None = None,
        distortion: torch.Tensor | None = None,
        xi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The source view (or a batch dict holding it and the cameras) and the cameras -> the target view."""
        cams = {"K": K, "cam_to_world": cam_to_world, "distortion": distortion, "xi": xi}
        if isinstance(batch_or_image, Mapping):
            if "image" not in batch_or_image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(batch_or_image)})")
            cams = {k: cams[k] if cams[k] is not None else batch_or_image.get(k) for k in CAMERA_KEYS}
            batch_or_image = batch_or_image["image"]
        self.check_image(batch_or_image)
        return self.forward_image(batch_or_image, self._cameras(batch_or_image, cams))

    def forward_image(self, image: torch.Tensor, cams: Cameras) -> torch.Tensor:
        B, P, N = image.shape[0], self.trunk.num_prefix_tokens, self.grid * self.grid
        source, _ = self.trunk.embed(image)
        target, _ = self.trunk.embed(torch.zeros_like(image))  # the position embedding (+ patch-embed bias)
        target = target[:, P:] + self.target_token
        if self.plucker is not None:
            origins, dirs, _ = cams.rays()  # (B, V, H, W, 3) world frame
            enc = self.plucker(dirs.flatten(0, 1), origins.flatten(0, 1)).unflatten(0, (B, 2))
            source = torch.cat((source[:, :P], source[:, P:] + enc[:, 0]), 1)
            target = target + enc[:, 1]
        x = torch.cat((source, target), 1)
        if isinstance(self.blocks[0], CameraAttentionAdapter):
            context = self._camera_context(cams, P)
            for block in self.blocks:
                x = block(x, **context)
        else:
            for block in self.blocks:
                x = block(x)
        out = self.head(self.norm(x[:, P + N :]))  # (B, N, p*p*3)
        p, g = self.trunk.patch_size, self.grid
        return out.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)

    # -- objective and metrics -----------------------------------------------------------------------------------
    def _target(self, output: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        t = batch.get("target")
        if not torch.is_tensor(t) or t.shape != output.shape or not t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"batch['target'] must be a float {tuple(output.shape)} target view, got {got}")
        return t

    def loss(self, output: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": L1 (or L2) between the predicted and the true target view, normalised space}``."""
        target = self._target(output, batch)
        fn = F.l1_loss if self.loss_kind == "l1" else F.mse_loss
        return {"loss": fn(output, target)}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        return MetricCollection(
            {
                "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            }
        )

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """PSNR (per image, averaged) and SSIM of the target view in RGB ``[0, 1]``."""
        target = self._target(output, batch)
        pred = (output.detach().float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)
        metrics.update(pred, (target.float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1))

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        return {k: float(v) for k, v in metrics.compute().items()}

    def postprocess(self, output: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"target": output}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        rng = np.random.default_rng(seed)
        S = self.img_size
        cams = [sample_orbit_cameras(rng, 2, S, (40.0, 70.0), 30.0) for _ in range(batch_size)]
        views = torch.rand(batch_size, 2, 3, S, S, generator=g)
        sample = {"views": (views * 255).to(torch.uint8)}
        sample |= {k: torch.stack([getattr(c, k) for c in cams]) for k in CAMERA_KEYS}
        return nvs_batch(sample)


register_task(
    TaskSpec(
        name="ucpe_nvs",
        task="novel_view_synthesis",
        builder=UCPENovelView,
        paper=PAPER,
        metric="psnr",
        higher_is_better=True,
        kind="C",
        dataset="render3d",
        num_classes=1,
        in_chans=3,
        img_size=32,
        default_backbone="vit_micro_patch4_28",
        exportable=False,
        export_reason="the camera checks (singular K, non-rotation poses, invertible per-token 4x4 encodings) read "
        "tensor values, which torch.export cannot trace; forward also needs the cameras besides the image",
        backbones="isotropic",
        backbones_reason="source and target-ray tokens share the blocks of one plain timm ViT, and the head "
        "un-patchifies its single token grid",
        description="UCPE (paper 40): deterministic novel-view synthesis from one source view with camera "
        "encodings none / plucker / prope / relray / relray_absmap (relative ones in a zero-initialised parallel "
        "attention adapter)",
        test_backbones=("vit_micro_patch4_28", "deit_tiny_distilled_patch4_28"),
        test_kwargs={"img_size": 16, "compress": 1},
        data_adapter=_nvs_adapter,
    )
)
