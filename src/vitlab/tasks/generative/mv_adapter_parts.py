"""MV-Adapter's parts (paper 41, arXiv:2412.03632): the adapted DiT block, the ray-map condition encoder, the
orbit scenes, the multi-view consistency metric and the frozen base's checkpoint loader. The task model is in
:mod:`.mv_adapter`; its docstring says what is implemented and how it deviates from the paper.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.synthetic.render3d import Box, Scene, item_texture, render
from ...layers.adapters import zero_init_copy, zero_module
from ...layers.attention import attend
from ...layers.camera import Cameras, intrinsics_from_fov, look_at
from ...layers.dit import AdaLNZeroBlock, modulate
from .flow import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "MODES",
    "FlowBaseReload",
    "MVAdapterBlock",
    "RayConditionEncoder",
    "build_flow_base",
    "load_flow_base",
    "multiview_consistency",
    "orbit_object_set",
    "qkv_attention",
    "row_mask",
    "sample_orbit_object",
]

MODES = ("none", "row", "full")


# -- attention ----------------------------------------------------------------------------------------------------
def qkv_attention(
    attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``attn``'s own computation (timm's or vitlab's ``Attention``: ``qkv``, ``proj``) with queries from ``x``
    ``(B, N, C)`` and keys/values from ``context`` ``(B, M, C)`` (default ``x``: self-attention); ``mask`` a bool
    ``(N, M)`` (True = attend). The same weights serve as self- and cross-attention (MV-Adapter's copies)."""
    B, N, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q = attn.qkv(x).reshape(B, N, 3, h, d)[:, :, 0].transpose(1, 2)
    ctx = x if context is None else context
    k, v = attn.qkv(ctx).reshape(B, ctx.shape[1], 3, h, d)[:, :, 1:].permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attend(q, k, v, mask, scale=d**-0.5).transpose(1, 2).reshape(B, N, h * d)
    out = getattr(attn, "norm", nn.Identity())(out)  # timm's optional scale-norm
    return attn.proj(out)


