"""Batch transforms on tensors (not PIL): channel matching, crop/flip augmentation, normalisation, resizing.

These run inside the training loop, so each works on a whole batch at once with no Python loop over samples.
``match_channels``, ``normalize`` and ``resize_batch`` take any leading dims, so clip batches (B, T, C, H, W) go
through them as they are; ``random_crop_flip`` takes image batches (B, C, H, W) only (a flip would change a clip's
motion label).

Channel rule (``match_channels`` and ``match_channels_stats``), for images with C channels fed to a model
with ``in_chans``:

- C == in_chans: unchanged;
- 1 -> 3: the gray channel is repeated (mean/std values repeated);
- 3 -> 1: ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B, as PIL's ``convert("L")`` (mean/std: the same
  weighted mean); uint8 input is rounded and stays uint8;
- anything else: :class:`ChannelMismatchError` naming both counts.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import ChannelMismatchError

__all__ = ["LUMA_WEIGHTS", "match_channels", "match_channels_stats", "normalize", "random_crop_flip", "resize_batch"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _check_channels(have: int, want: int) -> None:
    if have != want and (have, want) not in ((1, 3), (3, 1)):
        raise ChannelMismatchError(
            f"cannot match {have} input channels to in_chans={want}; only equal counts, 1 -> 3 and 3 -> 1 are supported"
        )


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Match the channel dim of ``x`` (..., C, H, W) to ``in_chans`` by the rule in the module docstring."""
    if x.ndim < 3:
        raise ValueError(f"expected images shaped (..., C, H, W), got shape {tuple(x.shape)}")
    have = x.shape[-3]
    _check_channels(have, in_chans)
    if have == in_chans:
        return x
    if have == 1:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    compute_dtype = x.dtype if x.is_floating_point() else torch.float32
    weights = torch.tensor(LUMA_WEIGHTS, dtype=compute_dtype, device=x.device)
    gray = torch.einsum("...chw,c->...hw", x.to(compute_dtype), weights).unsqueeze(-3)
    if x.is_floating_point():
        return gray
    info = torch.iinfo(x.dtype)
    return gray.round_().clamp_(info.min, info.max).to(x.dtype)


def match_channels_stats(
    mean: Sequence[float], std: Sequence[float], in_chans: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Match normalisation constants to ``in_chans`` by the same rule as :func:`match_channels`."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std):
        raise ChannelMismatchError(f"mean has {len(mean)} values but std has {len(std)}; expected one per channel")
    _check_channels(len(mean), in_chans)
    if len(mean) == in_chans:
        return mean, std
    if len(mean) == 1:
        return mean * 3, std * 3
    # NOTE: the weighted mean of the stds is an approximation (the luma std also depends on correlations)
    gray_mean = sum(w * m for w, m in zip(LUMA_WEIGHTS, mean, strict=True))
    gray_std = sum(w * s for w, s in zip(LUMA_WEIGHTS, std, strict=True))
    return (gray_mean,), (gray_std,)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 2, flip: bool = True) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a batch (B, C, H, W), shape kept.

    All randomness comes from ``generator`` (a CPU generator), so the result is bit-reproducible from its state.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a batch shaped (B, C, H, W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return x
    B, C, H, W = x.shape
    offset_y = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    rows = offset_y[:, None] + torch.arange(H)  # (B, H) rows of the padded batch
    cols = offset_x[:, None] + torch.arange(W)  # (B, W)
    if flip:
        flipped = torch.rand(B, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    # one advanced-indexing gather: (B,1,1,1), (1,C,1,1), (B,1,H,1), (B,1,1,W) broadcast to (B, C, H, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    channel = torch.arange(C, device=x.device).view(1, C, 1, 1)
    rows = rows.to(x.device).view(B, 1, H, 1)
    cols = cols.to(x.device).view(B, 1, 1, W)
    return padded[batch, channel, rows, cols]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Turn uint8 images (..., C, H, W) into float32 ``(x / 255 - mean) / std``, per channel."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images in 0..255, got dtype {x.dtype}")
    C = x.shape[-3]
    if len(mean) != C or len(std) != C:
        raise ChannelMismatchError(
            f"mean/std have {len(mean)}/{len(std)} values for images with {C} channels; expected one per channel"
        )
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(C, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(C, 1, 1)
    # fold /255 into the affine map: one multiply-add over the batch instead of three passes
    scale = 1.0 / (255.0 * std_t)
    return torch.addcmul(-mean_t / std_t, x.to(torch.float32), scale)


def resize_batch(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float batch (B, C, H, W) or (B, T, C, H, W) (each frame alike), antialiased when
    shrinking; returns ``x`` if the size matches."""
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == (H, W):
        return x
    if not x.is_floating_point():
        raise TypeError(f"resize_batch expects float images, got dtype {x.dtype}")
    shrink = x.shape[-2] > H or x.shape[-1] > W
    if x.ndim == 5:  # clips: interpolate the frames as one image batch
        frames = F.interpolate(x.flatten(0, 1), size=(H, W), mode="bilinear", align_corners=False, antialias=shrink)
        return frames.unflatten(0, x.shape[:2])
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=shrink)
