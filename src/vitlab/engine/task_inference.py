"""``vitlab predict`` for task models: run a trained task model on image files and write overlay PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import load_image, match_channels, normalize, resize_batch
from .inference import load_trained

__all__ = ["overlay_semantic", "predict_dense"]


def _palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (background black), from matplotlib's tab20."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    colours = [(0, 0, 0)] + [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes - 1)]
    return np.array(colours, dtype=np.uint8)


def overlay_semantic(image: torch.Tensor, semantic: torch.Tensor, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """``image`` uint8 (C, H, W) beside the same image with ``semantic`` (H, W) class colours blended over it."""
    gray = image.float().mean(0) if image.shape[0] != 3 else None
    rgb = np.stack([gray.numpy()] * 3, -1) if gray is not None else image.permute(1, 2, 0).float().numpy()
    colours = _palette(num_classes)[semantic.clamp(0, num_classes - 1).numpy()].astype(np.float32)
    labelled = (semantic > 0).numpy()[..., None]
    blended = np.where(labelled, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.concatenate([rgb, blended], axis=1).clip(0, 255).astype(np.uint8))


@torch.inference_mode()
def predict_dense(images: list[str | Path], checkpoint: str | Path, out: str | Path | None = None,
                  device: str = "cpu") -> list[Path]:  # fmt: skip
    """Write ``<out>/<image stem>.png`` (input | prediction overlay) per image; returns the written paths."""
    model, meta, run = load_trained(checkpoint, device)
    out_dir = Path(out) if out is not None else (run / "predict" if run else Path("predict"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    written = []
    for path in images:
        raw = load_image(path, in_chans=meta["in_chans"], img_size=meta["img_size"])
        x = normalize(match_channels(raw[None], meta["in_chans"]), meta["mean"], meta["std"])
        pred = model.postprocess(model(resize_batch(x, meta["img_size"]).to(dev)))["semantic"][0].cpu()
        target = out_dir / f"{Path(path).stem}.png"
        overlay_semantic(raw, pred, meta["num_classes"]).save(target)
        written.append(target)
    return written
