"""Modular-Cam's parts: the motion module, the ControlNet-style conditioning branch, the rule-based director and
the global-motion estimate used to score generated clips (``modular_cam.py`` puts them around a ``FlowDiT``).

Modular-Cam (arXiv:2504.12048, github.com/pzrain/Modular-Cam) builds on AnimateDiff's motion module: per spatial
location, a temporal transformer (self-attention over the frames with sinusoidal frame positions, two attention
layers and a feed-forward layer) whose output projection starts at zero, so an image generator with motion modules
inserted is still the image generator, frame by frame. Camera motions are LoRAs on the attention projections of
the motion modules (``to_q``, ``to_k``, ``to_v``, ``to_out``: the layers AnimateDiff's Motion-LoRAs adapt).
AdaControlNet is a SparseCtrl-style branch: a trainable copy of the generator's first blocks that reads the noisy
frames plus a sparse condition (here the previous scene's last frame at frame 0, with a mask channel saying which
frames are conditioned) and adds zero-initialised residuals to the generator's blocks.

Deviations: the LLM-Director is replaced by :func:`direct`, a keyword parser (no language model); the motion module
normalises with LayerNorm over channels (AnimateDiff: GroupNorm over the UNet's feature maps), and runs after every
DiT block (AnimateDiff: after every UNet resolution's blocks). The global motion (:func:`global_motion`) is our
metric, not the paper's: windowed phase correlation between consecutive frames, whole frame for the pan, frame
halves for the zoom (their shifts diverge); it does not see tilt at 16 px (a perspective change, measured ~0 here).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

__all__ = [
    "ControlBranch",
    "DirectorError",
    "MotionModule",
    "Scene",
    "TemporalAttention",
    "direct",
    "global_motion",
    "sinusoidal_positions",
]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # AnimateDiff Motion-LoRA's layers in the motion module


def sinusoidal_positions(num: int, dim: int) -> torch.Tensor:
    """``(num, dim)`` sine-cosine codes of positions 0..num-1 (Transformer's; AnimateDiff's frame positions)."""
    pos = torch.arange(num, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    code = torch.zeros(num, dim)
    code[:, 0::2] = torch.sin(pos * freqs)
    code[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return code


class TemporalAttention(nn.Module):
    """Multi-head self-attention over frames: ``(M, T, C) -> (M, T, C)``; projections named as AnimateDiff's."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"motion module width {dim} must be a multiple of its heads {num_heads}")
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, T, C = x.shape
        q, k, v = (f(x).view(M, T, self.num_heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(M, T, C))


class MotionModule(nn.Module):
    """``tokens + temporal_transformer(tokens)`` over the frames of each token position; identity at init.

    ``forward(tokens (B * T, N, C), num_frames=T)``: frames of a clip contiguous in the batch. Each of
    ``num_layers`` attention layers adds the frame positions to its (normalised) input, as AnimateDiff's
    ``TemporalTransformerBlock``; a feed-forward layer follows; ``proj_out`` is zero-initialised.
    """

    def __init__(self, dim: int, num_heads: int = 4, num_layers: int = 2, max_frames: int = 32) -> None:
        super().__init__()
        if num_layers < 1 or max_frames < 1:
            raise ValueError(f"need num_layers >= 1 and max_frames >= 1, got {num_layers}, {max_frames}")
        self.max_frames = max_frames
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, dim)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.attns = nn.ModuleList(TemporalAttention(dim, num_heads) for _ in range(num_layers))
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = Mlp(dim, 2 * dim, act_layer=nn.GELU)
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)  # zero init: the image model is unchanged until trained
        nn.init.zeros_(self.proj_out.bias)
        self.register_buffer("positions", sinusoidal_positions(max_frames, dim), persistent=False)

    def forward(self, tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, N, C = tokens.shape
        if not 1 <= num_frames <= self.max_frames or BT % num_frames:
            raise ValueError(
                f"num_frames must be in [1, {self.max_frames}] and divide the batch {BT} of frames, got {num_frames}"
            )
        B, T = BT // num_frames, num_frames
        h = tokens.view(B, T, N, C).transpose(1, 2).reshape(B * N, T, C)  # one sequence per token position
        h = self.proj_in(self.norm(h))
        for norm, attn in zip(self.attn_norms, self.attns, strict=True):
            h = h + attn(norm(h) + self.positions[:T])
        h = self.proj_out(h + self.ff(self.ff_norm(h)))
        return tokens + h.view(B, N, T, C).transpose(1, 2).reshape(BT, N, C)


class ControlBranch(nn.Module):
    """A ControlNet/SparseCtrl branch: copies of the first blocks reading ``tokens + hint(condition, mask)``.

    Build it on the base's blocks and pass it to ``layers.adapters.zero_init_copy(branch, ["hint", "outs"])``: the
    copy keeps the pretrained block weights and starts with a zero hint embedding and zero output layers (ControlNet's
    zero convolutions), so its residuals are 0 at init. ``forward(tokens, c, grid, hint_image)`` -> one residual
    ``(B * T, P + N, C)`` per copied block; ``hint_image`` ``(B * T, in_chans + 1, H, W)`` holds the condition frame
    times the mask, then the mask (1 on conditioned frames).
    """

    def __init__(self, blocks: Sequence[nn.Module], dim: int, patch_size: int, in_chans: int) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a control branch needs at least one block to copy (control_depth >= 1)")
        self.hint = nn.Conv2d(in_chans + 1, dim, patch_size, patch_size)
        self.blocks = nn.ModuleList(blocks)
        self.outs = nn.ModuleList(nn.Linear(dim, dim) for _ in blocks)

    def forward(self, tokens: torch.Tensor, c: torch.Tensor, grid, hint_image: torch.Tensor) -> list[torch.Tensor]:
        hint = self.hint(hint_image).flatten(2).transpose(1, 2)  # (B * T, N, C)
        h = tokens + F.pad(hint, (0, 0, tokens.shape[1] - hint.shape[1], 0))  # prefix tokens get no hint
        out = []
        for block, proj in zip(self.blocks, self.outs, strict=True):
            h = block(h, c, grid)
            out.append(proj(h))
        return out


# -- the director (rule-based stand-in for the LLM-Director) --------------------------------------------------------
class DirectorError(ValueError):
    """A script the rule-based director cannot turn into scenes (unknown motion, no motion, unknown subject)."""


@dataclass(frozen=True)
class Scene:
    """One scene: the subject's class id (None: unconditional) and name, and the motion (a LoRA name)."""

    label: int | None
    subject: str | None
    motion: str


_MOTION_RE = re.compile(r"\b(zoom|pan|tilt|roll|dolly|truck|orbit|spin|rotate|track)\w*\s*(in|out|left|right|up|down|"
                        r"cw|ccw|clockwise|counter-?clockwise|around)?\b")  # fmt: skip
_STILL = re.compile(r"\b(static|still|hold|holds|steady)\b")
_SPLIT = re.compile(r"\s*(?:,|;|\.|\bthen\b|\band\b|\bafter that\b)\s*")


def _subject_names(classes: Sequence[str]) -> dict[str, int]:
    """Words naming each class: the lower-cased class name and its '/'-separated parts (``T-shirt/top``)."""
    names: dict[str, int] = {}
    for i, name in enumerate(classes):
        for part in [name, *name.split("/")]:
            names[part.lower().strip()] = i
    return names


def direct(script: str, classes: Sequence[str], motions: Sequence[str]) -> list[Scene]:
    """Split ``script`` into scenes: ``"zoom in on the bag, then pan left"`` -> [(Bag, zoom_in), (Bag, pan_left)].

    A scene is a clause (split at commas, "then", "and"); its motion is the first "<verb> <direction>" phrase
    (``zoom_in``, ``pan_left``, ...; "static"/"hold" -> ``static``), its subject the first class name in it (a scene
    without one keeps the previous scene's subject). Raises ``DirectorError`` for a motion not in ``motions`` (the
    LoRAs the model has), a clause without a motion, or an empty script.
    """
    if not isinstance(script, str) or not script.strip():
        raise DirectorError(f"script must be a non-empty sentence, got {script!r}")
    names = _subject_names(classes)
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")s?\b")
    scenes: list[Scene] = []
    label, subject = None, None
    for clause in (c for c in _SPLIT.split(script.lower()) if c.strip()):
        found = pattern.search(clause)
        if found:
            subject = found.group(1)
            label = names[subject]
        move = _MOTION_RE.search(clause)
        if move:
            motion = f"{move.group(1)}_{move.group(2)}" if move.group(2) else move.group(1)
        elif _STILL.search(clause):
            motion = "static"
        else:
            continue  # a clause about the subject only ("on the bag"): it sets the subject
        if motion not in motions:
            raise DirectorError(f"unknown camera motion {motion!r} in {clause!r}; known motions: {list(motions)}")
        scenes.append(Scene(label, subject, motion))
    if not scenes:
        raise DirectorError(f"script {script!r} names no camera motion; known motions: {list(motions)}")
    return scenes


