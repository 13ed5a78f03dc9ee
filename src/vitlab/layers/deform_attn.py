"""Multi-scale deformable attention in plain PyTorch (CPU and GPU), from Deformable DETR.

Paper: "Deformable DETR: Deformable Transformers for End-to-End Object Detection", Zhu et al., arXiv:2010.04159
(Sec. 4.1, Eq. 3); official code https://github.com/fundamentalvision/Deformable-DETR. Each query attends to
``num_points`` bilinearly sampled points per head and level around a reference point, with softmax weights
predicted from the query. This file provides the sampling op ``multi_scale_deformable_attention`` (one
``F.grid_sample`` per level, heads folded into the batch), the ``MultiScaleDeformableAttention`` module (parameter
names and init of the official code, so Deformable-DETR / ViT-Adapter / Mask2Former weights load), the encoder's
``reference_points_for`` and ``flatten_levels``. Used by ViT-CoMer, Mask2Former's pixel decoder, ViDT, MonoDINO.

Deviations: no CUDA kernel (and no ``im2col_step``); same maths as the official ``ms_deform_attn_core_pytorch``.
``padding_mask`` is True at padded positions (the official convention; HF transformers passes the inverse).
``value_ratio`` (ViT-Adapter's ``deform_ratio``) narrows the value/output projections. Sampling runs in the wider
of the value's and the locations' dtypes, so float32 locations keep sub-pixel precision over bfloat16 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tracing import is_fx_tracing

__all__ = [
    "MultiScaleDeformableAttention",
    "deformable_init_",
    "flatten_levels",
    "multi_scale_deformable_attention",
    "reference_points_for",
]

Shapes = Sequence[tuple[int, int]] | torch.Tensor


def _as_shapes(spatial_shapes: Shapes) -> list[tuple[int, int]]:
    """``spatial_shapes`` as a list of ``(H_l, W_l)`` Python ints (the export-friendly form)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[-1] != 2:
            raise ValueError(f"spatial_shapes must be (L, 2) of (H_l, W_l), got shape {tuple(spatial_shapes.shape)}")
        if torch.compiler.is_compiling() or is_fx_tracing():
            raise ValueError(
                "spatial_shapes must be a list of (H_l, W_l) Python ints while tracing (torch.export/compile/fx): "
                "a tensor's values are data the graph cannot branch on"
            )
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    shapes = [tuple(hw) for hw in spatial_shapes]
    if not shapes or any(len(hw) != 2 for hw in shapes):
        raise ValueError(f"spatial_shapes must be a non-empty sequence of (H_l, W_l) pairs, got {spatial_shapes!r}")
    return shapes  # type: ignore[return-value]


def _check_inputs(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor):
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, num_heads, head_dim), got shape {tuple(value.shape)}")
    B, S, H = value.shape[:3]
    L = len(shapes)
    if locations.dim() != 6 or locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, num_heads, L, P, 2), got shape {tuple(locations.shape)}")
    if locations.shape[0] != B or locations.shape[2] != H or locations.shape[3] != L:
        raise ValueError(
            f"sampling_locations must be (B={B}, Q, num_heads={H}, L={L}, P, 2) to match value and spatial_shapes, "
            f"got shape {tuple(locations.shape)}"
        )
    if weights.shape != locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be (B, Q, num_heads, L, P) = {tuple(locations.shape[:-1])}, "
            f"got shape {tuple(weights.shape)}"
        )
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(f"value has S={S} positions but spatial_shapes {list(shapes)} sum to {total}")


