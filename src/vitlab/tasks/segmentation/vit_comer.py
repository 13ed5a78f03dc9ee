"""ViT-CoMer (Xia et al., "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for
Dense Predictions", CVPR 2024, arXiv:2403.07392, github.com/Traffic-X/ViT-CoMer): a plain ViT made a dense
backbone by a CNN branch that talks to it between groups of blocks. Task ``"vit_comer"`` (semantic segmentation).

- **CNN branch** (the code's ``CNN``/SPM): a ResNet-style stem and three stride-2 convs give maps at strides
  p/4, p/2, p, 2p of the ViT's patch size p, each projected to the ViT width by a 1x1 conv.
- **MRFP**: on the p/2, p, 2p maps as one token set: fc (hidden ratio 6), then per level half the channels
  through a 3x3 and half through a 5x5 depthwise conv, BatchNorm, GELU, then fc.
- **CTI to ViT**: the ViT tokens are added to the stride-p level; the pyramid attends to itself by multi-scale
  deformable attention (pyramid tokens as queries) plus a conv FFN; its three levels resampled to stride p and
  summed are added to the ViT tokens through a zero-initialised scale ``gamma``.
- **CTI to CNN**: after the group of ViT blocks their tokens are added to the stride-p level again and the
  pyramid self-interacts again; the last group adds four more such layers (``extra_cti``).
- Four interactions around equal groups of blocks; the outputs of the groups are added to the four pyramid
  maps (upsampled x4, x2, kept, pooled x2), BatchNorm per level, then UperNet.

Reconstructed from the official code (the paper body is not reachable here); its ViT-CoMer-T configuration
(DeiT-T, ``conv_inplane`` 64, 6 deformable heads, 4 points, conv FFN ratio 0.25) is the default, and the
parameter count matches the code (tested). Quirks of the code kept as they define the published model: the
CTI-to-CNN pyramid is layer-normed twice and its residual starts from the normed pyramid, the CTI-to-ViT
attention output has no residual before its FFN, and MRFP applies GELU twice. The code's stride-16 ViT fixes
the CNN's strides; here they follow the patch size (p in 4, 8, 16). The ViT keeps its class token (the code
drops it). ``cnn_branch`` / ``mrfp`` / ``cti_to_vit`` / ``cti_to_cnn`` switch the components off for ablations.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ...layers import ConvFfn, MultiScaleDeformableAttention, reference_points_for
from ...layers.block import Grid, map_to_tokens, tokens_to_map
from ...models import Paper
from .._backbone import PlainViTTrunk
from .._registry import register_task
from ..base import TaskModel, TaskSpec
from .semantic import SemanticSegmentation
from .upernet import UperNetHead

__all__ = ["CoMerInteraction", "ConvBranch", "MultiReceptiveFieldPyramid", "ViTCoMer"]

PAPER = Paper(
    30,
    "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for Dense Predictions",
    "2403.07392",
    "https://github.com/Traffic-X/ViT-CoMer",
    kind="H",
)

Levels = list[Grid]  # the pyramid's (H, W) per level, finest first


def _split(tokens: torch.Tensor, levels: Levels) -> list[torch.Tensor]:
    return list(tokens.split([h * w for h, w in levels], dim=1))


def _resize(tokens: torch.Tensor, grid: Grid, size: Grid) -> torch.Tensor:
    """Tokens on ``grid`` bilinearly resampled to ``size``, as tokens."""
    if tuple(grid) == tuple(size):
        return tokens
    return map_to_tokens(F.interpolate(tokens_to_map(tokens, grid), size=size, mode="bilinear"))[0]


def _resize_map(x: torch.Tensor, size: Grid) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvBranch(nn.Module):
    """Image -> CNN maps at strides p/4, p/2, p, 2p, all ``dim`` wide (the code's SPM), ``p`` in 4, 8, 16."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, width: int = 64) -> None:
        super().__init__()
        if patch_size not in (4, 8, 16):
            raise ValueError(f"ViT-CoMer's CNN branch needs a patch size of 4, 8 or 16, got {patch_size}")
        stem_stride = patch_size // 4  # 1, 2 or 4: a strided first conv, then a max pool for 4
        stem = _conv_bn_relu(in_chans, width, min(stem_stride, 2)) + _conv_bn_relu(width, width)
        stem += _conv_bn_relu(width, width)
        if stem_stride == 4:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        widths = (width, 2 * width, 4 * width, 4 * width)
        self.downs = nn.ModuleList(nn.Sequential(*_conv_bn_relu(a, b, 2)) for a, b in itertools.pairwise(widths))
        self.proj = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in widths)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.stem(image)]
        for down in self.downs:
            maps.append(down(maps[-1]))
        return [proj(m) for proj, m in zip(self.proj, maps, strict=True)]


