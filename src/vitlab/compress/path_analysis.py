"""Path analysis for "Revisiting Vision Transformer from the View of Path Ensemble" (arXiv:2308.06548).

- ``path_contributions(model, batches)``: for every component that reaches the classifier directly (the input
  path, each block's attention and FFN term), the top-1 when that one term is taken out of the output stream.
  The representation stream does not depend on the output stream, so one trunk pass per batch serves every
  removal (each is just ``head(norm(y - term))``); the result equals re-running the model without that term.
- ``feature_spectra(model, batches)``: the 2-D FFT amplitude of the patch-token features over the token grid
  (mean over images and channels), per block (representation stream) and for the output stream that reaches the
  final norm: the share of energy above half the Nyquist radius and the log amplitude of the high band relative
  to the DC term (after Park & Kim, "How Do Vision Transformers Work?", arXiv:2202.06709). The paper claims that
  path pruning and EnsembleScale act as high-pass filters; these numbers test that.

Both work on a model with ``path_ensemble`` applied or on a plain supported host (wrapped for the call only, with
no scales or pruning, then restored). Plots: ``plot_path_contributions``, ``plot_spectra``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .path_ensemble import PathEnsembleBlocks, _logits, is_path_ensemble, unwrap_paths, wrap_paths

__all__ = ["feature_spectra", "path_contributions", "plot_path_contributions", "plot_spectra"]

HIGH_BAND = 0.5  # radius (fraction of the Nyquist frequency) above which a frequency counts as high


def _pairs(batches: Iterable[Any], max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(b, dict):
            yield b["image"], b.get("label")
        elif isinstance(b, (tuple, list)):
            yield b[0], (b[1] if len(b) > 1 else None)
        elif isinstance(b, torch.Tensor):
            yield b, None
        else:
            raise ValueError(f"batches must yield (images, labels), {{'image', 'label'}} dicts or tensors, got {b!r}")


@contextmanager
def _recording(model: nn.Module) -> Iterator[PathEnsembleBlocks]:
    """``model.blocks`` as a path ensemble recording every term (wrapped for the duration when it is not one)."""
    own = not is_path_ensemble(model)
    blocks = wrap_paths(model) if own else model.blocks
    training = model.training
    model.eval()
    try:
        yield blocks
    finally:
        blocks.capture = None
        model.train(training)
        if own:
            unwrap_paths(model)


def _run(model: nn.Module, blocks: PathEnsembleBlocks, images: torch.Tensor) -> dict[str, Any]:
    blocks.capture = cap = {}
    model.forward_features(images.to(next(model.parameters()).device))
    blocks.capture = None
    return cap


@torch.no_grad()
def path_contributions(
    model: nn.Module, batches: Iterable[Any], max_batches: int | None = None
) -> list[dict[str, Any]]:
    """One row per output-stream component: ``layer`` (-1 for the input path), ``path`` (input/attn/ffn),
    ``direct`` (False where pruned: removing it changes nothing), ``top1`` without it, ``drop`` = base - top1
    (percentage points; negative: the term pulls accuracy down), and ``base_top1``."""
    correct: dict[tuple[int, str], int] = {}
    base = total = 0
    with _recording(model) as blocks:
        for images, labels in _pairs(batches, max_batches):
            if labels is None:
                raise ValueError("path_contributions needs labelled batches (images, labels)")
            cap = _run(model, blocks, images)
            labels = labels.to(cap["output"].device)
            y = cap["output"]
            base += int((_logits(model, y).argmax(-1) == labels).sum())
            total += labels.numel()
            terms = [(-1, "input", cap["input"])]
            for i, (a, f) in enumerate(zip(cap["attn"], cap["ffn"], strict=True)):
                terms += [(i, "attn", a), (i, "ffn", f)]
            for layer, kind, term in terms:
                hit = (_logits(model, y if term is None else y - term).argmax(-1) == labels).sum()
                correct[(layer, kind)] = correct.get((layer, kind), 0) + int(hit)
            direct = {(layer, kind): term is not None for layer, kind, term in terms}
    if total == 0:
        raise ValueError("path_contributions got no batches")
    base_top1 = 100.0 * base / total
    return [
        {
            "layer": layer,
            "path": kind,
            "direct": direct[(layer, kind)],
            "top1": round(100.0 * n / total, 3),
            "drop": round(base_top1 - 100.0 * n / total, 3),
            "base_top1": round(base_top1, 3),
        }
        for (layer, kind), n in correct.items()
    ]


def _grid(model: nn.Module, images: torch.Tensor, tokens: int) -> tuple[int, int]:
    """The patch grid of ``images`` (the patches padded to whole ones), checked against the token count."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        grid = (math.ceil(images.shape[-2] / ph), math.ceil(images.shape[-1] / pw))
        if grid[0] * grid[1] == tokens:
            return grid
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"cannot lay {tokens} patch tokens on a grid; feature_spectra needs a patch-grid model")
    return side, side


