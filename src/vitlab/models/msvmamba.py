"""MSVMamba: "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model" (arXiv:2405.14174),
github.com/YuHengsss/MSVMamba (master branch, commit c394019; PAPERS.md row 10).

A four-stage VMamba-style backbone: a 4x4 patch embedding, then per stage ``MetaBlock``s of
``LayerNorm -> SelectiveScan2d`` (the multi-scale 2-D selective scan, ``layers/multiscale_scan.py``) and
``LayerNorm -> ConvFfn`` (``layers/mlp.py``, hidden width 2x), with 2x2 patch merging between stages.
Variants N/M/T follow the official configs ``classification/configs/ms_vssm/vssm_{nano,micro,tiny}_224_ms.yaml``
(d_state 1, ssm_ratio 2, multi-scale scan and SE gate in every stage, ConvFFN, no plain MLP).

Official checkpoints (master branch, ``{"model": ...}``) load through ``checkpoint_filter_fn``.

Deviations: none in the function; it follows the official code, where the three half-scale routes are
concatenated into one scanned sequence (the state carries from one route into the next). The SE gate is
timm's ``SEModule`` (1x1 convs for the official bias-free linears: same function and parameters).
FLOPs: the scan's are added by VMamba's formula through ``vitlab::selective_scan_flops``; torch's counter,
unlike the official fvcore count, leaves out norms, bilinear upsampling and pooling (1-2% lower here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import ConvEmbed, ConvFfn, Grid, HierarchicalBackbone, MetaBlock, SelectiveScan2d, Stage
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["MSVMAMBA", "VARIANTS", "MSVMamba", "checkpoint_filter_fn"]

MSVMAMBA = Paper(
    10,
    "Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model",
    "2405.14174",
    "https://github.com/YuHengsss/MSVMamba",
)


class _PatchStem(ConvEmbed):
    """Non-overlapping ``patch_size`` conv + LayerNorm: image -> ``((B, H/p * W/p, C), grid)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:  # type: ignore[override]
        x = super().forward(x)  # (B, H', W', C)
        return x.flatten(1, 2), (x.shape[1], x.shape[2])


class _PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (odd sizes zero-padded), LayerNorm, linear to ``out_dim``."""

    stride = 2  # read by Stage for feature_info

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        H, W = grid
        x = F.pad(x.unflatten(1, (H, W)), (0, 0, 0, W % 2, 0, H % 2))  # (B, H+, W+, C)
        # official channel order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, i::2, j::2] for j in (0, 1) for i in (0, 1)], dim=-1)
        grid = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.flatten(1, 2))), grid


class MSVMamba(HierarchicalBackbone):
    """Multi-scale VMamba: four stages of multi-scale 2-D selective scan + ConvFFN blocks.

    Args:
        img_size: accepted for timm's interface; nothing depends on it (no position embeddings).
        embed_dim: stage-1 width, doubled per stage; or one width per stage.
        d_state, ssm_ratio, ms_kernel_size, use_se: ``SelectiveScan2d``'s; ffn_ratio: ConvFFN hidden width.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int | Sequence[int] = 96,
        depths: Sequence[int] = (1, 2, 9, 2),
        patch_size: int = 4,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        ms_kernel_size: int = 7,
        use_se: bool = True,
        ffn_ratio: float = 2.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be positive integers, one per stage, got {depths!r}")
        dims = [embed_dim * 2**i for i in range(len(depths))] if isinstance(embed_dim, int) else list(embed_dim)
        if len(dims) != len(depths) or any(d < 1 for d in dims):
            raise ValueError(f"embed_dim must be a positive int or one per stage ({len(depths)}), got {embed_dim!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
        mixer = partial(SelectiveScan2d, d_state=d_state, ssm_ratio=ssm_ratio, ms_kernel_size=ms_kernel_size)
        mixer = partial(mixer, use_se=use_se)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # timm's linear rule
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            blocks = [
                MetaBlock(dim, mixer, ConvFfn, norm_layer, ffn_ratio, drop_path=rates[sum(depths[:i]) + j])
                for j in range(depth)
            ]
            downsample = _PatchMerging(dims[i - 1], dim, norm_layer) if i else None
            stages.append(Stage(blocks, dim, downsample))
        stem = _PatchStem(in_chans, dims[0], patch_size, patch_size, 0, norm_layer)
        super().__init__(
            stem,
            stages,
            stem_stride=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            norm_layer=norm_layer,
        )
        self.img_size = img_size

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the S6 decay logits and skips (Mamba and the official code exclude them)
        return {n for n, _ in self.named_parameters() if n.endswith((".A_logs", ".Ds"))}


# Official key renames onto ours, in order (classification/models/vmamba.py of the master branch).
_RENAMES = (
    (r"^patch_embed\.0\.", "stem.proj."),
    (r"^patch_embed\.2\.", "stem.norm."),
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample."),  # merging ends stage i
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"(blocks\.\d+)\.norm\.", r"\1.norm1."),
    (r"\.op\.", ".mixer."),
    (r"\.se\.fc\.0\.", ".se.fc1."),
    (r"\.se\.fc\.2\.", ".se.fc2."),
    (r"\.convFFN\.linear1\.", ".mlp.fc1."),
    (r"\.convFFN\.dwc\.", ".mlp.dwconv."),
    (r"\.convFFN\.linear2\.", ".mlp.fc2."),
    (r"^classifier\.", ""),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, Any]:
    """Map an official MSVMamba checkpoint (``{"model": ...}`` or a bare state dict) onto this file's names.

    The official 1x1-conv FFN weights become linear weights and the SE linears become 1x1 convs.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict  # already ours
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.mlp\.fc[12]\.weight$", key):
            value = value.flatten(1)  # (out, in, 1, 1) conv -> (out, in) linear
        elif re.search(r"\.se\.fc[12]\.weight$", key):
            value = value[:, :, None, None]  # linear -> 1x1 conv
        out[key] = value
    return out


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MSVMamba:
    return build_with_features(MSVMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


# Four stages at 32 px (8x8 down to 1x1 tokens): both scan branches, SE, ConvFFN and merging with padding.
_TINY = {"embed_dim": 16, "depths": (1, 1, 1, 1), "img_size": 32}


def _spec(arch: dict[str, Any], params_m: float, gmacs: float, name: str) -> VariantSpec:
    return VariantSpec(
        MSVMAMBA,
        kwargs=arch,
        ref_params_m=params_m,
        ref_gmacs=gmacs,
        ref_source=f"official config comment, classification/configs/ms_vssm/vssm_{name}_224_ms.yaml "
        "(the paper and README round them)",
        test_kwargs=_TINY,
        first_conv="stem.proj",
        pool_reduction=32,
        exportable=True,
        fx_traceable=False,
        fx_reason="SelectiveScan2d picks its chunking and scan path from the grid size and values in Python",
        description="Multi-scale 2-D selective scan + ConvFFN (ImageNet-1k, 224 px).",
    )


# Paper/README: Nano 7M 0.9G, Micro 12M 1.5G, Tiny 33M 4.6G; the configs give the unrounded figures.
VARIANTS = {
    "msvmamba_nano": _spec({"embed_dim": 48, "depths": (1, 2, 5, 2)}, 6.86, 0.88, "nano"),
    "msvmamba_micro": _spec({"embed_dim": 64, "depths": (1, 2, 5, 2)}, 11.88, 1.532, "micro"),
    "msvmamba_tiny": _spec({"embed_dim": 96, "depths": (1, 2, 9, 2)}, 33.08, 4.613, "tiny"),
}

register_variants(_create, VARIANTS, module=__name__)
