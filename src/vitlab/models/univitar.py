"""UniViTAR: "UniViTAR: Unified Vision Transformer with Native Resolution" (arXiv:2504.01792),
github.com/MM-MVR/UniViTAR (PAPERS.md row 20).

A plain ViT encoder upgraded with 2-D RoPE (no absolute position table, ``layers.rope_2d_angles``), SwiGLU
with an RMSNorm on its hidden layer (timm's ``SwiGLU``), RMSNorm everywhere, QK-Norm and LayerScale (0.1), that
reads images at their *native* size and aspect ratio: each image becomes its own number of tokens.
``forward(x)`` takes a normal ``(B, C, H, W)`` batch (the timm contract); ``forward_packed(images)`` takes a list
of ``(C, H_i, W_i)`` images of different sizes, packs their token sequences into rows with a block-diagonal
attention mask (``layers.pack_sequences``; ``one_per_row=True`` gives plain padding), gives every token its own
image's 2-D RoPE coordinates and returns per-image logits equal to running each image alone. The resolution
curriculum (fixed size first, native size later) is ``vitlab.engine.multires.native_resolution_schedule``.

Reference figures: UniViTAR-0.3B is the official code's default configuration (width 1024, depth 24, 16 heads,
``intermediate_size`` 4224 of which SwiGLU uses 2/3 = 2816, patch 14, no qkv bias); its README gives 310M
parameters. The 0.6B and 1B configurations are not published in a form we could read, so they are not registered.

Deviations: images only. The official patch embedding is a ``Conv3d`` over two identical frames (images and videos
share it); here a ``Conv2d`` whose weight is the official one summed over time (``checkpoint_filter_fn``), so an
image gives the same tokens with 0.6M fewer parameters. A classifier (final RMSNorm + mean pool + linear head)
is added for ``vitlab train``; the official encoder returns tokens (its training is contrastive + distillation,
not reproduced). QK-Norm is applied after RoPE and over all heads at once, as in the official code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import RmsNorm, SwiGLU

from ..layers import (
    Attention,
    Grid,
    IsotropicBackbone,
    MetaBlock,
    apply_rope,
    attend,
    grid_positions,
    is_fx_tracing,
    pack_sequences,
    rope_2d_angles,
)
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["UNIVITAR", "VARIANTS", "RopeAttention", "UniViTAR", "checkpoint_filter_fn"]

UNIVITAR = Paper(
    20,
    "UniViTAR: Unified Vision Transformer with Native Resolution",
    "2504.01792",
    "https://github.com/MM-MVR/UniViTAR",
    kind="B+T",
)


class RopeAttention(Attention):
    """Self-attention with 2-D RoPE on q/k, then RMSNorm over all heads (QK-Norm), through ``layers.attend``.

    ``forward(x, grid)`` derives the rotation from the patch grid; ``forward(x, bias=mask, angles=a)`` takes the
    angles (``(B, N, head_dim // 2)``) of a packed sequence and its block-diagonal mask.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, rope_theta: float = 10000.0) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.rope_theta = rope_theta
        self.q_norm = RmsNorm(dim, eps=1e-6)
        self.k_norm = RmsNorm(dim, eps=1e-6)

    def _norm(self, norm: nn.Module, t: torch.Tensor) -> torch.Tensor:
        B, h, N, d = t.shape  # the norm runs over all heads' channels of a token
        return norm(t.transpose(1, 2).reshape(B, N, h * d)).reshape(B, N, h, d).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid | None = None,
        bias: torch.Tensor | None = None,
        angles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        if angles is None:
            if grid is None or (not is_fx_tracing() and grid[0] * grid[1] != N):
                raise ValueError(f"RopeAttention needs the token grid of its {N} tokens, or explicit angles")
            angles = rope_2d_angles(grid_positions(grid, x.device), self.head_dim, self.rope_theta)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self._norm(self.q_norm, apply_rope(q, angles))
        k = self._norm(self.k_norm, apply_rope(k, angles))
        out = attend(q, k, v, bias, self.attn_drop if self.training else 0.0, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class _Block(MetaBlock):
    """A ``MetaBlock`` whose attention may also take a packing mask and RoPE angles."""

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid | None = None,
        bias: torch.Tensor | None = None,
        angles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, bias, angles)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class UniViTAR(IsotropicBackbone):
    """Native-resolution ViT: 2-D RoPE, SwiGLU, RMSNorm, QK-Norm, LayerScale; no class token (mean pool).

    Args:
        mlp_ratio: SwiGLU hidden width over ``embed_dim`` (the official ``intermediate_size * 2 / 3``).
        init_values: LayerScale's initial value.
        Other keywords: ``IsotropicBackbone``'s.
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 2.75,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        init_values: float = 0.1,
        patch_size: int = 14,
        **kwargs: Any,
    ) -> None:
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"embed_dim / num_heads must be a multiple of 4 for 2-D RoPE, got {embed_dim}/{num_heads}")
        norm_layer = partial(RmsNorm, eps=1e-6)
        mixer = partial(RopeAttention, num_heads=num_heads, qkv_bias=qkv_bias, rope_theta=rope_theta)
        mlp = partial(SwiGLU, norm_layer=norm_layer)

        def block_fn(i: int, drop_path: float) -> nn.Module:
            return _Block(embed_dim, mixer, mlp, norm_layer, mlp_ratio, drop_path, layer_scale=init_values)

        kwargs.setdefault("global_pool", "avg")
        kwargs.setdefault("norm_layer", norm_layer)
        super().__init__(
            block_fn, depth, embed_dim, patch_size=patch_size, class_token=False, pos_embed=False, **kwargs
        )
        self.patch_size = patch_size

    def _embed_images(self, images: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        in_chans = self.patch_embed.proj.in_channels
        tokens, positions = [], []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != in_chans or min(img.shape[1:]) < self.patch_size:
                raise ValueError(
                    f"images[{i}]: expected a ({in_chans}, H, W) tensor with H, W >= {self.patch_size}, "
                    f"got shape {tuple(img.shape)}"
                )
            t = self.patch_embed(img[None])[0]  # (h, w, C)
            tokens.append(t.flatten(0, 1))
            positions.append(grid_positions((t.shape[0], t.shape[1]), img.device))
        return tokens, positions

    def forward_packed_features(
        self, images: Sequence[torch.Tensor], max_len: int | None = None, one_per_row: bool = False
    ) -> list[torch.Tensor]:
        """Per-image normed tokens ``[(N_i, C)]`` for ``(C, H_i, W_i)`` images of any sizes, run packed.

        ``max_len``: tokens per packed row (default: all images in one row); ``one_per_row``: plain padding.
        """
        if len(images) == 0:
            raise ValueError("images must be a non-empty list of (C, H, W) tensors")
        tokens, positions = self._embed_images(images)
        device = tokens[0].device
        plan = pack_sequences([len(t) for t in tokens], max_len, one_per_row, device=device)
        x = self.pos_drop(plan.pack(tokens))  # (R, L, C)
        angles = rope_2d_angles(plan.pack(positions), self.embed_dim // self.blocks[0].attn.num_heads)
        angles = angles.to(device)
        mask = plan.attn_mask()  # (R, 1, L, L) block-diagonal
        for block in self.blocks:
            x = block(x, None, mask, angles)
        return plan.unpack(self.norm(x))

    def forward_packed(
        self, images: Sequence[torch.Tensor], max_len: int | None = None, one_per_row: bool = False
    ) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a list of images of different sizes (native resolution)."""
        feats = self.forward_packed_features(images, max_len, one_per_row)
        return self.head(self.head_drop(torch.stack([f.mean(dim=0) for f in feats])))


# Official (modeling_univitar.py) key names onto ours, applied in order.
_OFFICIAL_RENAMES = (
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.", "blocks."),
    (r"\.mlp\.fc1\.", ".mlp.fc1_g."),
    (r"\.mlp\.fc3\.", ".mlp.fc1_x."),
    (r"\.ls([12])$", r".ls\1.gamma"),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, Any]:
    """Map an official UniViTAR state dict onto ours; the Conv3d patch kernel is summed over its two frames."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            key = re.sub(pattern, repl, key)
        if key == "patch_embed.proj.weight" and value.ndim == 5:
            value = value.sum(dim=2)  # an image is two identical frames: (D, C, T, p, p) -> (D, C, p, p)
        out[key] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> UniViTAR:
    return build_with_features(UniViTAR, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32}

VARIANTS = {
    "univitar_0_3b_patch14_224": VariantSpec(
        UNIVITAR,
        kwargs={"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 2.75, "patch_size": 14},
        ref_params_m=310.0,
        ref_source="official README model zoo (UniViTAR-0.3B, 310M) and modeling_univitar.py defaults",
        test_kwargs=_TINY,
        isotropic=True,
        description="native resolution: forward_packed(list of images)",
    ),
    "univitar_nano_patch4_28": VariantSpec(
        UNIVITAR,
        kwargs=dict(
            embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, patch_size=4, img_size=28, in_chans=1, num_classes=10
        ),
        img_size=28,
        in_chans=1,
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        ref_source="vitlab small-image size (no paper table)",
        test_kwargs=_TINY,
        isotropic=True,
        description="UniViTAR for 28-32 px, 128 wide, 6 deep (vit_nano_patch4_28's shape)",
    ),
}

register_variants(_create, VARIANTS, module=__name__)