def _amplitude(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Mean FFT amplitude (H, W) over images and channels of the patch tokens (B, P + H W, C)."""
    x = tokens[:, prefix:].float()
    x = x.reshape(x.shape[0], *grid, x.shape[-1])
    return torch.fft.fft2(x, dim=(1, 2)).abs().mean(dim=(0, 3))


def _radius(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Each FFT bin's frequency radius as a fraction of the Nyquist frequency (1 on an axis at Nyquist)."""
    fy = torch.fft.fftfreq(grid[0], device=device) / 0.5
    fx = torch.fft.fftfreq(grid[1], device=device) / 0.5
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def _summary(amp: torch.Tensor) -> dict[str, Any]:
    r = _radius(tuple(amp.shape), amp.device)
    energy = amp**2
    high = r > HIGH_BAND
    radii = sorted({round(float(v), 3) for v in r.flatten()})
    log_dc = math.log(float(amp[0, 0]) + 1e-12)
    profile = [(rad, math.log(float(amp[(r - rad).abs() < 1e-3].mean()) + 1e-12) - log_dc) for rad in radii if rad > 0]
    return {
        "high_frac": round(float(energy[high].sum() / energy.sum()), 5),
        "dlog_amp_high": round(math.log(float(amp[high].mean()) + 1e-12) - log_dc, 4),
        "profile": profile,
    }


@torch.no_grad()
def feature_spectra(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"stream": "representation" | "output", "layer", "high_frac", "dlog_amp_high", "profile"}``.

    ``high_frac``: share of the feature energy (squared FFT amplitude over the token grid) above half the Nyquist
    radius; ``dlog_amp_high``: log mean amplitude of that band minus log amplitude at DC; ``profile``: (radius,
    relative log amplitude) pairs. One ``representation`` row per block, one ``output`` row for the output stream.
    """
    sums: dict[tuple[str, int], torch.Tensor] = {}
    n = 0
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    with _recording(model) as blocks:
        for images, _ in _pairs(batches, max_batches):
            cap = _run(model, blocks, images)
            grid = _grid(model, images, cap["output"].shape[1] - prefix)
            feats = [(("representation", i), x) for i, x in enumerate(cap["reps"])]
            feats.append((("output", len(cap["reps"]) - 1), cap["output"]))
            for key, x in feats:
                amp = _amplitude(x, prefix, grid) * x.shape[0]
                sums[key] = sums[key] + amp if key in sums else amp
            n += images.shape[0]
    if n == 0:
        raise ValueError("feature_spectra got no batches")
    return [{"stream": s, "layer": layer, **_summary(amp / n)} for (s, layer), amp in sums.items()]


def plot_path_contributions(tables: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Heat maps (rows: input / attention / FFN, columns: blocks) of the top-1 drop when one term is removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tables:
        raise ValueError("plot_path_contributions needs at least one table")
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 1.9 * len(tables) + 0.6), squeeze=False)
    span = max(abs(r["drop"]) for t in tables.values() for r in t) or 1.0
    for ax, (name, rows) in zip(axes[:, 0], tables.items(), strict=True):
        depth = 1 + max(r["layer"] for r in rows)
        grid = torch.full((3, depth), float("nan"))
        for r in rows:
            row = {"input": 0, "attn": 1, "ffn": 2}[r["path"]]
            if r["direct"]:
                grid[row, max(r["layer"], 0)] = r["drop"]
        im = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
        ax.set_yticks([0, 1, 2], ["input", "attn", "ffn"])
        ax.set_xticks(range(depth), [str(i) for i in range(depth)], fontsize=7)
        ax.set_title(f"{name}: top-1 drop (points) when one direct term is removed (base {rows[0]['base_top1']}%)")
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("block (blank: pruned from the output stream)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_spectra(spectra: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Left: relative log amplitude vs frequency of the output stream; right: high-band energy share per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, rows in spectra.items():
        out = next(r for r in rows if r["stream"] == "output")
        rad, amp = zip(*out["profile"], strict=True)
        left.plot(rad, amp, marker="o", label=name)
        reps = sorted((r for r in rows if r["stream"] == "representation"), key=lambda r: r["layer"])
        (line,) = right.plot([r["layer"] for r in reps], [r["high_frac"] for r in reps], label=f"{name} blocks")
        right.scatter([out["layer"]], [out["high_frac"]], color=line.get_color(), marker="*", s=120,
                      label=f"{name} output stream")  # fmt: skip
    left.set(xlabel="frequency (fraction of Nyquist)", ylabel="log amplitude - log DC", title="output-stream spectrum")
    right.set(xlabel="block", ylabel=f"energy share above {HIGH_BAND} Nyquist", title="high-frequency share")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
