"""A preview picture of a scene set: each scene as drawn, and again with semantic colours and boxes."""

from pathlib import Path

import numpy as np

from .scenes import SceneDataset

__all__ = ["save_preview"]


def save_preview(scenes: SceneDataset, path: str | Path, count: int = 16, columns: int = 4) -> Path:
    """Write a PNG grid of the first ``count`` scenes; each cell pairs the image with its labelled overlay."""
    # imported here: matplotlib is only needed for previews; Agg draws without a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    count = min(count, len(scenes))
    if count < 1:
        raise ValueError(f"count={count} is out of range; expected at least 1 scene to preview")
    rows = -(-count // columns)
    palette = np.array([to_rgb(f"C{k % 10}") for k in range(len(scenes.thing_classes))])
    fig = Figure(figsize=(2 * columns * 1.3, rows * 1.3 + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2 * columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(count):
        scene = scenes[i]
        gray = scene["image"].float().mean(0).numpy() / 255  # (H, W); mean over channels also covers RGB sets
        rgb = np.repeat(gray[..., None], 3, axis=2)
        semantic = scene["semantic"].numpy()
        things = semantic > 0
        rgb[things] = 0.45 * rgb[things] + 0.55 * palette[semantic[things] - 1]
        ax_image, ax_overlay = axes[i // columns, 2 * (i % columns)], axes[i // columns, 2 * (i % columns) + 1]
        ax_image.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax_image.set_title(f"#{i}", fontsize=7)
        ax_overlay.imshow(rgb, interpolation="nearest")
        ax_overlay.set_title(f"{len(scene['labels'])} items", fontsize=7)
        for (x1, y1, x2, y2), label in zip(scene["boxes"].tolist(), scene["labels"].tolist(), strict=True):
            # imshow puts pixel j at [j - 0.5, j + 0.5]; boxes cover whole pixels [x1, x2)
            box = Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=0.8, ec=palette[label])
            ax_overlay.add_patch(box)
    handles = [Patch(color=palette[k], label=name) for k, name in enumerate(scenes.thing_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(f"{scenes.name}: {len(scenes)} scenes of {scenes.img_size[1]}x{scenes.img_size[0]} px", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.45 / fig.get_figheight(), bottom=0.7 / fig.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
