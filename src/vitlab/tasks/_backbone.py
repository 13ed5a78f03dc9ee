"""Backbones for task models, by name, reached only through the model contract.

``create_backbone`` builds any vitlab or timm model without its classifier; ``BackbonePyramid`` reads the
backbone's ``feature_info``, takes the maps it needs with ``forward_intermediates(..., intermediates_only=True)``
and puts the neck its topology calls for on top: ``layers.SimpleFeaturePyramid`` for isotropic backbones (every
reduction equal), ``layers.FeaturePyramidNeck`` for hierarchical ones. Blocks, norms and heads the taps do not
reach are dropped with timm's ``prune_intermediate_layers``, so every remaining parameter is trained.
Nothing here looks inside a backbone (DESIGN.md "Tasks"; STYLE.md B.15).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn as nn

from ..errors import did_you_mean
from ..layers.backbone import IsotropicBackbone
from ..layers.block import Grid
from ..layers.necks import FeaturePyramidNeck, SimpleFeaturePyramid
from ..models import VARIANTS, UnknownModelError, create_model

__all__ = ["BackbonePyramid", "PlainViTTrunk", "create_backbone", "feature_dicts"]

# the strides dense heads work at; finer stages (a CNN's stride-2 stem) cost much and add little
_PYRAMID_STRIDES = (4, 8, 16, 32)


def create_backbone(name: str, *, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    """A vitlab or timm model ``name`` without classifier (``num_classes=0``), for ``in_chans`` and ``img_size``.

    vitlab names go through ``vitlab.create_model`` (its defaults, and ``img_size`` dropped where the model has
    no such argument); timm models whose constructor refuses ``img_size`` (CNNs) are built without it.
    """
    if name in VARIANTS:
        return create_model(name, num_classes=0, in_chans=in_chans, img_size=img_size, **kwargs)
    if not timm.is_model(name):
        names = sorted(set(VARIANTS) | set(timm.list_models()))
        raise UnknownModelError(
            f"unknown backbone {name!r}.{did_you_mean(name, names)} See `vitlab list` or timm.list_models()."
        )
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    # NOTE: size-agnostic timm models (ResNets, ConvNeXt) have no img_size argument and run at any size
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)


def feature_dicts(model: nn.Module) -> list[dict[str, Any]]:
    """The backbone's ``feature_info`` as a list of ``{"num_chs", "reduction", "module"}`` dicts."""
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)  # timm's FeatureInfo object (features_only models) holds the list
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"backbone {type(model).__name__} lacks feature_info or forward_intermediates; task models need "
            "the model contract's multi-scale features"
        )
    return [dict(d) for d in info]


