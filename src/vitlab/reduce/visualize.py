"""Draw the source map of a reduced model over an image: one colour per final token (ToMe Fig. 4 style).

Patches merged into the same token share a colour and a border; patches a method dropped (ATS) are
greyed out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

__all__ = ["draw_sources", "load_image", "save_source_map"]


def load_image(path: str | Path, model: nn.Module) -> tuple[torch.Tensor, np.ndarray]:
    """The model's input tensor (1, C, H, W) for an image file, and the resized image as an RGB array."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = int(cfg.get("input_size", (3,))[0])
    H, W = model.patch_embed.img_size
    try:
        img = Image.open(path).convert("L" if chans == 1 else "RGB").resize((W, H), Image.BICUBIC)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    mean = np.asarray(cfg.get("mean", (0.5,) * chans), dtype=np.float32)[:chans]
    std = np.asarray(cfg.get("std", (0.5,) * chans), dtype=np.float32)[:chans]
    x = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1)).unsqueeze(0)
    return x, np.repeat(arr, 3, axis=2) if chans == 1 else arr


def draw_sources(image: np.ndarray, source: torch.Tensor, grid: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Overlay token groups on ``image`` (H, W, 3) in [0, 1]; ``source`` (P,) token index per patch, -1 dropped."""
    H, W, _ = image.shape
    gh, gw = grid
    ids = source.reshape(gh, gw).cpu().numpy()
    colours = np.random.default_rng(seed).uniform(0.1, 1.0, size=(int(ids.max()) + 2, 3))
    cell = ids[(np.arange(H) * gh // H)[:, None], (np.arange(W) * gw // W)[None, :]]  # (H, W) token per pixel
    tint = colours[cell]
    out = 0.5 * image + 0.5 * tint
    out[cell < 0] = 0.25 * image[cell < 0].mean(-1, keepdims=True)  # dropped patches
    edge = np.zeros((H, W), dtype=bool)  # borders between different tokens
    edge[1:, :] |= cell[1:, :] != cell[:-1, :]
    edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    out[edge] = 0.0
    return np.clip(out, 0.0, 1.0)


@torch.no_grad()
def save_source_map(model: nn.Module, image_path: str | Path, out: str | Path) -> Path:
    """Run a reduced ``model`` on one image and write its source map over the image as a PNG."""
    from . import forward_with_state

    x, rgb = load_image(image_path, model)
    _, state = forward_with_state(model.eval(), x)
    grid = tuple(model.patch_embed.grid_size)
    source = state.source[0] if state is not None else torch.arange(grid[0] * grid[1])
    scale = max(1, 448 // max(rgb.shape[:2]))  # small inputs (28 px) are enlarged to stay readable
    big = Image.fromarray((rgb * 255).astype(np.uint8)).resize((rgb.shape[1] * scale, rgb.shape[0] * scale))
    picture = draw_sources(np.asarray(big, dtype=np.float32) / 255.0, source, grid)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture * 255).astype(np.uint8)).save(out)
    return out