class _SplitDepthwise(nn.Module):
    """One level of MRFP: half the channels through a 3x3, half through a 5x5 depthwise conv, BN, GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.small = nn.Conv2d(half, half, 3, padding=1, groups=half)
        self.large = nn.Conv2d(dim - half, dim - half, 5, padding=2, groups=dim - half)
        self.norm = nn.BatchNorm2d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split([self.small.in_channels, self.large.in_channels], dim=1)
        return self.act(self.norm(torch.cat([self.small(a), self.large(b)], dim=1)))


class MultiReceptiveFieldPyramid(nn.Module):
    """MRFP on pyramid tokens: fc -> per-level split depthwise 3x3/5x5 + BN + GELU -> GELU -> fc."""

    def __init__(self, dim: int, hidden_ratio: float = 6.0, num_levels: int = 3) -> None:
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.levels = nn.ModuleList(_SplitDepthwise(hidden) for _ in range(num_levels))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c: torch.Tensor, levels: Levels) -> torch.Tensor:
        parts = _split(self.fc1(c), levels)
        parts = [
            map_to_tokens(conv(tokens_to_map(t, g)))[0] for conv, t, g in zip(self.levels, parts, levels, strict=True)
        ]
        return self.fc2(self.act(torch.cat(parts, dim=1)))


class _LevelFfn(nn.Module):
    """A conv FFN (PVTv2 form) run level by level, one depthwise conv shared by the levels (as the code)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.ffn = ConvFfn(dim, int(dim * ratio), dw_residual=False)

    def forward(self, c: torch.Tensor, levels: Levels) -> torch.Tensor:
        return torch.cat([self.ffn(t, g) for t, g in zip(_split(c, levels), levels, strict=True)], dim=1)


class _PyramidAttention(nn.Module):
    """The pyramid attends to itself: ``q + deform(norm(q), norm(q))`` then ``+ ffn(norm(.))`` (the code's
    ``MultiscaleExtractor``); ``residual=False`` drops the attention residual (CTI to ViT)."""

    def __init__(self, dim: int, heads: int, points: int, ffn_ratio: float, residual: bool = True) -> None:
        super().__init__()
        self.query_norm, self.value_norm, self.ffn_norm = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn = MultiScaleDeformableAttention(dim, heads, num_levels=3, num_points=points)
        self.ffn = _LevelFfn(dim, ffn_ratio)
        self.residual = residual

    def forward(self, c: torch.Tensor, levels: Levels) -> torch.Tensor:
        ref = reference_points_for(levels, device=c.device).expand(c.shape[0], -1, -1, -1)
        out = self.attn(self.query_norm(c), ref, self.value_norm(c), levels)
        c = c + out if self.residual else out
        return c + self.ffn(self.ffn_norm(c), levels)


class _CtiToCnn(nn.Module):
    """ViT tokens into the stride-p level, then pyramid self-attention on the normed pyramid (the code's
    ``CTI_toC``; ``with_ffn`` adds a conv FFN first, the code's ``Extractor_CTI`` of the last interaction)."""

    def __init__(self, dim: int, heads: int, points: int, ffn_ratio: float, with_ffn: bool = False) -> None:
        super().__init__()
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6) if with_ffn else None
        self.ffn = _LevelFfn(dim, ffn_ratio) if with_ffn else None
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attend = _PyramidAttention(dim, heads, points, ffn_ratio)

    def forward(self, c: torch.Tensor, x: torch.Tensor, levels: Levels) -> torch.Tensor:
        c = _add_to_level(c, x, levels, 1)
        if self.ffn is not None:
            c = c + self.ffn(self.ffn_norm(c), levels)
        return self.attend(self.norm(c), levels)  # NOTE: the code's residual starts from the normed pyramid