def _spread(count: int, depth: int) -> list[int]:
    """``count`` block indices spread over ``depth`` blocks, the last one included (DPT-style taps)."""
    return [depth - 1 - (depth * (count - 1 - i)) // count for i in range(count)]


class BackbonePyramid(nn.Module):
    """A backbone by name plus the neck its topology needs: image -> maps at ``out_strides``, ``out_channels`` wide.

    Args:
        backbone_kwargs: extra keywords for the backbone's constructor (e.g. a tiny ``depth``).
        isotropic_maps: for isotropic backbones, 1 feeds the last block's map to every pyramid level (ViTDet);
            ``"per_level"`` feeds one block per level, spread over the depth (deeper blocks to coarser levels).
    """

    def __init__(
        self,
        backbone: str,
        *,
        in_chans: int,
        img_size: int,
        out_channels: int = 64,
        backbone_kwargs: dict[str, Any] | None = None,
        isotropic_maps: int | str = 1,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        info = feature_dicts(self.backbone)
        reductions = [d["reduction"] for d in info]
        self.is_isotropic = len(set(reductions)) == 1
        if self.is_isotropic:
            stride = reductions[-1]
            strides = [s for s in _PYRAMID_STRIDES if stride / 4 <= s <= stride * 2] or [stride]
            if isotropic_maps not in (1, "per_level"):
                raise ValueError(f"isotropic_maps must be 1 or 'per_level', got {isotropic_maps!r}")
            count = len(strides) if isotropic_maps == "per_level" else 1
            if count > len(info):
                raise ValueError(f"isotropic_maps='per_level' needs {count} blocks, {backbone!r} has {len(info)}")
            indices = _spread(count, len(info))
            self.neck: nn.Module = SimpleFeaturePyramid(info[-1]["num_chs"], stride, out_channels, strides)
        else:
            indices = self._hierarchical_taps(reductions)
            channels = [info[i]["num_chs"] for i in indices]
            self.neck = FeaturePyramidNeck(channels, [reductions[i] for i in indices], out_channels)
        if hasattr(self.backbone, "prune_intermediate_layers"):
            self.backbone.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.indices = list(indices)
        self.out_channels: int = out_channels
        self.out_strides: tuple[int | float, ...] = tuple(self.neck.out_strides)

    @staticmethod
    def _hierarchical_taps(reductions: Sequence[int]) -> list[int]:
        """The last feature index of each distinct reduction, at stride 4 or coarser where there are such."""
        last = {r: i for i, r in enumerate(reductions)}
        wanted = [r for r in last if r >= _PYRAMID_STRIDES[0]] or list(last)
        return sorted(last[r] for r in wanted)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> ``[(B, out_channels, ~H/s, ~W/s) for s in out_strides]``."""
        maps = self.backbone.forward_intermediates(image, indices=self.indices, intermediates_only=True)
        return self.neck(maps)


class PlainViTTrunk(nn.Module):
    """An isotropic backbone by name, opened between its blocks: ``embed`` then ``run_blocks`` over any range.

    Works for vitlab's ``IsotropicBackbone`` families and timm's ``VisionTransformer`` (and its subclasses);
    the final norm and the classifier are dropped. Tokens keep the backbone's prefix tokens first
    (``num_prefix_tokens``); ``grid`` is the patch grid ``(H/p, W/p)``.

    ``conv_stem=True`` replaces the patchify convolution by a stack of 3x3 stride-2 convolutions (batch norm and
    ReLU between them) to the same token grid and width (timm's ``ConvStem``; Xiao et al., "Early convolutions help
    transformers see better", NeurIPS 2021): a ViT trained from scratch on a few thousand images then picks up small
    local cues (a person's facing) sooner than with a patchify stem (``benchmarks/results/multihmr_facing.md``).

    Raises:
        ValueError: the backbone is hierarchical, reduces tokens, or is not one of those two families; a conv stem
            for a backbone without a patchify convolution or whose patch size is not a power of two.
    """

    def __init__(
        self,
        backbone: str,
        *,
        in_chans: int,
        img_size: int,
        backbone_kwargs: dict[str, Any] | None = None,
        conv_stem: bool = False,
    ) -> None:
        super().__init__()
        model = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        reductions = {d["reduction"] for d in feature_dicts(model)}
        if len(reductions) != 1:
            raise ValueError(
                f"backbone {backbone!r} is hierarchical (reductions {sorted(reductions)}); this task model needs a "
                "plain (isotropic) ViT whose blocks share one token grid"
            )
        self._timm = not isinstance(model, IsotropicBackbone)
        if self._timm and not all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "norm_pre", "blocks")):
            raise ValueError(
                f"backbone {backbone!r} ({type(model).__name__}) is neither a vitlab isotropic model nor a timm "
                "VisionTransformer; this task model runs between its blocks and knows only those two"
            )
        if getattr(model.blocks, "threads_state", False):
            raise ValueError(f"backbone {backbone!r} reduces tokens; this task model needs every patch token")
        model.prune_intermediate_layers(len(model.blocks), prune_norm=True, prune_head=True)
        self.backbone = model
        self.patch_size = int(reductions.pop())
        if conv_stem:
            self._swap_in_conv_stem(backbone, in_chans)
        self.embed_dim = int(feature_dicts(model)[-1]["num_chs"])
        self.depth = len(model.blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def _swap_in_conv_stem(self, name: str, in_chans: int) -> None:
        from timm.models.vision_transformer_hybrid import ConvStem

        p, proj = self.patch_size, getattr(getattr(self.backbone, "patch_embed", None), "proj", None)
        if not isinstance(proj, nn.Conv2d) or proj.stride != (p, p) or p < 2 or p & (p - 1):
            raise ValueError(f"conv_stem needs a backbone whose patch embedding is one convolution of stride = patch "
                             f"size, a power of two; {name!r} has {proj!r} and patch size {p}")  # fmt: skip
        depth = p.bit_length() - 1  # one stride-2 convolution per halving
        self.backbone.patch_embed.proj = ConvStem(in_chans, depth, proj.out_channels, stride=(2,) * depth, padding=1)

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """``(B, C, H, W)`` -> tokens ``(B, P + H/p * W/p, D)`` with position embedding, and the grid."""
        m = self.backbone
        if not self._timm:
            return m._embed(image)
        grid = (image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size)
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(image)))), grid

    def run_blocks(self, x: torch.Tensor, grid: Grid, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` on tokens ``x``."""
        for block in self.backbone.blocks[start:stop]:
            x = block(x) if self._timm else self.backbone._run_block(block, x, grid)
        return x
