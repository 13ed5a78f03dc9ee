"""The real two-view check: the Middlebury 2014 "Motorcycle" stereo pair that scikit-image ships.

``skimage.data.stereo_motorcycle()`` gives the rectified left/right images (500 x 741, downsampled 4x) and the left
view's ground-truth disparity (``inf`` where unknown). Its docstring gives the calibration of the downsampled pair:
focal 994.978 px, principal point (311.193, 254.877) px, ``doffs`` 31.086 px (the right camera's principal point
lies ``doffs`` further right), baseline 193.001 mm. Then a left pixel at column ``x`` with disparity ``d`` is seen at
``x - d`` in the right image, and its z-depth is ``baseline * f / (d + doffs)`` (metres here).

In vitlab's camera convention (:mod:`vitlab.layers.camera`: OpenCV axes, pixel centres at ``c + 0.5``), the
principal point is Middlebury's plus 0.5 (Middlebury, like OpenCV, puts the first pixel's centre at 0); the world is
the left camera's frame, so ``cam_to_world`` is the identity for the left view and a shift by ``(baseline, 0, 0)``
for the right one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MIDDLEBURY_MOTORCYCLE", "load_middlebury_pair"]

# calibration of the downsampled pair (skimage.data.stereo_motorcycle's docstring); lengths in pixels / metres
MIDDLEBURY_MOTORCYCLE = {"focal": 994.978, "cx": 311.193, "cy": 254.877, "doffs": 31.086, "baseline": 0.193001}


def _intrinsics(f: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])


def load_middlebury_pair(size: int | None = None) -> dict[str, torch.Tensor]:
    """The pair as a dict: ``images`` uint8 (2, 3, H, W) (left, right), ``depth`` float32 (H, W) z-depth of the
    left view in metres (0 where unknown), ``disparity`` (H, W) (0 where unknown), ``valid`` bool (H, W), ``K``
    (2, 3, 3) and ``cam_to_world`` (2, 4, 4) (world = the left camera's frame).

    ``size``: crop the centre square of the pair (H x H) and resize it to ``size x size`` (images: area averaging;
    depth and valid: the nearest pixel), with ``K`` moved and scaled to match; None keeps the full 500 x 741.

    Raises:
        ImportError: scikit-image is not installed.
    """
    from skimage.data import stereo_motorcycle

    left, right, disp = stereo_motorcycle()
    c = MIDDLEBURY_MOTORCYCLE
    images = torch.stack([torch.from_numpy(left), torch.from_numpy(right)]).permute(0, 3, 1, 2).contiguous()
    disparity = torch.from_numpy(disp).float()
    valid = torch.isfinite(disparity) & (disparity > 0)
    disparity = torch.where(valid, disparity, 0)
    depth = torch.where(valid, c["baseline"] * c["focal"] / (disparity + c["doffs"]), 0)
    f, cx, cy = c["focal"], c["cx"] + 0.5, c["cy"] + 0.5
    if size is not None:
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        H, W = depth.shape
        x0 = (W - H) // 2
        images, depth, valid, disparity = (t[..., x0 : x0 + H] for t in (images, depth, valid, disparity))
        s = size / H
        images = F.interpolate(images.float(), size=(size, size), mode="area").round().to(torch.uint8)
        # nearest pixel: the source pixel whose centre is closest to each target pixel's centre
        idx = ((torch.arange(size) + 0.5) / s).long().clamp(max=H - 1)
        depth, valid = depth[idx][:, idx], valid[idx][:, idx]
        disparity = disparity[idx][:, idx] * s
        f, cx, cy = f * s, (cx - x0) * s, cy * s
    K = torch.stack([_intrinsics(f, cx, cy), _intrinsics(f, cx + c["doffs"] * (1 if size is None else s), cy)])
    c2w = torch.eye(4).repeat(2, 1, 1)
    c2w[1, 0, 3] = c["baseline"]
    return {"images": images, "depth": depth, "disparity": disparity, "valid": valid, "K": K, "cam_to_world": c2w}