def row_mask(views: int, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """``(V*R*C, V*R*C)`` bool: token (view, row, col) attends to every token of the same row in every view.

    Full multi-view attention under this mask is row-wise attention (the reference computation of the tests).
    """
    row = torch.arange(rows, device=device).repeat_interleave(cols).repeat(views)
    return row[:, None] == row[None, :]


class MVAdapterBlock(nn.Module):
    """A frozen adaLN-Zero block plus MV-Adapter's parallel branches, both added to its self-attention output.

    ``mv_attn``: duplicated self-attention over the views of one scene (``mode`` "row": each query sees the same
    image row of all views; "full": every token of every view; "none": no branch, views stay independent); a copy of
    the block's attention (``copy_weights``; else a fresh random one) whose output layer is zero, so the block starts
    as the base block. ``ref_attn``: image cross-attention from every view to the reference view's features (same
    initialisation). Prefix tokens (class / distillation) take no multi-view term.
    """

    def __init__(self, block: AdaLNZeroBlock, mode: str, copy_weights: bool = True, reference: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        mixer = block.token_mixer
        if not all(isinstance(getattr(mixer, n, None), nn.Linear) for n in ("qkv", "proj")):
            raise ValueError(
                f"MV-Adapter duplicates q/k/v self-attention (children 'qkv' and 'proj'); block mixer "
                f"{type(mixer).__name__} has none: use a plain ViT backbone"
            )
        self.block, self.mode = block, mode
        self.mv_attn = self._branch(mixer, copy_weights) if mode != "none" else None
        self.ref_attn = self._branch(mixer, copy_weights) if reference else None

    @staticmethod
    def _branch(mixer: nn.Module, copy_weights: bool) -> nn.Module:
        branch = zero_init_copy(mixer, "proj")
        if not copy_weights:  # the ablation: same shape, random weights, still a zero output
            for name, m in branch.named_modules():
                if isinstance(m, nn.Linear) and name != "proj":
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias) if m.bias is not None else None
        return branch

    def multiview(self, h: torch.Tensor, views: int, grid: tuple[int, int], prefix: int) -> torch.Tensor:
        """The multi-view branch on modulated tokens ``(B*V, P+N, C)`` -> ``(B*V, P+N, C)`` (prefix rows zero)."""
        BV, _, C = h.shape
        B, (R, W) = BV // views, grid
        x = h[:, prefix:].reshape(B, views, R, W, C)
        if self.mode == "full":
            out = qkv_attention(self.mv_attn, x.reshape(B, views * R * W, C)).reshape(B, views, R, W, C)
        else:  # row: one attention per (scene, row) over the V * W tokens of that row in all views
            rows = x.permute(0, 2, 1, 3, 4).reshape(B * R, views * W, C)
            out = qkv_attention(self.mv_attn, rows).reshape(B, R, views, W, C).permute(0, 2, 1, 3, 4)
        return torch.cat((h.new_zeros(BV, prefix, C), out.reshape(BV, R * W, C)), 1)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        grid: tuple[int, int],
        views: int,
        prefix: int,
        ref: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B*V, P+N, C)``, ``c (B*V, C)``; ``ref`` the reference view's modulated tokens ``(B, P+N, C)``."""
        b = self.block
        shift1, scale1, gate1, shift2, scale2, gate2 = b.ada_ln(c).chunk(6, dim=-1)
        h = modulate(b.norm1(x), shift1, scale1)
        a = b.token_mixer(h, grid) if b.mixer_uses_grid else b.token_mixer(h)
        if self.mv_attn is not None and views > 1:
            a = a + self.multiview(h, views, grid, prefix)
        if self.ref_attn is not None and ref is not None:
            a = a + qkv_attention(self.ref_attn, h, ref.repeat_interleave(views, 0))
        x = x + gate1[:, None] * a
        return x + gate2[:, None] * b.mlp(modulate(b.norm2(x), shift2, scale2))

    def modulated(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The self-attention's input for tokens ``x`` (what the reference pass hands to ``ref_attn``)."""
        shift1, scale1 = self.block.ada_ln(c).chunk(6, dim=-1)[:2]
        return modulate(self.block.norm1(x), shift1, scale1)


# -- the camera condition -------------------------------------------------------------------------------------------
class RayConditionEncoder(nn.Module):
    """T2I-Adapter-style encoder of Plücker ray maps ``(B, 6, H, W)`` -> one token feature per block.

    Pixel-unshuffle to the patch grid (T2I-Adapter unshuffles by 8), a 1x1 stem, two residual conv blocks, then one
    zero-initialised 1x1 projection per DiT block (T2I-Adapter: one feature per UNet scale), so at init it adds 0.
    """

    def __init__(self, dim: int, patch_size: int, depth: int, width: int | None = None) -> None:
        super().__init__()
        width = width or max(16, dim // 2)
        self.patch_size = patch_size
        self.stem = nn.Sequential(nn.PixelUnshuffle(patch_size), nn.Conv2d(6 * patch_size**2, width, 1))
        self.res = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)
            )
            for _ in range(2)
        )
        self.heads = nn.ModuleList(zero_module(nn.Conv2d(width, dim, 1)) for _ in range(depth))

    def forward(self, rays: torch.Tensor) -> list[torch.Tensor]:
        """``rays (B, 6, H, W)`` -> ``depth`` features ``(B, N, dim)`` (row-major patch tokens)."""
        if rays.ndim != 4 or rays.shape[1] != 6 or rays.shape[-1] % self.patch_size or rays.shape[-2] % self.patch_size:
            raise ValueError(
                f"ray maps must be (B, 6, H, W) with H, W multiples of {self.patch_size}, got {tuple(rays.shape)}"
            )
        f = self.stem(rays)
        for block in self.res:
            f = f + block(f)
        return [head(f).flatten(2).transpose(1, 2) for head in self.heads]


