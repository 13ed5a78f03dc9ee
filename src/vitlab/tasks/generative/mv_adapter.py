"""MV-Adapter (paper 41): "MV-Adapter: Multi-view Consistent Image Generation Made Easy" (Huang et al.,
arXiv:2412.03632, github.com/huanngzh/MV-Adapter): a frozen single-view generator made multi-view by adapters.

``mv_adapter`` wraps a frozen ``flow_dit`` base (``FlowDiT``, trained here on single Render3D views; loaded from
``base_checkpoint``) and trains only MV-Adapter's parts, all zero-initialised so that the adapted model equals the
base at the start (tested for every mode):

- **duplicated self-attention** per block (``MVAdapterBlock.mv_attn``): a copy of the block's attention with the
  pretrained weights (``copy_weights=False``: random weights, the ablation) and a zero output layer, run across the
  views of one scene and added to the block's own (per-view) attention output. ``mode``: ``"row"`` (each query
  attends to the same image row of every view: the paper's row-wise attention for orbit cameras at 0 deg elevation),
  ``"full"`` (every token of every view) or ``"none"`` (no branch: independent views);
- **parallel image cross-attention** (``ref_attn``) from every view to the reference view's features: the frozen
  base runs once on the clean reference (t = 0) and each block's attention input is kept (the paper's second UNet
  pass), same copy/zero initialisation; off with ``reference=False``;
- **condition encoder** (``RayConditionEncoder``): T2I-Adapter-style convs on the 6-channel Plücker ray map of each
  view, one zero-initialised feature per block added to that block's input tokens.

The batch: ``image`` the reference view ``(B, 3, H, W)``, ``views`` the scene's ``V`` views ``(B, V, 3, H, W)``
(normalised to [-1, 1]), cameras ``K (B, V, 3, 3)``, ``cam_to_world (B, V, 4, 4)``, optional ``label`` (the base's
class). The objective is the base's flow matching over all views with one time per scene; ``sample`` integrates it
(Euler). Multi-view consistency (``multiview_consistency``: warp view i into view j with the known depth and
cameras, masked PSNR) and PSNR to the true renders are measured by ``benchmarks/mv_adapter.py``.

Deviations from the paper: an SD/SDXL UNet at 512-768 px becomes a small DiT at 32 px trained here, text
conditioning becomes the texture item's class; the condition encoder adds one feature per DiT block (no UNet scales);
the reference pass runs the frozen base without camera condition; the official code scales the branch outputs
(``mv_scale``/``ref_scale``, 1 by default) and also offers row-column attention, neither of which is here. Row-wise
attention assumes rows correspond across views, exact only for orthographic views (the official row-wise models use
orthographic cameras); our ring cameras are perspective (35 deg field of view), so rows correspond only
approximately away from the horizon row. Without ``base_checkpoint`` (contract tests only) the base is a random
``FlowDiT`` whose zero-initialised layers are redrawn large (``RANDOM_BASE_GAIN``) so it is not the zero map. Under
``vitlab train`` (``--dataset render3d``: boxes in a room, not the 0-deg ring) the engine normalises ``image`` with the
set's mean/std while ``views`` use the fixed [-1, 1] scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers.adapters import freeze
from ...layers.camera import Cameras
from ...layers.dit import unpatchify
from ...models import Paper
from .._registry import register_task
from ..base import TaskModel, TaskSpec
from .flow import FLOW_RANGE, FlowDiT, FlowMetrics, grid_picture
from .mv_adapter_parts import (
    MODES,
    PIXEL_MEAN,
    PIXEL_STD,
    FlowBaseReload,
    MVAdapterBlock,
    RayConditionEncoder,
    build_flow_base,
)

if TYPE_CHECKING:
    pass

__all__ = ["MVAdapter", "mv_batch"]

PAPER = Paper(41, "MV-Adapter: Multi-view Consistent Image Generation Made Easy", "2412.03632",
              "https://github.com/huanngzh/MV-Adapter", kind="C")  # fmt: skip
EVAL_TIMES = 8
RANDOM_BASE_GAIN = 10.0  # the random test base's zero layers: N(0, (gain / sqrt(fan_in))^2)


def mv_batch(sample: Mapping[str, torch.Tensor], normalise_image: bool = True) -> dict[str, torch.Tensor]:
    """A collated Render3D batch (``views`` uint8 ``(B, V, 3, H, W)``, cameras) -> this task's batch (view 0 is the
    reference ``image``; uint8 when ``normalise_image=False``, for the engine's loader)."""
    views = sample["views"]
    if views.ndim != 5 or views.shape[2] != 3:
        raise ValueError(f"views must be (B, V, 3, H, W), got {tuple(views.shape)}")
    scaled = (views.float() / 255 - PIXEL_MEAN) / PIXEL_STD
    image = scaled[:, 0] if normalise_image else views[:, 0]
    return {"image": image, "views": scaled, "K": sample["K"].float(), "cam_to_world": sample["cam_to_world"].float()}