# -- scoring: global motion by phase correlation ----------------------------------------------------------------------
def _window(h: int, w: int) -> np.ndarray:
    return np.outer(np.hanning(h + 2)[1:-1], np.hanning(w + 2)[1:-1])


def _shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(dy, dx) that registers ``b`` onto ``a`` (skimage's phase correlation on mean-free, Hann-windowed frames)."""
    from skimage.registration import phase_cross_correlation

    win = _window(*a.shape)
    shift, _, _ = phase_cross_correlation((a - a.mean()) * win, (b - b.mean()) * win, upsample_factor=4)
    return shift


def global_motion(clip: torch.Tensor | np.ndarray) -> dict[str, float]:
    """A gray clip ``(T, H, W)`` (or ``(T, 1, H, W)``) -> the camera's global motion summed over consecutive frames.

    ``pan_x`` / ``pan_y``: the whole frame's phase-correlation shift in pixels, signed as the camera moves (content
    moving left reads as a camera panning right, > 0); ``zoom``: how much the frame halves' shifts converge (the
    content expands when the camera zooms in, > 0), in pixels.
    """
    c = clip.detach().float().cpu().numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip, dtype=np.float64)
    if c.ndim == 4 and c.shape[1] == 1:
        c = c[:, 0]
    if c.ndim != 3 or c.shape[0] < 2 or min(c.shape[1:]) < 4:
        raise ValueError(f"clip must be gray frames (T >= 2, H, W >= 4), got shape {tuple(c.shape)}")
    H, W = c.shape[1:]
    pan, zoom = np.zeros(2), 0.0
    for a, b in itertools.pairwise(c):
        pan += _shift(a, b)
        # halves: the left half's content moves left (its registering shift is > 0) when the view expands
        zoom += _shift(a[:, : W // 2], b[:, : W // 2])[1] - _shift(a[:, W // 2 :], b[:, W // 2 :])[1]
        zoom += _shift(a[: H // 2], b[: H // 2])[0] - _shift(a[H // 2 :], b[H // 2 :])[0]
    return {"pan_x": float(pan[1]), "pan_y": float(pan[0]), "zoom": float(zoom)}
