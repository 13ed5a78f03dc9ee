"""UniFormerV2: an image ViT armed with local temporal convolutions and global video-query blocks (paper 34).

UniFormerV2: Spatiotemporal Learning by Arming Image ViTs with Video UniFormer (Li et al., arXiv:2211.09552,
ICCV 2023; https://github.com/OpenGVLab/UniFormerV2, ``slowfast/models/uniformerv2_model.py``, read to understand,
not copied). Any isotropic vitlab or timm ViT embeds every frame (frames folded into the batch); this file adds:

- local MHRA (``local_mhra``): ``layers.temporal.TemporalConvBlock`` wraps every block, a zero-initialised
  depthwise temporal convolution over the patch tokens before its attention ("single") or before attention and
  MLP ("double", the official SSv2 setting); "none" is the official Kinetics setting.
- global UniBlocks (``global_layers``): the outputs of the chosen blocks (an int n: the last n) each get a dynamic
  position embedding (a 3x3x3 depthwise convolution over ``(T, H, W)``, added), then one learnable video query
  cross-attends to all ``T x H x W`` patch tokens of that layer and runs an MLP; the query is carried from layer to
  layer. Output projections start at zero, as in the official code.
- inflated patch embedding (``temporal_patch_kernel``): ``layers.temporal.InflatedPatchConv`` replaces the patch
  projection by a ``(k, p, p)`` convolution over time, centre-frame initialised (off by default).
- fusion: ``sigmoid(balance)``-weighted mix of the query and the mean of the per-frame CLS tokens, layer norm,
  dropout, linear classifier. Without global layers the clip embedding is the normed mean of the frame CLS tokens
  (frame averaging: blind to frame order).

Reference: UniFormerV2-B/16 for Kinetics-400, 8 frames, CLIP ViT-B/16 (mmaction2
``uniformerv2-base-p16-res224_clip_u8_kinetics400-rgb``: ``no_lmhra=True``, ``return_list=[8, 9, 10, 11]``,
``temporal_downsample=False``), 115M parameters (mmaction2 README); built here as ``uniformerv2`` on timm's
``vit_base_patch16_clip_224`` with ``num_classes=400, in_chans=3, img_size=224``. Counting the official modules
gives 114.55M; ours is 114.55M + 1,536 (timm's final norm, which the official backbone lacks).

Deviations, and where the code and the paper differ: the global query attends to the patch tokens of each layer
(the code's keys also hold each frame's CLS token); the fused CLS is taken after the backbone's final norm (the
official backbone has none); GELU instead of CLIP's QuickGELU in the query blocks; no drop path on the local
update; the inflated patch embedding (``temporal_patch_kernel``, kernel ``(k, p, p)``, centre-frame init) keeps
every frame: the SSv2 configs' temporal stride 2 is not built, since the host ViT's forward sees ``B * T`` frames
(the Kinetics reference uses neither: kernel ``(1, p, p)``, the 2-D embedding). The paper describes
the local MHRA as multi-head relation aggregation with a learnable affinity; the code is the depthwise temporal
convolution built here. The official Kinetics config omits local MHRA altogether, and the maintainer advises it
only for motion-centred data (OpenGVLab/UniFormerV2#22).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_

from ...layers.attention import attend
from ...layers.temporal import InflatedPatchConv, TemporalConvBlock
from ...models import Paper
from .._backbone import feature_dicts
from .._registry import register_task
from ..base import TaskSpec
from .base import LABEL_CLASSES, ClipClassifier
from .frames import FrameEncoder

__all__ = ["PAPER", "UniFormerV2"]

PAPER = Paper(34, "UniFormerV2: Spatiotemporal Learning by Arming Image ViTs with Video UniFormer", "2211.09552",
              "https://github.com/OpenGVLab/UniFormerV2", kind="H")  # fmt: skip
LOCAL_MHRA = ("none", "single", "double")


class _VideoQueryBlock(nn.Module):
    """Global UniBlock: queries ``(B, Q, C)`` cross-attend to a clip's tokens ``(B, M, C)``, then an MLP (pre-norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"global_heads {num_heads} must divide the width {dim}")
        self.num_heads = num_heads
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        for m in (self.q, self.kv, self.mlp.fc1):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for m in (self.proj, self.mlp.fc2):  # zero init: each block starts by passing the query through
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, Q, C = query.shape
        h = self.num_heads
        q = self.q(self.norm_q(query)).view(B, Q, h, C // h).transpose(1, 2)  # (B, h, Q, C/h)
        k, v = self.kv(self.norm_kv(tokens)).view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, M, C/h) each
        query = query + self.proj(attend(q, k, v).transpose(1, 2).reshape(B, Q, C))
        return query + self.mlp(self.norm2(query))