def _engine_batch(sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return mv_batch(sample, normalise_image=False)


def _mv_adapter(task_kwargs: dict[str, Any]) -> tuple[int, Any, tuple]:
    # the reference image in the views' range (the set's own mean/std would scale it apart from them)
    return int(task_kwargs.get("num_views", 4)), _engine_batch, FLOW_RANGE


class MVAdapter(FlowBaseReload, FlowMetrics, TaskModel):
    """A frozen ``FlowDiT`` with MV-Adapter's trainable branches (module docstring).

    Args:
        base_checkpoint: a ``flow_dit`` checkpoint (file or run directory); its architecture replaces ``backbone``
            and ``backbone_kwargs``. None: a random base (tests). base_config: the base's architecture instead (a
            reloading run writes it; its weights then come from the run).
        num_views: views per scene. mode: "row", "full" or "none". copy_weights: initialise the branches from the
            base's attention. reference: the image cross-attention to the reference view (``image``).
    """

    task_name = "mv_adapter"
    batch_keys = ("image", "views", "K", "cam_to_world")

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        base_checkpoint: str | None = None,
        base_config: dict[str, Any] | None = None,
        num_views: int = 4,
        mode: str = "row",
        copy_weights: bool = True,
        reference: bool = True,
        eval_seed: int = 2024,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        if in_chans != 3:
            raise ValueError(f"in_chans must be 3 (RGB views), got {in_chans}")
        self.base_config = None
        if base_checkpoint is not None or base_config is not None:
            base, self.base_config = build_flow_base(base_checkpoint, base_config)
            c = self.base_config
            if (c["in_chans"], c["img_size"]) != (in_chans, img_size):
                raise ValueError(
                    f"base_checkpoint makes {c['in_chans']}-channel {c['img_size']} px images; this model is built "
                    f"with in_chans={in_chans}, img_size={img_size}"
                )
            self.num_classes = c["num_classes"]  # the base's labels (scenes without one use its null class)
            self.backbone_name = c["model"]
        else:  # a random test base: its adaLN-Zero and output layers (zero) are redrawn large, so that the frozen
            # base is far from the zero map and a few adapter steps visibly correct it (the contract's overfit test)
            base = FlowDiT(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                           backbone_kwargs=backbone_kwargs)  # fmt: skip
            for m in base.modules():
                if isinstance(m, nn.Linear) and not m.weight.any():
                    nn.init.normal_(m.weight, std=RANDOM_BASE_GAIN / m.in_features**0.5)
        self.base = base
        self.num_views, self.mode, self.copy_weights, self.reference, self.eval_seed = (
            num_views, mode, copy_weights, reference, eval_seed
        )  # fmt: skip
        # the adapted blocks own the base's blocks (same parameters, frozen below)
        self.blocks = nn.ModuleList(MVAdapterBlock(b, mode, copy_weights, reference) for b in base.blocks)
        self.cond = RayConditionEncoder(base.trunk.embed_dim, base.trunk.patch_size, len(self.blocks))
        adapters = [m for b in self.blocks for m in (b.mv_attn, b.ref_attn) if m is not None] + [self.cond]
        freeze(self, keep=adapters)

    # -- inputs -------------------------------------------------------------------------------------------------
    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in ("views", "K", "cam_to_world", "label") if k in batch}

    def _check(self, image: torch.Tensor, views: Any, K: Any, cam_to_world: Any) -> Cameras:
        B, S, V = image.shape[0], self.img_size, self.num_views
        if tuple(image.shape[-2:]) != (S, S):
            raise ValueError(f"image must be {S}x{S} px (built with img_size={S}), got {tuple(image.shape[-2:])}")
        if not torch.is_tensor(views) or tuple(views.shape) != (B, V, 3, S, S) or not views.is_floating_point():
            got = f"{views.dtype} {tuple(views.shape)}" if torch.is_tensor(views) else type(views).__name__
            raise ValueError(f"views must be float (B, num_views, 3, H, W) = {(B, V, 3, S, S)}, got {got}")
        for name, t, tail in (("K", K, (3, 3)), ("cam_to_world", cam_to_world, (4, 4))):
            if not torch.is_tensor(t) or tuple(t.shape) != (B, V, *tail):
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"{name} must be {(B, V, *tail)} (one camera per view), got {got}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(views).all() & torch.isfinite(image).all()):
            raise ValueError("image or views hold NaN or infinite values")
        # Cameras raises CameraError (a ValueError) for singular intrinsics and poses that are not rotations
        return Cameras(K.to(views.dtype), cam_to_world.to(views.dtype), (S, S))

    # -- the adapted velocity network ---------------------------------------------------------------------------
    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cams: Cameras, reference: torch.Tensor | None, label: Any = None
    ) -> torch.Tensor:
        """``v(x_t, t)`` for all views: ``x (B, V, 3, H, W)``, ``t (B,)``, the reference view ``(B, 3, H, W)``."""
        base, (B, V) = self.base, x.shape[:2]
        P = base.trunk.num_prefix_tokens
        label = base.check_labels(label, B)
        c_scene = base.condition(t, label)
        ref = self._reference(reference, base.condition(torch.zeros_like(t), label))
        tokens, grid = base.trunk.embed(x.flatten(0, 1))
        c = c_scene.repeat_interleave(V, 0)
        rays = cams.plucker().flatten(0, 1).permute(0, 3, 1, 2).to(x.dtype)  # (B*V, 6, H, W)
        for k, (block, feat) in enumerate(zip(self.blocks, self.cond(rays), strict=True)):
            tokens = torch.cat((tokens[:, :P], tokens[:, P:] + feat), 1)
            tokens = block(tokens, c, grid, V, P, None if ref is None else ref[k])
        out = unpatchify(base.final(tokens[:, P:], c), grid, base.trunk.patch_size, self.in_chans)
        return out.unflatten(0, (B, V))

    def _reference(self, image: torch.Tensor | None, c: torch.Tensor) -> list[torch.Tensor] | None:
        """Each block's attention input on the clean reference view (the frozen base's pass at t = 0)."""
        if image is None or not self.reference:
            return None
        with torch.no_grad():
            tokens, grid = self.base.trunk.embed(image)
            feats = []
            for block in self.blocks:
                feats.append(block.modulated(tokens, c))
                tokens = block.block(tokens, c, grid)
        return feats

    # -- the flow-matching objective ----------------------------------------------------------------------------
    def forward(
        self,
        batch_or_image: torch.Tensor | Mapping[str, Any],
        views: torch.Tensor | None = None,
        K: torch.Tensor | None = None,
        cam_to_world: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The reference view and the scene (views, cameras; or a batch dict) -> velocity, target and times."""
        kw = {"views": views, "K": K, "cam_to_world": cam_to_world, "label": label}
        image = batch_or_image
        if isinstance(image, Mapping):
            if "image" not in image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(image)})")
            kw = {k: v if v is not None else image.get(k) for k, v in kw.items()}
            image = image["image"]
        self.check_image(image)
        cams = self._check(image, kw["views"], kw["K"], kw["cam_to_world"])
        return self.forward_image(image, kw["views"], cams, kw["label"])

    def forward_image(
        self, image: torch.Tensor, views: torch.Tensor, cams: Cameras, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        B = views.shape[0]
        if self.training:
            t, noise = torch.sigmoid(torch.randn(B, device=views.device)), torch.randn_like(views)
        else:  # fixed draws: a deterministic held-out loss
            g = torch.Generator().manual_seed(self.eval_seed)
            noise = torch.randn(views.shape, generator=g).to(views)
            t = ((torch.arange(B, device=views.device) % EVAL_TIMES + 0.5) / EVAL_TIMES).to(views.dtype)
        tb = t.view(B, 1, 1, 1, 1)
        x_t = (1 - tb) * views + tb * noise
        return {"velocity": self.velocity(x_t, t, cams, image, label), "target": noise - views, "t": t}

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": mean squared velocity error over every view}``."""
        return {"loss": F.mse_loss(output["velocity"], output["target"])}

    @torch.no_grad()
    def sample(
        self,
        image: torch.Tensor,
        K: torch.Tensor,
        cam_to_world: torch.Tensor,
        label: torch.Tensor | None = None,
        steps: int = 20,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate the ``num_views`` views ``(B, V, 3, H, W)`` of the reference ``image`` at the cameras (Euler).

        The initial noise comes from ``generator``: rows of a benchmark share it.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.check_image(image)
        B, S = image.shape[0], self.img_size
        x = torch.randn((B, self.num_views, 3, S, S), generator=generator).to(image)
        cams = self._check(image, x, K, cam_to_world)
        times = torch.linspace(1.0, 0.0, steps + 1, device=image.device)
        was_training = self.training
        self.eval()
        for k in range(steps):
            x = x + (times[k + 1] - times[k]) * self.velocity(x, times[k].expand(B), cams, image, label)
        self.train(was_training)
        return x

    @torch.inference_mode()
    def draw_prediction(self, raw: Mapping[str, torch.Tensor], pred: Any, batch: Mapping[str, Any]) -> Any:
        """``vitlab predict``: a row per scene: the reference view | the ``num_views`` generated views (20 Euler steps,
        noise seeded 0) | the true views. ``batch`` is the model's normalised input (its reference ``image``)."""
        views = self.sample(batch["image"], batch["K"], batch["cam_to_world"], batch.get("label"), steps=20,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        true = raw["views"].float() / 255
        made = (views.cpu().float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)
        tiles = torch.cat([true[:, :1], made, true], 1)  # (B, 1 + 2V, 3, H, W)
        return grid_picture(tiles.flatten(0, 1), nrow=tiles.shape[1])

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random views (std 1) on a ring of cameras at 0 deg elevation, view 0 the reference."""
        from ...layers.camera import intrinsics_from_fov, look_at

        g = generator if generator is not None else torch.Generator().manual_seed(0)
        B, V, S = batch_size, self.num_views, self.img_size
        views = torch.randn(B, V, 3, S, S, generator=g)
        az = torch.rand(B, 1, generator=g) * 6.28 + torch.arange(V) * (6.2832 / V)
        eye = torch.stack((3 * az.cos(), 3 * az.sin(), torch.zeros_like(az)), -1)
        pose = look_at(eye.reshape(-1, 3), torch.zeros(B * V, 3)).reshape(B, V, 4, 4)
        K = intrinsics_from_fov(torch.full((B * V,), 0.6), S, S).reshape(B, V, 3, 3)
        label = torch.randint(0, self.num_classes, (B,), generator=g)
        return {"image": views[:, 0].clone(), "views": views, "K": K, "cam_to_world": pose, "label": label}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, views={self.num_views}, mode={self.mode!r}, copy_weights={self.copy_weights}"


register_task(
    TaskSpec(
        name="mv_adapter",
        task="generation",
        builder=MVAdapter,
        paper=PAPER,
        metric="flow_loss",
        higher_is_better=False,
        kind="C",
        dataset="render3d",
        num_classes=10,
        in_chans=3,
        img_size=32,
        default_backbone="vit_micro_patch4_28",
        exportable=False,
        export_reason="forward needs the views and cameras besides the image, and the camera checks read tensor "
        "values (singular K, non-rotation poses), which torch.export cannot trace",
        backbones="isotropic",
        backbones_reason="the adapters wrap the adaLN-Zero blocks of flow_dit's plain ViT and duplicate their q/k/v "
        "self-attention",
        description="MV-Adapter (paper 41): a frozen flow_dit made multi-view by zero-initialised adapters: "
        "duplicated row-wise / full multi-view attention, reference cross-attention, a ray-map condition encoder",
        test_backbones=("vit_micro_patch4_28", "deit_tiny_distilled_patch4_28"),
        test_kwargs={"img_size": 16, "num_views": 2},
        data_adapter=_mv_adapter,
    )
)