def _add_to_level(c: torch.Tensor, x: torch.Tensor, levels: Levels, level: int) -> torch.Tensor:
    parts = _split(c, levels)
    parts[level] = parts[level] + x
    return torch.cat(parts, dim=1)


class CoMerInteraction(nn.Module):
    """One interaction around a group of ViT blocks: MRFP and CTI to ViT before, CTI to CNN after."""

    def __init__(
        self,
        dim: int,
        heads: int,
        points: int,
        ffn_ratio: float,
        mrfp_ratio: float,
        *,
        mrfp: bool = True,
        cti_to_vit: bool = True,
        cti_to_cnn: bool = True,
        extra_cti: int = 0,
    ) -> None:
        super().__init__()
        self.mrfp = MultiReceptiveFieldPyramid(dim, mrfp_ratio) if mrfp else None
        self.to_vit = _PyramidAttention(dim, heads, points, ffn_ratio, residual=False) if cti_to_vit else None
        self.gamma = nn.Parameter(torch.zeros(dim)) if cti_to_vit else None
        self.to_cnn = nn.ModuleList()
        if cti_to_cnn:
            self.to_cnn.append(_CtiToCnn(dim, heads, points, ffn_ratio))
            self.to_cnn.extend(_CtiToCnn(dim, heads, points, ffn_ratio, with_ffn=True) for _ in range(extra_cti))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, levels: Levels, run_blocks: Any, num_prefix: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
        grid = levels[1]
        if self.mrfp is not None:
            c = self.mrfp(c, levels)
        if self.to_vit is not None:
            c = _add_to_level(c, patches, levels, 1)
            fed = _split(self.to_vit(c, levels), levels)
            patches = patches + self.gamma * sum(_resize(t, g, grid) for t, g in zip(fed, levels, strict=True))
        x = run_blocks(torch.cat([prefix, patches], dim=1))
        for layer in self.to_cnn:
            c = layer(c, x[:, num_prefix:], levels)
        return x, c


