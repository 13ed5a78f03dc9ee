"""ViViT factorised encoder (Model 2) and the frozen-spatial training recipe of paper 33.

Optimizing ViViT Training: Time and Memory Reduction for Action Recognition (Ding et al., arXiv:2306.04822,
ECCV 2024; no official code). Its base is ViViT's factorised encoder (Arnab et al., arXiv:2103.15691, Model 2;
google-research/scenic): a spatial ViT embeds every frame (shared weights, its CLS token per frame), a temporal
transformer runs over the T frame embeddings with its own CLS token, a linear head classifies the clip.

The recipe (from the paper's abstract; its body was not reachable, so the details are reconstructed):

- ``freeze_spatial``: the spatial encoder is frozen (no gradient, no autograd graph, eval mode), which the paper
  credits with about half the training time and memory.
- ``temporal_init``: the temporal transformer starts "appropriately" initialised; the source is not stated.
  ViViT itself starts it at random ("random"); the candidate we implement is "spatial", exact copies of the
  spatial encoder's last ``temporal_depth`` blocks (the only pretrained transformer blocks of the same width at
  hand; a temporal encoder trained on another video split can be loaded with ``load_state_dict`` instead).
  The default stays "random": on camera-motion videos the copy hurt (benchmarks/results/vivit_recipe.md).
- ``adapter``: a compact adapter between the frozen spatial and the temporal transformer that "selectively focuses
  on regions of the input image". Reconstructed as ``frames.TokenAdapter``: ``adapter_queries`` learned queries
  cross-attend over each frame's frozen patch tokens and their mean, projected, is added to the frame's CLS
  embedding, so the trained part can pick the regions the frozen CLS summary ignores.

Deviations: clips are embedded frame by frame (no tubelets, i.e. ViViT's "uniform frame sampling" embedding);
any isotropic vitlab or timm ViT is the spatial encoder; ``temporal_depth=0`` averages the frame embeddings, the
order-blind baseline that cannot tell a motion from its time reversal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...models import Paper
from .._registry import register_task
from ..base import TaskSpec
from .base import LABEL_CLASSES, ClipClassifier
from .frames import FrameEncoder, TemporalTransformer, TokenAdapter

__all__ = ["PAPER", "VivitFE"]

PAPER = Paper(33, "Optimizing ViViT Training: Time and Memory Reduction for Action Recognition", "2306.04822", "",
              kind="H+T")  # fmt: skip
TEMPORAL_INITS = ("random", "spatial")


class VivitFE(ClipClassifier):
    """ViViT factorised encoder: spatial ViT per frame -> temporal transformer -> linear head (module docstring).

    Args:
        label: the target key, "motion" (camera-motion class) or "identity" (the centre item's class).
        num_frames: frames per clip.
        frame_pool: the frame embedding, "token" (the spatial encoder's CLS token) or "avg" (patch mean).
        temporal_depth: temporal blocks; 0 averages the frame embeddings instead (order-blind).
        temporal_dim: the temporal transformer's width (default the spatial width; otherwise a projection).
        temporal_heads: its heads (default the spatial encoder's when the widths match, else ``temporal_dim // 32``).
        freeze_spatial, temporal_init, adapter: the recipe (module docstring).
        adapter_queries, adapter_dim, adapter_heads: the adapter's size.
    """

    task_name = "vivit_fe"
    batch_keys = ("image",)

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = LABEL_CLASSES["motion"],
        in_chans: int = 1,
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        label: str = "motion",
        num_frames: int = 8,
        frame_pool: str = "token",
        temporal_depth: int = 2,
        temporal_dim: int | None = None,
        temporal_heads: int | None = None,
        freeze_spatial: bool = False,
        temporal_init: str = "random",
        adapter: bool = False,
        adapter_queries: int = 4,
        adapter_dim: int | None = None,
        adapter_heads: int = 1,
    ) -> None:
        super().__init__(
            backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=num_frames, label=label
        )
        if temporal_init not in TEMPORAL_INITS:
            raise ValueError(f"temporal_init must be one of {TEMPORAL_INITS}, got {temporal_init!r}")
        if temporal_init == "spatial" and temporal_depth == 0:
            raise ValueError("temporal_init='spatial' copies blocks into the temporal transformer; temporal_depth is 0")
        self.spatial = FrameEncoder(
            backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs, pool=frame_pool,
            frozen=freeze_spatial,
        )  # fmt: skip
        width = self.spatial.embed_dim
        dim = temporal_dim or width
        if temporal_init == "spatial":
            self.temporal = TemporalTransformer.from_blocks(
                self.spatial.backbone, width, dim, temporal_depth, num_frames, backbone
            )
        else:
            heads = temporal_heads or (_heads_of(self.spatial.backbone) if dim == width else max(1, dim // 32))
            self.temporal = TemporalTransformer(width, dim, temporal_depth, num_frames, num_heads=heads)
        self.adapter = TokenAdapter(width, adapter_queries, adapter_dim, adapter_heads) if adapter else None
        self.head = nn.Linear(dim, self.num_classes)
        self.freeze_spatial, self.temporal_init = freeze_spatial, temporal_init

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """Clips ``(B, T, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.forward_clip_embedding(image))

    def forward_frame_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """Clips -> frame embeddings ``(B, T, D)`` (the spatial encoder's, plus the adapter's update)."""
        return self.frames_from_tokens(self.spatial(image))

    def frames_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The spatial encoder's tokens ``(B, T, P + N, D)`` -> frame embeddings ``(B, T, D)`` (pooled + adapter)."""
        frames = self.spatial.pool(tokens)
        if self.adapter is not None:
            B, T = tokens.shape[:2]
            patches = self.spatial.patch_tokens(tokens).flatten(0, 1)
            frames = frames + self.adapter(patches).unflatten(0, (B, T))
        return frames

    def forward_clip_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """Clips -> the temporal transformer's clip embedding ``(B, temporal_dim)``."""
        return self.temporal(self.forward_frame_embeddings(image))


def _heads_of(backbone: nn.Module) -> int:
    """The spatial encoder's head count (its last block's attention), else 1."""
    blocks = getattr(backbone, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if isinstance(blocks, nn.Sequential) and len(blocks) else None
    return int(getattr(attn, "num_heads", 1))


register_task(
    TaskSpec(
        name="vivit_fe",
        task="video_classification",
        builder=VivitFE,
        metric="top1",
        paper=PAPER,
        kind="H+T",
        dataset="camera_motion_videos",
        num_classes=LABEL_CLASSES["motion"],
        in_chans=1,
        img_size=32,
        default_backbone="vit_micro_patch4_28",
        description="ViViT factorised encoder (spatial ViT per frame, temporal transformer) with the frozen-spatial "
        "recipe: temporal init from spatial blocks, a query adapter over frozen patch tokens",
        test_backbones=("vit_micro_patch4_28", "channelvit_nano_patch4_28"),
        test_kwargs={"img_size": 16, "num_frames": 4, "temporal_depth": 1},
        backbones="isotropic",
        backbones_reason="frames are embedded by the spatial encoder's CLS (or patch-mean) token, and the temporal "
        "transformer can start from its blocks: a plain ViT's single token sequence",
    )
)