# -- the frozen base --------------------------------------------------------------------------------------------------
def load_flow_base(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and state dict of a ``flow_dit`` checkpoint (a ``.safetensors`` file or a run directory).

    Raises ``ValueError`` when the file is missing, not a vitlab checkpoint, or of another task.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():  # a run directory (its checkpoints/ folder) or a folder of checkpoints
        names = ("final.safetensors", "best.safetensors", "last.safetensors")
        found = [d / n for d in (p / "checkpoints", p) for n in names if (d / n).is_file()]
        if not found:
            raise ValueError(f"base_checkpoint {str(p)!r} is a directory without final/best/last.safetensors")
        p = found[0]
    if not p.is_file():
        raise ValueError(f"base_checkpoint {str(p)!r} does not exist (train the flow_dit base first)")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # any unreadable file is the same user error
        raise ValueError(f"base_checkpoint {str(p)!r} is not a safetensors file ({e})") from e
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    if raw.get("format") != "vitlab" or meta.get("task") != "flow_dit":
        raise ValueError(
            f"base_checkpoint {str(p)!r} must be a vitlab flow_dit checkpoint, got task {meta.get('task')!r}"
        )
    return meta, load_file(str(p))


# -- data: one object seen by a ring of cameras at 0 degrees elevation -----------------------------------------------
def sample_orbit_object(
    rng: np.random.Generator, item: torch.Tensor, views: int, size: int, fov: float = 35.0, radius: float = 3.2
) -> tuple[Scene, Cameras]:
    """One textured box at the origin and ``views`` cameras evenly spaced on a horizontal ring (0 deg elevation).

    The box (half sizes 0.45-0.75 m, turned about z) wears the gray item ``item`` (1, 28, 28) in two colours; the
    cameras look at the origin from ``radius`` m, first azimuth random. Render3D's own orbit sampler varies height
    and target, so MV-Adapter's row-wise setting needs this one.
    """
    half = rng.uniform(0.45, 0.75, 3)
    yaw, base = rng.uniform(0, 2 * np.pi, 2)
    scene = Scene(
        [Box((0.0, 0.0, 0.0), tuple(map(float, half)), 0, (0.0, 0.0, float(yaw)))], item_texture(rng, item)[None]
    )
    az = base + 2 * np.pi * np.arange(views) / views
    eye = torch.tensor(np.stack([radius * np.cos(az), radius * np.sin(az), 0 * az], -1), dtype=torch.float32)
    pose = look_at(eye, torch.zeros(views, 3))
    K = intrinsics_from_fov(torch.full((views,), math.radians(fov)), size, size)
    return scene, Cameras(K, pose, (size, size))


def orbit_object_set(
    n: int, views: int, size: int, items: torch.Tensor, labels: torch.Tensor, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``n`` scenes: ``views`` (n, V, 3, H, W) in [-1, 1], ``depth``/``valid`` (n, V, H, W), ``K``, ``cam_to_world``,
    ``label`` (the item's class). Item ``i % len(items)`` after a seeded shuffle; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("views", "depth", "valid", "K", "cam_to_world", "label")}
    with torch.inference_mode():
        for i in range(n):
            j = int(order[i % len(order)])
            scene, cams = sample_orbit_object(rng, items[j], views, size)
            r = render(scene, cams, supersample=2)
            out["views"].append((r["rgb"].float() / 255 - PIXEL_MEAN) / PIXEL_STD)
            for k, v in (
                ("depth", r["depth"]),
                ("valid", r["valid"]),
                ("K", cams.K),
                ("cam_to_world", cams.cam_to_world),
            ):
                out[k].append(v)
            out["label"].append(torch.as_tensor(int(labels[j])))
    return {k: torch.stack(v) for k, v in out.items()}


# -- the metric -------------------------------------------------------------------------------------------------------
def multiview_consistency(
    views: torch.Tensor,
    depth: torch.Tensor,
    valid: torch.Tensor,
    K: torch.Tensor,
    cam_to_world: torch.Tensor,
    depth_tol: float = 0.05,
) -> torch.Tensor:
    """Per-scene multi-view consistency ``(B,)`` in dB: view i warped into view j with the known depth and cameras.

    ``views (B, V, 3, H, W)`` in [-1, 1] (generated), ``depth``/``valid (B, V, H, W)`` and cameras of the scene.
    Every valid pixel of view i is lifted with its depth, projected into view j and compared with view j's colour
    there (bilinear) where it is visible (inside, valid, depth agrees within ``depth_tol`` relative); PSNR (data range
    1) of the pooled squared error over all ordered pairs i != j.
    """
    B, V, C, H, W = views.shape
    if depth.shape != (B, V, H, W) or valid.shape != (B, V, H, W):
        raise ValueError(f"depth and valid must be {(B, V, H, W)}, got {tuple(depth.shape)}, {tuple(valid.shape)}")
    cams = Cameras(K.float(), cam_to_world.float(), (H, W))
    points, ok = cams.unproject(depth.float())  # (B, V, H, W, 3)
    ok = ok & valid
    img01 = views.float() * PIXEL_STD + PIXEL_MEAN
    sq, count = views.new_zeros(B), views.new_zeros(B)
    for j in range(V):
        cam_j = Cameras(cams.K[:, j : j + 1], cams.cam_to_world[:, j : j + 1], (H, W))
        uv, z, front = cam_j.project(points.reshape(B, 1, V * H * W, 3))  # (B, 1, V*H*W, .)
        g = torch.stack([uv[..., 0] / W * 2 - 1, uv[..., 1] / H * 2 - 1], -1)  # align_corners=False convention
        colour = F.grid_sample(img01[:, j], g, align_corners=False).reshape(B, C, V, H, W)
        d_j = F.grid_sample(depth[:, j : j + 1].float(), g, mode="nearest", align_corners=False).reshape(B, V, H, W)
        # all four bilinear neighbours on the object: no sky colour mixed into silhouette pixels
        seen = F.grid_sample(valid[:, j : j + 1].float(), g, align_corners=False).reshape(B, V, H, W)
        inside = (g.abs() <= 1).all(-1).reshape(B, V, H, W)
        z = z.reshape(B, V, H, W)
        vis = ok & inside & front.reshape(B, V, H, W) & (seen > 0.999) & ((z - d_j).abs() <= depth_tol * z.abs())
        vis[:, j] = False  # i != j
        err = (colour - img01.permute(0, 2, 1, 3, 4)).pow(2).sum(1)  # (B, V, H, W) summed over channels
        sq += (err * vis).flatten(1).sum(1)
        count += vis.flatten(1).sum(1) * C
    mse = sq / count.clamp(min=1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def build_flow_base(path: str | Path | None = None, config: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """``(FlowDiT, config)``: the trained base a ``flow_dit`` checkpoint ``path`` holds, or an untrained one of the
    architecture ``config`` records (``model``, ``backbone_args``, ``task_args``, ``num_classes``, ``in_chans``,
    ``img_size``: what a reloading run needs once its weights replace the base's). Errors: ``load_flow_base``."""
    from .flow import FlowDiT

    if (path is None) == (config is None):
        raise ValueError("give a base checkpoint or a base architecture config, exactly one")
    state = None
    if path is not None:
        meta, state = load_flow_base(path)
        config = {k: meta.get(k) for k in ("model", "num_classes", "in_chans", "img_size")}
        config |= {"backbone_args": meta.get("backbone_args") or None, "task_args": meta.get("task_args") or {}}
    assert config is not None
    missing = {"model", "num_classes", "in_chans", "img_size"} - set(config)
    if missing:
        raise ValueError(f"base_config lacks {sorted(missing)}; it is written by a run trained from base_checkpoint")
    base = FlowDiT(config["model"], num_classes=config["num_classes"], in_chans=config["in_chans"],
                   img_size=config["img_size"], backbone_kwargs=config.get("backbone_args") or None,
                   **(config.get("task_args") or {}))  # fmt: skip
    if state is not None:
        base.load_state_dict(state)
    return base, config


class FlowBaseReload:
    """For models on a frozen ``FlowDiT`` base (``base_config`` set when built from a checkpoint): the keywords a
    saved run rebuilds them with record the base's architecture instead of its file, since the run's own weights
    hold the base; a run so reloads after the base checkpoint is moved or deleted."""

    base_config: dict[str, Any] | None

    def reload_args(self, task_args: dict[str, Any]) -> dict[str, Any]:
        if self.base_config is None:
            return task_args
        return {**task_args, "base_checkpoint": None, "base_config": self.base_config}