def _groups(depth: int, count: int) -> list[tuple[int, int]]:
    """``count`` consecutive groups of blocks covering ``depth`` (the code's [[0, 2], [3, 5], [6, 8], [9, 11]])."""
    bounds = [round(depth * i / count) for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


class ViTCoMer(SemanticSegmentation):
    """A plain ViT (by name) + ViT-CoMer's CNN branch and interactions + UperNet -> logits ``(B, K, H, W)``.

    Args:
        width: UperNet's channels (512 in the paper's ADE20K recipe).
        conv_width: the CNN branch's base width (the code's ``conv_inplane``).
        deform_heads: deformable attention heads; default the largest of 6, 4, 3, 2, 1 dividing the ViT width.
        cnn_branch, mrfp, cti_to_vit, cti_to_cnn: the components, for ablations (without the CNN branch the
            pyramid is the ViT's four group outputs resampled to the four strides).
        interactions: number of block groups (4 in the paper; at most the ViT's depth).
    """

    task_name = "vit_comer"

    def __init__(
        self,
        backbone: str = "vit_micro_patch4_28",
        *,
        num_classes: int = 11,
        in_chans: int = 1,
        img_size: int = 64,
        width: int = 64,
        backbone_kwargs: dict[str, Any] | None = None,
        conv_width: int = 64,
        deform_heads: int | None = None,
        deform_points: int = 4,
        ffn_ratio: float = 0.25,
        mrfp_ratio: float = 6.0,
        interactions: int = 4,
        extra_cti: int = 4,
        cnn_branch: bool = True,
        mrfp: bool = True,
        cti_to_vit: bool = True,
        cti_to_cnn: bool = True,
    ) -> None:
        # SemanticSegmentation's loss, metrics and example batch; its own pyramid and head are not built
        TaskModel.__init__(self, backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and at least one class (>= 2), got {num_classes}")
        if not cnn_branch and (mrfp or cti_to_vit or cti_to_cnn):
            raise ValueError("mrfp, cti_to_vit and cti_to_cnn act on the CNN branch: set them False with cnn_branch")
        self.trunk = PlainViTTrunk(backbone, in_chans=in_chans, img_size=img_size, backbone_kwargs=backbone_kwargs)
        dim, p = self.trunk.embed_dim, self.trunk.patch_size
        if not 1 <= interactions <= self.trunk.depth:
            raise ValueError(f"interactions must be in 1..{self.trunk.depth} (the ViT's depth), got {interactions}")
        heads = deform_heads or next(h for h in (6, 4, 3, 2, 1) if dim % h == 0)
        self.groups = _groups(self.trunk.depth, interactions)
        self.cnn = ConvBranch(in_chans, dim, p, conv_width) if cnn_branch else None
        self.level_embed = nn.Parameter(torch.zeros(3, dim)) if cnn_branch else None
        self.interactions = nn.ModuleList(
            CoMerInteraction(
                dim, heads, deform_points, ffn_ratio, mrfp_ratio, mrfp=mrfp, cti_to_vit=cti_to_vit,
                cti_to_cnn=cti_to_cnn, extra_cti=extra_cti if i == interactions - 1 else 0,
            )
            for i in range(interactions)
        )  # fmt: skip
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2) if cnn_branch else None
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        self.head = UperNetHead([dim] * 4, num_classes, channels=width)
        self._init_weights()

    def _init_weights(self) -> None:
        # the code's init for everything but the ViT: trunc-normal linears, He-normal (fan-out) convs
        for module in (self.cnn, self.interactions, self.up):
            for m in module.modules() if module is not None else ():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for m in self.interactions.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()  # its own init (offsets on a circle) replaces the generic one above
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, H, W)`` -> four ``(B, D, ., .)`` maps at strides p/4, p/2, p, 2p."""
        step = 2 * self.trunk.patch_size  # the pyramid's coarsest level is at twice the patch stride
        if image.shape[-2] % step or image.shape[-1] % step:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of {step} (2 x the patch size)")
        x, grid = self.trunk.embed(image)
        P = self.trunk.num_prefix_tokens
        outs = []
        if self.cnn is not None:
            c1, *pyramid = self.cnn(image)
            levels = [tuple(m.shape[-2:]) for m in pyramid]
            c = torch.cat([map_to_tokens(m)[0] + e for m, e in zip(pyramid, self.level_embed, strict=True)], dim=1)
        for (start, stop), interaction in zip(self.groups, self.interactions, strict=True):
            run = lambda t, a=start, b=stop: self.trunk.run_blocks(t, grid, a, b)  # noqa: E731
            if self.cnn is None:
                x = run(x)
            else:
                x, c = interaction(x, c, levels, run, P)
            outs.append(tokens_to_map(x, grid, P))
        if len(outs) < 4:  # fewer groups than levels (tiny test ViTs): the last one serves the rest
            outs += outs[-1:] * (4 - len(outs))
        sizes = self._level_sizes(grid)
        if self.cnn is not None:
            c2, c3, c4 = (tokens_to_map(t, g) for t, g in zip(_split(c, levels), levels, strict=True))
            maps = [self.up(c2) + c1, c2, c3, c4]
            sizes = [tuple(m.shape[-2:]) for m in maps]
        vit = [_resize_map(o, s) for o, s in zip(outs, sizes, strict=True)]
        maps = vit if self.cnn is None else [m + v for m, v in zip(maps, vit, strict=True)]
        return [norm(m) for norm, m in zip(self.norms, maps, strict=True)]

    @staticmethod
    def _level_sizes(grid: Grid) -> list[Grid]:
        h, w = grid
        return [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (math.ceil(h / 2), math.ceil(w / 2))]

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> logits ``(B, num_classes, H, W)``."""
        return self.head(self.pyramid(image), size=(image.shape[-2], image.shape[-1]))


register_task(
    TaskSpec(
        name="vit_comer",
        task="segmentation",
        builder=ViTCoMer,
        metric="miou",
        paper=PAPER,
        ref_metric=43.5,
        ref_source="ViT-CoMer-T + UperNet, ADE20K 512 px, 160k iterations (official README)",
        ref_params_m=38.7,
        description="plain ViT + CNN branch, MRFP and bidirectional deformable CNN-ViT interaction + UperNet",
        test_backbones=("vit_micro_patch4_28", "vir_nano_patch4_28"),
        test_kwargs={"img_size": 32, "interactions": 2, "extra_cti": 1, "conv_width": 8, "mrfp_ratio": 2.0},
        backbones="isotropic",
        backbones_reason="ViT-CoMer runs between the blocks of a plain ViT",
    )
)
