"""``vitlab predict`` for task models: run a trained task model on image files and write overlay PNGs.

Segmentation runs get their class colours blended over the image; detection runs (outputs with ``"boxes"``) get
their boxes drawn, each in its class colour with its class index; multi-task runs their map task's overlay with
the class answers (task: class index) written below; any-to-any runs (4M, ``predict_maps``) the image | its
generated semantic overlay | generated depth. Generative runs (models with ``sample``) write one grid of
samples instead, a row per class (``sample_grid``); the image arguments are not read for them. Multi-view runs
(tasks with a ``TaskSpec.data_adapter``: dust3r, vggt, ucpe_nvs, multihmr, mv_adapter, ...) predict on the first
scenes of their run's test split instead: the model's own ``draw_prediction(raw, pred, batch)`` when it has one
(skeletons, waypoints, generated views), else ``views_picture``: view 1 | its predicted depth | confidence | true
depth (| predicted | true point cloud for pointmap models), or for novel-view synthesis source | predicted target |
true target.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data import load_image, match_channels, normalize, resize_batch
from .inference import load_trained

__all__ = ["draw_detections", "draw_tasks", "overlay_semantic", "predict_dense", "sample_grid", "views_picture"]


def _rgb(image: torch.Tensor) -> np.ndarray:
    """uint8 ``(C, H, W)`` -> float ``(H, W, 3)``: grey for other than 3 channels."""
    if image.shape[0] != 3:
        return np.stack([image.float().mean(0).numpy()] * 3, -1)
    return image.permute(1, 2, 0).float().numpy()


def _palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (background black), from matplotlib's tab20."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    colours = [(0, 0, 0)] + [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes - 1)]
    return np.array(colours, dtype=np.uint8)


def overlay_semantic(image: torch.Tensor, semantic: torch.Tensor, num_classes: int, alpha: float = 0.5) -> Image.Image:
    """``image`` uint8 (C, H, W) beside the same image with ``semantic`` (H, W) class colours blended over it."""
    rgb = _rgb(image)
    colours = _palette(num_classes)[semantic.clamp(0, num_classes - 1).numpy()].astype(np.float32)
    labelled = (semantic > 0).numpy()[..., None]
    blended = np.where(labelled, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(np.concatenate([rgb, blended], axis=1).clip(0, 255).astype(np.uint8))


def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    num_classes: int,
    threshold: float = 0.3,
) -> Image.Image:
    """``image`` uint8 (C, H, W) beside a copy with the boxes (pixel xyxy) scoring at least ``threshold`` drawn.

    ``labels`` are thing classes (0-based); box ``k`` takes the segmentation colour of semantic class ``k + 1``.
    """
    rgb = Image.fromarray(_rgb(image).clip(0, 255).astype(np.uint8))
    drawn = rgb.copy()
    draw = ImageDraw.Draw(drawn)
    colours = _palette(num_classes)
    for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True):
        if score >= threshold:
            colour = tuple(int(c) for c in colours[(label + 1) % len(colours)])
            # the xyxy ends are exclusive; PIL's rectangle includes both corners
            draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=colour)
            draw.text((x1 + 1, y1), str(label), fill=colour)
    picture = Image.new("RGB", (2 * rgb.width, rgb.height))
    picture.paste(rgb, (0, 0))
    picture.paste(drawn, (rgb.width, 0))
    return picture


def draw_tasks(image: torch.Tensor, preds: dict[str, torch.Tensor], tasks: list) -> Image.Image:
    """A multi-task model's answers: the first map task's overlay (``overlay_semantic``), class answers below."""
    classes = {name: k for name, _, k in tasks}
    maps = [overlay_semantic(image, p, classes.get(n, int(p.max()) + 1)) for n, p in preds.items() if p.ndim == 2]
    panel = maps[0] if maps else Image.fromarray(_rgb(image).clip(0, 255).astype(np.uint8))
    text = ", ".join(f"{n}: {int(p)}" for n, p in preds.items() if p.ndim == 0)
    picture = Image.new("RGB", (max(panel.width, 6 * len(text) + 4), panel.height + 12))
    picture.paste(panel, (0, 0))
    ImageDraw.Draw(picture).text((2, panel.height), text, fill=(255, 255, 255))
    return picture


@torch.inference_mode()
def sample_grid(model: Any, mean: Sequence[float], std: Sequence[float], per_class: int = 8,
                steps: int = 20, cfg: float = 1.0, seed: int = 0) -> Image.Image:  # fmt: skip
    """A generative task model's samples (``model.sample``), one row per class (one unconditional row without
    classes), de-normalised with the data set's ``mean``/``std``; deterministic for ``seed``."""
    from torchvision.utils import make_grid

    classes = model.num_classes if getattr(model, "class_cond", False) else 0
    labels = torch.arange(classes).repeat_interleave(per_class) if classes else None
    n = classes * per_class or per_class
    x = model.sample(n, labels, steps=steps, cfg=cfg if classes else 1.0, generator=torch.Generator().manual_seed(seed))
    m, s = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1)[:, : x.shape[1]] for v in (mean, std))
    grid = make_grid((x.cpu() * s + m).clamp(0, 1), nrow=per_class, padding=1, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _colour(values: torch.Tensor, valid: torch.Tensor, cmap: str) -> np.ndarray:
    """A (H, W) map -> uint8 (H, W, 3) through ``cmap``, scaled to its valid pixels' 2-98 % range (invalid: black)."""
    import matplotlib

    v = values.float()
    inside = v[valid] if bool(valid.any()) else v.flatten()
    lo, hi = (float(q) for q in torch.quantile(inside, torch.tensor([0.02, 0.98])))
    rgb = matplotlib.colormaps[cmap](((v - lo) / max(hi - lo, 1e-8)).clamp(0, 1).numpy())[..., :3]
    return (rgb * 255 * valid.numpy()[..., None]).astype(np.uint8)


def views_picture(raw: dict[str, torch.Tensor], pred: dict[str, torch.Tensor], scale: int = 4) -> Image.Image:
    """One row per scene of ``raw`` (a collated multi-view batch: uint8 ``views``, ``depth``): view 1, its predicted
    depth (``pred["depth"]``) and confidence, the true depth, and with ``pred["pointmap"]`` the predicted and true
    clouds (``tasks.multiview.pointcloud``); or (``pred["target"]`` in the ucpe_nvs normalised
    space) view 1, the predicted view 2 and the true view 2. Enlarged ``scale`` times."""
    rows = []
    for b in range(raw["views"].shape[0]):
        view1 = raw["views"][b, 0].permute(1, 2, 0).numpy()
        if "target" in pred:
            from ..tasks.multiview.ucpe import PIXEL_MEAN, PIXEL_STD

            guess = (pred["target"][b].float().cpu() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1) * 255
            tiles = [
                view1,
                guess.permute(1, 2, 0).numpy().astype(np.uint8),
                raw["views"][b, 1].permute(1, 2, 0).numpy(),
            ]
        else:
            depth, conf = (pred[k][b].float().cpu() for k in ("depth", "confidence"))
            depth, conf = depth[0] if depth.ndim == 3 else depth, conf[0]
            everywhere = torch.ones_like(depth, dtype=torch.bool)
            valid = raw["depth"][b, 0] > 0
            tiles = [view1, _colour(depth, everywhere, "viridis"), _colour(conf, everywhere, "magma"),
                     _colour(raw["depth"][b, 0], valid, "viridis")]  # fmt: skip
            if "pointmap" in pred:  # dust3r / vggt: the predicted and true clouds of every view, view 1's frame
                tiles += _cloud_tiles(raw, pred["pointmap"], b)
        rows.append(np.concatenate([t.astype(np.uint8) for t in tiles], axis=1))
    picture = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(picture)


def _cloud_tiles(raw: dict[str, torch.Tensor], pointmap: torch.Tensor, b: int) -> list[np.ndarray]:
    from ..layers.camera import invert_pose, transform_points
    from ..tasks.multiview.pointcloud import pointcloud_tiles

    V = pointmap.shape[1]
    true = transform_points(invert_pose(raw["cam_to_world"][b, 0])[None, None, None], raw["pointmap"][b, :V])
    return pointcloud_tiles(raw["views"][b, :V], pointmap[b].float(), true, raw["valid"][b, :V], raw["depth"].shape[-1])


@torch.inference_mode()
def _predict_views(model: Any, meta: dict[str, Any], run: Path | None, out_dir: Path, count: int = 4) -> Path:
    """``views_picture`` of the first ``count`` test scenes of the run's multi-view data set."""
    from .config import load_config
    from .setup import build_datasets

    if run is None:
        raise ValueError(f"{meta['task']!r} predicts on its run's test scenes: give the run directory, not a file")
    cfg = load_config(run / "config.json")
    cfg.model.img_size = meta["img_size"]
    cfg.data.test_subset = cfg.data.test_subset or count
    ds = build_datasets(cfg, splits=("test",))["test"]
    items = [ds[i] for i in range(min(count, len(ds)))]
    batch = ds.collate(items)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["image"] = normalize(batch["image"], meta["mean"], meta["std"])
    pred = model.postprocess(model(batch["image"], **model.forward_kwargs(batch)))
    target = out_dir / "views.png"
    raw = ds.data.collate(items)
    # a task that draws its own predictions (skeletons, waypoints, generated views) does; else depth / novel views
    draw = getattr(model, "draw_prediction", None)
    if draw is not None:
        draw(raw, pred, batch).save(target)
    else:
        views_picture(raw, {k: v.cpu() for k, v in pred.items()}).save(target)
    return target


@torch.inference_mode()
def predict_dense(images: list[str | Path], checkpoint: str | Path, out: str | Path | None = None,
                  device: str = "cpu") -> list[Path]:  # fmt: skip
    """Write ``<out>/<image stem>.png`` (input | prediction overlay or boxes) per image; returns the written paths."""
    model, meta, run = load_trained(checkpoint, device)
    out_dir = Path(out) if out is not None else (run / "predict" if run else Path("predict"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    from ..data.synthetic import MULTIVIEW_GENERATORS
    from ..tasks import get_task

    spec = get_task(meta["task"])
    if spec.data_adapter is not None and spec.dataset in MULTIVIEW_GENERATORS:  # its test scenes, not images
        if images:
            raise ValueError(
                f"{meta['task']!r} runs take calibrated multi-view scenes, not image files: run `vitlab predict "
                "--checkpoint RUN` without images to draw its first test scenes"
            )
        return [_predict_views(model, meta, run, out_dir)]
    if hasattr(model, "sample"):  # a generator: one grid of samples (a row per class); the images are not read
        target = out_dir / "samples.png"
        draw = getattr(model, "draw_samples", None)  # a generator of clips or sets draws its own sheet
        (draw if draw is not None else partial(sample_grid, model))(meta["mean"], meta["std"]).save(target)
        return [target]
    if not images:
        raise ValueError(f"images: give at least one image file for the {meta.get('task')!r} run {checkpoint}")
    written = []
    for path in images:
        raw = load_image(path, in_chans=meta["in_chans"], img_size=meta["img_size"])
        x = normalize(match_channels(raw[None], meta["in_chans"]), meta["mean"], meta["std"])
        x = resize_batch(x, meta["img_size"]).to(dev)
        if hasattr(model, "predict_maps"):  # any-to-any (4M): the maps it generates from the image alone
            maps = {k: v[0].cpu() for k, v in model.predict_maps(x).items()}
            tiles = [overlay_semantic(raw, maps["semantic"], meta["num_classes"])] if "semantic" in maps else []
            if "depth" in maps:
                tiles.append(Image.fromarray(_colour(maps["depth"], maps["depth"] > 0, "viridis")))
            if not tiles:
                raise ValueError(f"the {meta['task']!r} run predicts no map (semantic or depth) from an image")
            picture = Image.fromarray(np.concatenate([np.asarray(t.convert("RGB")) for t in tiles], axis=1))
            target = out_dir / f"{Path(path).stem}.png"
            picture.save(target)
            written.append(target)
            continue
        pred = model.postprocess(model(x))
        if "boxes" in pred:  # a detector
            found = [pred[key][0].cpu() for key in ("boxes", "labels", "scores")]
            picture = draw_detections(raw, *found, num_classes=meta["num_classes"])
        elif "semantic" in pred:
            picture = overlay_semantic(raw, pred["semantic"][0].cpu(), meta["num_classes"])
        else:  # a multi-task model: {task: prediction}
            picture = draw_tasks(raw, {k: v[0].cpu() for k, v in pred.items()}, getattr(model, "tasks", []))
        target = out_dir / f"{Path(path).stem}.png"
        picture.save(target)
        written.append(target)
    return written