class UniFormerV2(ClipClassifier):
    """Image ViT per frame with local temporal convolutions, global video-query blocks and fusion (module docstring).

    Args:
        label: the target key, "motion" (camera-motion class) or "identity" (the centre item's class).
        num_frames: frames per clip.
        local_mhra: "none", "single" (a temporal conv before each block's attention) or "double" (and before MLP).
        global_layers: the blocks whose outputs the video query reads: an int n (the last n; 0: none, frame
            averaging) or block indices.
        global_heads: heads of the query blocks (default the backbone's).
        reduction, kernel_size: the local convolutions' channel narrowing and temporal kernel.
        frame_pool: the per-frame token fused with the query, "token" (CLS) or "avg" (patch mean).
        drop_rate: dropout in the query blocks' MLPs and before the classifier (the official 0.5).
        temporal_patch_kernel: > 1 inflates the patch projection to ``(k, p, p)`` (centre-frame init); 1 keeps the
            image embedding (the official Kinetics setting).
    """

    task_name = "uniformerv2"
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
        local_mhra: str = "none",
        global_layers: int | Sequence[int] = 4,
        global_heads: int | None = None,
        mlp_ratio: float = 4.0,
        reduction: float = 1.5,
        kernel_size: int = 3,
        frame_pool: str = "token",
        drop_rate: float = 0.0,
        temporal_patch_kernel: int = 1,
    ) -> None:
        super().__init__(
            backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size, num_frames=num_frames, label=label
        )
        if local_mhra not in LOCAL_MHRA:
            raise ValueError(f"local_mhra must be one of {LOCAL_MHRA}, got {local_mhra!r}")
        self.frames = FrameEncoder(
            backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs, pool=frame_pool
        )
        net, dim = self.frames.backbone, self.frames.embed_dim
        blocks = getattr(net, "blocks", None)
        if not isinstance(blocks, nn.Sequential) or not len(blocks):
            raise ValueError(f"backbone {backbone!r} has no 'blocks' Sequential; UniFormerV2 arms an isotropic ViT")
        stride = int(feature_dicts(net)[-1]["reduction"])
        grid = (img_size // stride, img_size // stride)
        self.local_mhra, self.global_indices = local_mhra, _global_indices(global_layers, len(blocks))
        if temporal_patch_kernel != 1:
            _inflate_patch_embed(net, backbone, in_chans, num_frames, temporal_patch_kernel)
        if local_mhra != "none":
            for i, block in enumerate(blocks):
                blocks[i] = TemporalConvBlock(
                    block, dim, num_frames, grid, self.frames.num_prefix_tokens, double=local_mhra == "double",
                    reduction=reduction, kernel_size=kernel_size,
                )  # fmt: skip
        host = _host(blocks[-1])  # a timm Block's mixer is .attn, a vitlab MetaBlock's .token_mixer
        mixer = getattr(host, "token_mixer", getattr(host, "attn", None))
        heads = global_heads or int(getattr(mixer, "num_heads", 1))
        n = len(self.global_indices)
        self.dpe = nn.ModuleList(nn.Conv3d(dim, dim, 3, padding=1, groups=dim) for _ in range(n))
        for conv in self.dpe:
            nn.init.zeros_(conv.bias)
        self.global_blocks = nn.ModuleList(_VideoQueryBlock(dim, heads, mlp_ratio, drop_rate) for _ in range(n))
        self.query = nn.Parameter(torch.zeros(1, 1, dim)) if n else None
        self.balance = nn.Parameter(torch.zeros(dim)) if n else None  # sigmoid(0) = 0.5: an even mix at the start
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, self.num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """Clips ``(B, T, C, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.head_drop(self.forward_clip_embedding(image)))

    def forward_clip_embedding(self, image: torch.Tensor) -> torch.Tensor:
        """Clips -> the fused, normed clip embedding ``(B, D)``."""
        B, T = image.shape[:2]
        net = self.frames.backbone
        if not self.global_indices:
            tokens = net.forward_features(image.flatten(0, 1))
            return self.norm(self.frames.pool(tokens.unflatten(0, (B, T))).mean(1))
        tokens, maps = net.forward_intermediates(image.flatten(0, 1), indices=list(self.global_indices))
        query = self.query.repeat(B, 1, 1)  # not expand: a no-grad view of a leaf still says requires_grad
        for dpe, block, fmap in zip(self.dpe, self.global_blocks, maps, strict=True):
            fmap = fmap.unflatten(0, (B, T)).transpose(1, 2)  # (B, D, T, H, W)
            fmap = fmap + dpe(fmap.contiguous(memory_format=torch.channels_last_3d))  # 2x faster on CPU
            query = block(query, fmap.flatten(2).transpose(1, 2))  # keys: all T x H x W patch tokens
        frames = self.frames.pool(tokens.unflatten(0, (B, T))).mean(1)  # the mean of the frames' CLS tokens
        w = torch.sigmoid(self.balance)
        return self.norm((1 - w) * query[:, 0] + w * frames)


def _host(block: nn.Module) -> nn.Module:
    return block.block if isinstance(block, TemporalConvBlock) else block


def _inflate_patch_embed(net: nn.Module, backbone: str, in_chans: int, num_frames: int, kernel: int) -> None:
    """Replace ``net.patch_embed.proj`` by its inflation (the projection must see one frame per image)."""
    proj = getattr(getattr(net, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.in_channels != in_chans:
        raise ValueError(
            f"temporal_patch_kernel needs a patch embedding whose 'proj' Conv2d reads the {in_chans} channels of a "
            f"frame; {backbone!r} has {type(proj).__name__}"
        )
    net.patch_embed.proj = InflatedPatchConv(proj, num_frames, kernel)


def _global_indices(layers: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """``global_layers`` as sorted block indices: an int n is the last n blocks."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 <= layers <= depth:
            raise ValueError(f"global_layers must be in 0..{depth} (the backbone's blocks), got {layers}")
        return tuple(range(depth - layers, depth))
    indices = tuple(sorted({int(i) for i in layers}))
    if any(not 0 <= i < depth for i in indices):
        raise ValueError(f"global_layers indices must be in 0..{depth - 1}, got {list(layers)}")
    return indices


register_task(
    TaskSpec(
        name="uniformerv2",
        task="video_classification",
        builder=UniFormerV2,
        metric="top1",
        paper=PAPER,
        kind="H",
        ref_params_m=115.0,
        dataset="camera_motion_videos",
        num_classes=LABEL_CLASSES["motion"],
        in_chans=1,
        img_size=32,
        default_backbone="vit_micro_patch4_28",
        description="UniFormerV2: local temporal convs inside an image ViT's blocks, global video-query blocks over "
        "chosen layers with dynamic position embedding, fusion with the frame CLS tokens",
        test_backbones=("vit_micro_patch4_28", "channelvit_nano_patch4_28"),
        test_kwargs={
            "img_size": 16,
            "num_frames": 4,
            "local_mhra": "double",
            "global_layers": 2,
            "temporal_patch_kernel": 3,
        },
        backbones="isotropic",
        backbones_reason="the local convs wrap the blocks of a plain ViT and the query reads its single-grid "
        "patch tokens; frames are fused through the CLS token",
    )
)