def _contiguous(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.contiguous()


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of each level's values (Eq. 3 without the projections).

    Args:
        value: ``(B, S, num_heads, head_dim)``, levels flattened row-major, concatenated fine to coarse.
        spatial_shapes: ``(H_l, W_l)`` per level, Python ints (fast, export-friendly) or an ``(L, 2)`` tensor.
        sampling_locations: ``(B, Q, num_heads, L, P, 2)`` normalised ``(x, y)``; 0 and 1 are the outer edges of
            the border pixels, outside samples read zeros (``grid_sample(align_corners=False)`` with ``2x - 1``).
        attention_weights: ``(B, Q, num_heads, L, P)``, already normalised.

    Returns:
        ``(B, Q, num_heads * head_dim)`` in the value's dtype.
    """
    shapes = _as_shapes(spatial_shapes)
    if not is_fx_tracing():
        _check_inputs(value, shapes, sampling_locations, attention_weights)
    B, S, H, D = value.shape[0], value.shape[1], value.shape[2], value.shape[3]
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    # heads join the batch, so one grid_sample per level serves them all: (B * H, D, S), then a view per level
    levels = value.to(dtype).permute(0, 2, 3, 1).reshape(B * H, D, S).split([h * w for h, w in shapes], dim=-1)
    # NOTE: points before queries, so samples come out (B * H, D, P, Q) and the weighted sum over points runs over
    # contiguous rows of queries (up to 3x faster on CPU than summing an innermost P). The explicit .contiguous():
    # for B == 1 the reshape would return a strided view that makes the elementwise ops several times slower.
    grids = (2 * sampling_locations.to(dtype) - 1).permute(0, 2, 3, 4, 1, 5).contiguous()
    grids = grids.view(B * H, L, P, Q, 2).unbind(1)
    weights = attention_weights.to(dtype).permute(0, 2, 3, 4, 1).contiguous().view(B * H, L, 1, P, Q).unbind(1)
    out = None
    for i, (h, w) in enumerate(shapes):
        sampled = F.grid_sample(
            levels[i].view(B * H, D, h, w), grids[i], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B * H, D, P, Q)
        part = (sampled * weights[i]).sum(2)
        out = part if out is None else out + part
    assert out is not None  # spatial_shapes is non-empty
    if not is_fx_tracing() and out.requires_grad:
        # NOTE: the gradient arrives as a transposed view of (B, Q, H * D); made contiguous here, at 1/P of the
        # samples' size, rather than by grid_sample's backward on every level's strided (B * H, D, P, Q) gradient
        # (forward + backward about 1.5x faster on CPU at B = 1)
        out.register_hook(_contiguous)
    return out.view(B, H * D, Q).transpose(1, 2).contiguous().to(value.dtype)


def reference_points_for(
    spatial_shapes: Shapes, valid_ratios: torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Pixel-centre reference point of every flattened position, on every level (the Deformable-DETR encoder's).

    Args:
        spatial_shapes: ``(H_l, W_l)`` per level.
        valid_ratios: ``(B, L, 2)`` share ``(x, y)`` of each level that is not padding; None: no padding.
        device: where to build them (default: that of ``valid_ratios`` / ``spatial_shapes``).

    Returns:
        ``(B or 1, S, L, 2)`` normalised ``(x, y)``: position ``s``'s point relative to the valid part of its own
        level, rescaled into each level ``l``'s valid part.
    """
    if device is None and isinstance(spatial_shapes, torch.Tensor):
        device = spatial_shapes.device
    shapes = _as_shapes(spatial_shapes)
    L = len(shapes)
    if valid_ratios is not None:
        if valid_ratios.dim() != 3 or valid_ratios.shape[1:] != (L, 2):
            raise ValueError(f"valid_ratios must be (B, L={L}, 2) of (x, y) ratios, got {tuple(valid_ratios.shape)}")
        device = valid_ratios.device if device is None else device
    dtype = valid_ratios.dtype if valid_ratios is not None else torch.get_default_dtype()
    points = []
    for i, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(
            (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
            (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
            indexing="ij",
        )
        p = torch.stack([x.reshape(-1), y.reshape(-1)], -1)[None]  # (1, h * w, 2)
        points.append(p if valid_ratios is None else p / valid_ratios[:, None, i])
    ref = torch.cat(points, 1)[:, :, None]  # (1 or B, S, 1, 2)
    if valid_ratios is None:
        return ref.expand(-1, -1, L, -1).contiguous()
    return ref * valid_ratios[:, None]


def flatten_levels(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``(B, C, H_l, W_l)`` maps (fine to coarse) -> ``(B, S, C)`` tokens and their ``(H_l, W_l)``."""
    if len(maps) == 0 or any(m.dim() != 4 for m in maps):
        raise ValueError(f"maps must be a non-empty sequence of (B, C, H, W) tensors, got {[m.dim() for m in maps]}-D")
    if not is_fx_tracing() and any(m.shape[:2] != maps[0].shape[:2] for m in maps):
        raise ValueError(f"maps must share (B, C), got {[tuple(m.shape) for m in maps]}")
    shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1), shapes


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Eq. 3): queries ``(B, Q, dim)`` read a flattened memory ``(B, S, dim)``.

    Args:
        num_levels: feature levels in the memory (L).
        num_points: sampled points per head and level (P).
        value_ratio: width of the value/output projections relative to ``dim`` (ViT-Adapter's ``deform_ratio``).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, num_levels: int = 4, num_points: int = 4, value_ratio: float = 1.0
    ) -> None:
        super().__init__()
        value_dim = int(dim * value_ratio)
        if num_heads < 1 or value_dim < 1 or value_dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the value width int(dim * value_ratio) = int({dim} * "
                f"{value_ratio}) = {value_dim}"
            )
        if num_levels < 1 or num_points < 1:
            raise ValueError(f"num_levels and num_points must be >= 1, got {num_levels} and {num_points}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.head_dim = value_dim // num_heads
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        deformable_init_(self, self.num_heads, self.num_levels, self.num_points)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: Shapes,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to ``value``.

        Args:
            query: ``(B, Q, dim)``, positional embedding already added.
            reference_points: ``(B or 1, Q, L, 2)`` normalised ``(x, y)``, or ``(B or 1, Q, L, 4)`` boxes
                ``(cx, cy, w, h)``, whose offsets are scaled by ``(w, h) / (2 P)``.
            value: ``(B, S, dim)``, the flattened multi-scale memory.
            spatial_shapes: ``(H_l, W_l)`` per level.
            padding_mask: ``(B, S)`` bool, True at padded positions (their values are zeroed).
        """
        shapes = _as_shapes(spatial_shapes)
        H, L, P = self.num_heads, self.num_levels, self.num_points
        if not is_fx_tracing():
            self._check(query, reference_points, value, shapes, padding_mask)
        B, Q, S = query.shape[0], query.shape[1], value.shape[1]
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        ref = reference_points[:, :, None, :, None]  # (B, Q, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level
            size = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = ref + offsets / size[:, None]
        else:
            locations = ref[..., :2] + offsets * ref[..., 2:] * (0.5 / P)
        out = multi_scale_deformable_attention(v.view(B, S, H, self.head_dim), shapes, locations, weights)
        return self.output_proj(out)

    def _check(self, query, reference_points, value, shapes, padding_mask) -> None:
        L = self.num_levels
        if query.dim() != 3 or query.shape[-1] != self.dim:
            raise ValueError(f"query must be (B, Q, dim={self.dim}), got shape {tuple(query.shape)}")
        B, Q = query.shape[:2]
        if value.dim() != 3 or value.shape[0] != B or value.shape[-1] != self.dim:
            raise ValueError(f"value must be (B={B}, S, dim={self.dim}), got shape {tuple(value.shape)}")
        if len(shapes) != L:
            raise ValueError(f"spatial_shapes must give num_levels={L} levels, got {len(shapes)}: {shapes}")
        ref = reference_points
        if ref.dim() != 4 or ref.shape[0] not in (1, B) or ref.shape[1] != Q or ref.shape[2] != L:
            raise ValueError(
                f"reference_points must be (B={B} or 1, Q={Q}, L={L}, 2 or 4), got shape {tuple(ref.shape)}"
            )
        if ref.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h) coordinates, got {ref.shape[-1]}"
            )
        if padding_mask is not None and (padding_mask.shape != value.shape[:2] or padding_mask.dtype != torch.bool):
            raise ValueError(
                f"padding_mask must be a bool (B, S) = {tuple(value.shape[:2])} tensor, "
                f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
            )


@torch.no_grad()
def deformable_init_(module: nn.Module, heads: int, levels: int, points: int) -> None:
    """Deformable DETR's init of a module with ``sampling_offsets``, ``attention_weights``, ``value_proj`` and
    ``output_proj`` linears: head ``h``'s points start along direction ``2 pi h / heads``, point ``p`` at ``p + 1``
    pixels of every level (directions scaled to unit max-norm, as in the official code), uniform attention."""
    angles = torch.arange(heads, dtype=torch.float64) * (2 * math.pi / heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().amax(-1, keepdim=True)
    steps = torch.arange(1, points + 1, dtype=torch.float64)
    bias = directions[:, None, None, :] * steps[None, None, :, None]  # (heads, 1, points, 2)
    nn.init.zeros_(module.sampling_offsets.weight)
    module.sampling_offsets.bias.copy_(bias.expand(heads, levels, points, 2).reshape(-1))
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    for proj in (module.value_proj, module.output_proj):
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)
