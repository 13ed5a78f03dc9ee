"""DVGFormer: camera-motion control from frames, pose and action tokens with a causal transformer (paper 39).

DVGFormer: Learning Camera Movement Control from Real-World Drone Videos (Hou et al., arXiv:2412.09620;
https://github.com/hou-yz/dvgformer, read at b1403b1 for the mechanisms, no code taken). Per frame: patch features of
a frozen image encoder pooled to a small grid and projected by a 2-layer MLP (image tokens), the same for a frozen
monocular-depth stream, a state token (the camera pose) and "dense" action tokens (several motion sub-steps per
frame); a causal transformer over the frames; heads for the next actions (L1) and a stop flag (sigmoid focal loss,
alpha 0.9, weight 0.1).

Here: the frozen encoder is any isotropic vitlab/timm ViT (``FrameEncoder``, patch tokens pooled to ``grid`` x
``grid``); image channel 0 is the camera view, channel 1 (``in_chans=2``) the second stream -- the exact proximity
map of ``data/synthetic/camera_paths.py`` (the 2-D stand-in for Depth-Anything disparity), through the same frozen
encoder with its own projection. ``use_images=False`` drops the image tokens (the state-only baseline). The
causal transformer is timm ``Block``s with a block-causal additive mask through ``F.scaled_dot_product_attention``.

Deviations: the mask is causal over frames (every token of frame t sees all tokens of frames <= t) rather than GPT-2's
token-causal order; the action tokens are learned queries, one per sub-step, not the previous (teacher-forced)
actions -- the executed motion reaches the model through the next state token; no begin-of-action, drone-type or
noise tokens; no next-state or future-action heads. Without a ``state`` (``model(image)``) the state token embeds
a zero pose with its "pose known" input flag at 0. The 3-D drone world (Render3D, issue 18) is a follow-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torchvision.ops import sigmoid_focal_loss

from ...models import Paper
from .._registry import register_task
from ..base import TaskSpec
from .base import VideoTaskModel
from .frames import FrameEncoder

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["PAPER", "DVGFormer"]

PAPER = Paper(39, "DVGFormer: Learning Camera Movement Control from Real-World Drone Videos", "2412.09620",
              "https://github.com/hou-yz/dvgformer", kind="H")  # fmt: skip
STATE_DIM = 5  # (tx, ty, log_zoom, roll, tilt), camera_paths' normalised pose


class DVGFormer(VideoTaskModel):
    """Clips ``(B, T, C, H, W)`` and poses ``(B, T, 5)`` -> ``{"actions": (B, T, K, A), "stop": (B, T) logits}``.

    Actions are pose changes, A = 5 (as the state); ``num_classes`` is the clip set's class count (``camera_paths``
    has one, its trajectories) and does not shape the model. ``in_chans``: the frame streams (1 view, 2 view +
    proximity map).

    Args:
        substeps: K action tokens (motion sub-steps) per frame.
        use_images: image tokens on (False: the state-only baseline, which ignores the frames).
        grid: the frozen patch features are pooled to ``grid`` x ``grid`` tokens per stream.
        embed_dim, depth, num_heads: the causal transformer.
        stop_alpha, stop_weight: the stop flag's focal-loss alpha and weight.
    """

    task_name = "dvgformer"
    batch_keys = ("image", "state")
    target_keys = ("actions", "stop")
    primary_metric = "action_l1"
    higher_is_better = False

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = 1,
        in_chans: int = 2,
        img_size: int = 28,
        backbone_kwargs: dict[str, Any] | None = None,
        num_frames: int = 16,
        substeps: int = 4,
        use_images: bool = True,
        grid: int = 3,
        embed_dim: int = 96,
        depth: int = 3,
        num_heads: int = 4,
        stop_alpha: float = 0.9,
        stop_weight: float = 0.1,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=num_frames)
        if in_chans > 2:
            raise ValueError(
                f"in_chans is the number of frame streams (1 view, 2 view + depth-like map), got {in_chans}"
            )
        if substeps < 1 or grid < 1:
            raise ValueError(f"substeps and grid must be >= 1, got {substeps} and {grid}")
        self.substeps, self.grid, self.use_images = substeps, grid, use_images
        self.stop_alpha, self.stop_weight = stop_alpha, stop_weight
        streams = in_chans if use_images else 0
        self.encoder = (
            FrameEncoder(backbone, in_chans=1, img_size=img_size, backbone_kwargs=backbone_kwargs, pool="avg",
                         frozen=True) if use_images else None
        )  # fmt: skip
        width = self.encoder.embed_dim if use_images else 0
        # one 2-layer MLP per stream (the paper's 1x1-conv projections of DINOv2 and depth features)
        self.proj = nn.ModuleList(Mlp(width, embed_dim, embed_dim) for _ in range(streams))
        self.state_embed = nn.Linear(STATE_DIM + 1, embed_dim)  # the pose and a "pose known" flag
        self.action_queries = nn.Parameter(torch.zeros(substeps, embed_dim))
        self.tokens_per_frame = streams * grid * grid + 1 + substeps
        self.in_frame_pos = nn.Parameter(torch.zeros(self.tokens_per_frame, embed_dim))
        self.frame_pos = nn.Parameter(torch.zeros(num_frames, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.action_head = nn.Linear(embed_dim, STATE_DIM)
        self.stop_head = nn.Linear(embed_dim, 1)
        for p in (self.action_queries, self.in_frame_pos, self.frame_pos):
            trunc_normal_(p, std=0.02)

    def forward(self, batch_or_image: torch.Tensor | Mapping[str, Any], state: torch.Tensor | None = None) -> Any:
        """Clips (or a batch dict with ``image`` and ``state``) -> raw outputs (class docstring)."""
        if isinstance(batch_or_image, Mapping):
            if "image" not in batch_or_image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(batch_or_image)})")
            state = batch_or_image.get("state") if state is None else state
            batch_or_image = batch_or_image["image"]
        self.check_image(batch_or_image)
        B, T = batch_or_image.shape[:2]
        if state is not None and (not torch.is_tensor(state) or tuple(state.shape) != (B, T, STATE_DIM)):
            got = tuple(state.shape) if torch.is_tensor(state) else type(state).__name__
            raise ValueError(
                f"state must be the camera pose per frame (B, T, {STATE_DIM}) = {(B, T, STATE_DIM)}, got {got}"
            )
        return self.forward_sequence(self.encode_frames(batch_or_image), state)

    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"state": batch["state"]} if "state" in batch else {}

    def encode_frames(self, image: torch.Tensor) -> torch.Tensor | None:
        """Clips ``(B, T, C, H, W)`` -> frozen features pooled per stream ``(B, T, C, grid**2, D)`` (None: state only).

        The encoder is frozen, so these can be computed once and fed to :meth:`forward_sequence` (the benchmark does).
        """
        if self.encoder is None:
            return None
        B, T, C = image.shape[:3]
        patches = self.encoder.patch_tokens(self.encoder(image.flatten(1, 2)[..., None, :, :]))  # (B, T*C, N, D)
        side = math.isqrt(patches.shape[-2])
        if side * side != patches.shape[-2]:
            raise ValueError(
                f"backbone {self.backbone_name!r} gives {patches.shape[-2]} patch tokens, not a square grid"
            )
        maps = patches.flatten(0, 1).transpose(1, 2).unflatten(-1, (side, side))  # (B*T*C, D, side, side)
        pooled = F.adaptive_avg_pool2d(maps, self.grid).flatten(2).transpose(1, 2)  # (B*T*C, grid**2, D)
        return pooled.unflatten(0, (B, T, C))

    def forward_sequence(self, features: torch.Tensor | None, state: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Pooled features (``encode_frames``) and poses ``(B, T', 5)`` of the first ``T' <= num_frames`` frames ->
        outputs for those frames (causal: frame t's outputs do not change with later frames)."""
        ref = state if features is None else features
        if ref is None:
            raise ValueError("the state-only model (use_images=False) needs the camera pose: pass state=(B, T, 5)")
        B, T = ref.shape[:2]
        if self.num_frames < T:
            raise ValueError(f"at most num_frames={self.num_frames} frames fit the frame position table, got {T}")
        if features is not None and (features.ndim != 5 or features.shape[2] != len(self.proj)):
            raise ValueError(
                f"features must be encode_frames' (B, T, {len(self.proj)}, grid**2, D) for this "
                f"{len(self.proj)}-stream model, got {tuple(features.shape)}"
            )
        if state is not None and tuple(state.shape) != (B, T, STATE_DIM):
            raise ValueError(f"state must be the pose per frame (B, T, {STATE_DIM}) = {(B, T, STATE_DIM)}, got "
                             f"{tuple(state.shape)}")  # fmt: skip
        parts = [] if features is None else [self.proj[c](features[:, :, c]) for c in range(features.shape[2])]
        dtype = self.frame_pos.dtype
        known = torch.ones(B, T, 1, dtype=dtype, device=ref.device)
        if state is None:  # pose unknown: zero pose, flag 0
            pose_in = torch.zeros(B, T, STATE_DIM + 1, dtype=dtype, device=ref.device)
        else:
            pose_in = torch.cat([state.to(dtype), known], -1)
        pose = self.state_embed(pose_in)
        parts += [pose[:, :, None], self.action_queries.expand(B, T, -1, -1)]
        x = torch.cat(parts, 2) + self.in_frame_pos + self.frame_pos[:T, None]  # (B, T, P, E)
        P = x.shape[2]
        frame = torch.arange(T, device=x.device).repeat_interleave(P)
        mask = torch.zeros(T * P, T * P, device=x.device, dtype=x.dtype)
        mask = mask.masked_fill(frame[:, None] < frame[None, :], float("-inf"))  # no token sees a later frame
        x = x.flatten(1, 2)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        x = self.norm(x).unflatten(1, (T, P))
        return {
            "actions": self.action_head(x[:, :, -self.substeps :]),
            "stop": self.stop_head(x[:, :, -self.substeps - 1]).squeeze(-1),
        }

    def _targets(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        shapes = {"actions": tuple(output["actions"].shape), "stop": tuple(output["stop"].shape)}
        out = []
        for key, shape in shapes.items():
            if key not in batch:
                raise ValueError(f"batch has no {key!r} target (keys: {sorted(batch)})")
            t = batch[key]
            if not torch.is_tensor(t) or tuple(t.shape) != shape or not t.is_floating_point():
                got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"batch[{key!r}] must be float {shape}, got {got}")
            out.append(t)
        return tuple(out)

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """L1 on the actions plus ``stop_weight`` x sigmoid focal loss (alpha ``stop_alpha``) on the stop flag."""
        actions, stop = self._targets(output, batch)
        l1 = F.l1_loss(output["actions"], actions)
        focal = sigmoid_focal_loss(output["stop"], stop, alpha=self.stop_alpha, reduction="mean")
        return {"loss": l1 + self.stop_weight * focal, "action_l1": l1.detach(), "stop_focal": focal.detach()}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MeanAbsoluteError, MetricCollection
        from torchmetrics.classification import BinaryAccuracy

        return MetricCollection({"action_l1": MeanAbsoluteError(), "stop_acc": BinaryAccuracy()})

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        actions, stop = self._targets(output, batch)
        metrics["action_l1"].update(output["actions"].flatten(), actions.flatten())
        metrics["stop_acc"].update(output["stop"].sigmoid().flatten(), stop.flatten().long())

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """``{"action_l1": mean |error| in action units, "stop_acc": percent}``."""
        return {
            "action_l1": float(metrics["action_l1"].compute()),
            "stop_acc": 100.0 * float(metrics["stop_acc"].compute()),
        }

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"actions": (B, T, K, A), "stop": (B, T) float 0/1}``."""
        return {"actions": output["actions"], "stop": (output["stop"] > 0).float()}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random clips, poses and actions; the stop flag set on each trajectory's last quarter."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        B, T = batch_size, self.num_frames
        stop = torch.zeros(B, T)
        stop[:, T - max(1, T // 4) :] = 1
        return {
            "image": self.example_clips(B, g),
            "state": 0.3 * torch.randn(B, T, STATE_DIM, generator=g),
            "actions": torch.randn(B, T, self.substeps, STATE_DIM, generator=g).clamp(-1, 1)
            * (1 - stop[..., None, None]),
            "stop": stop,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, substeps={self.substeps}, use_images={self.use_images}, grid={self.grid}"


register_task(
    TaskSpec(
        name="dvgformer",
        task="camera_control",
        builder=DVGFormer,
        metric="action_l1",
        higher_is_better=False,
        paper=PAPER,
        kind="H",
        dataset="camera_paths",
        num_classes=1,
        in_chans=2,
        img_size=28,
        default_backbone="vit_micro_patch4_28",
        description="frozen-ViT frame tokens (+ a depth-like stream), pose and dense action tokens, a causal "
        "transformer predicting the next camera motions and a stop flag",
        test_backbones=("vit_micro_patch4_28", "channelvit_nano_patch4_28"),
        test_kwargs={"img_size": 16, "num_frames": 3, "substeps": 2, "embed_dim": 32, "depth": 1, "num_heads": 2},
        backbones="isotropic",
        backbones_reason="frame tokens are the frozen encoder's patch tokens pooled on their square grid: a plain "
        "ViT's single token sequence",
    )
)
