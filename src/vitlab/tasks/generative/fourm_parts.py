"""Parts of ``fourm`` (4M, arXiv:2312.06647): modality specs, text from scene annotations, multimodal masking with
Dirichlet budgets, the decoder block with its attention mask, and the per-modality loss.

Captions and boxes-as-text are derived from a scene's annotations (``scene_words``): items are read left to right
(by box centre x, ties by centre y), at most ``max_items`` of them; the caption is their class words, the boxes text
is per item the class word then ``x1 y1 x2 y2`` as coordinate tokens (``WordTokenizer.coord_word``). Class words are
the class names lower-cased with spaces and slashes turned into ``_`` ("T-shirt/top" -> "t-shirt_top").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from ...layers.attention import Attention, attend
from ...layers.tokenizers import WordTokenizer

__all__ = [
    "MODALITIES",
    "CrossAttention",
    "DecoderBlock",
    "ModalitySpec",
    "class_word",
    "decoder_mask",
    "iterative_unmask",
    "per_modality_loss",
    "random_scenes",
    "sample_counts",
    "scene_words",
    "select_tokens",
    "sincos_1d",
    "unmask_schedule",
]

MODALITIES = ("rgb", "depth", "semseg", "caption", "boxes")
MASKINGS = ("dirichlet", "uniform")


@dataclass(frozen=True)
class ModalitySpec:
    """One modality's token layout: ``grid`` (h, w) for image-like maps, else a sequence of ``length`` tokens."""

    name: str
    vocab: int
    length: int
    grid: tuple[int, int] | None = None


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """A fixed 1-D sine-cosine position code ``(length, dim)`` (for sequence modalities)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.stack([(pos * freq).sin(), (pos * freq).cos()], -1).flatten(1)[:, :dim]


def random_scenes(
    batch_size: int, size: int, in_chans: int, num_classes: int, generator: torch.Generator | None = None
) -> dict:
    """A random scene batch: images, semantic maps, depths (2-8 m), two boxes and labels per scene."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, in_chans, size, size, generator=g)
    semantic = torch.randint(0, num_classes, (batch_size, size, size), generator=g)
    depth = 2 + 6 * torch.rand(batch_size, size, size, generator=g)
    boxes, labels = [], []
    for _ in range(batch_size):
        xy = torch.rand(2, 2, generator=g) * size / 2
        wh = torch.rand(2, 2, generator=g) * size / 2 + 1
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, num_classes - 1, (2,), generator=g))
    return {"image": image, "semantic": semantic, "depth": depth, "boxes": boxes, "labels": labels}


def class_word(name: str) -> str:
    """A class name as one vocabulary word."""
    return name.lower().replace(" ", "_").replace("/", "_")


def scene_words(
    boxes: torch.Tensor, labels: torch.Tensor, classes: list[str], text: WordTokenizer, size: int, max_items: int
) -> tuple[list[str], list[str]]:
    """One scene's (caption words, boxes-as-text words): see the module docstring for the reading order."""
    if len(boxes) != len(labels):
        raise ValueError(f"boxes ({len(boxes)}) and labels ({len(labels)}) must describe the same items")
    centres = [((float(b[0]) + float(b[2])) / 2, (float(b[1]) + float(b[3])) / 2) for b in boxes]
    order = sorted(range(len(labels)), key=lambda i: centres[i])[:max_items]
    caption = [class_word(classes[int(labels[i])]) for i in order]
    box_words = []
    for i in order:
        box_words.append(class_word(classes[int(labels[i])]))
        box_words += [text.coord_word(float(v), size) for v in boxes[i]]
    return caption, box_words


def sample_counts(
    caps: torch.Tensor, budget: int, mode: str = "dirichlet", alpha: float = 0.5, what: str = "input"
) -> torch.Tensor:
    """Split ``budget`` tokens of each sample across modalities: ``caps (B, M)`` int64 tokens each modality can give
    (0: not available) -> counts ``(B, M)`` with ``counts <= caps`` and each row summing to ``budget``.

    "dirichlet" (4M): shares drawn from ``Dirichlet(alpha)`` over the available modalities, rounded down, capped,
    and the rest handed out by largest remainder to modalities with room. "uniform": ``budget`` tokens drawn
    uniformly from all available tokens (MultiMAE's ablation baseline), so modalities get shares in proportion to
    their token counts. Uses the global torch RNG.
    """
    if mode not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {mode!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(
            f"the {what} budget must be a positive number of tokens (an empty budget masks nothing), got {budget!r}"
        )
    total = caps.sum(1)
    if bool((total < budget).any()):
        raise ValueError(
            f"the {what} budget of {budget} tokens exceeds the tokens available to a sample ({int(total.min())})"
        )
    counts = torch.zeros_like(caps)
    if mode == "uniform":
        for b in range(len(caps)):
            pool = torch.repeat_interleave(torch.arange(caps.shape[1]), caps[b])
            counts[b] = torch.bincount(pool[torch.randperm(len(pool))[:budget]], minlength=caps.shape[1])
        return counts
    gamma = torch._standard_gamma(torch.full(caps.shape, float(alpha))) * (caps > 0)
    gamma = torch.where(gamma.sum(1, keepdim=True) > 0, gamma, (caps > 0).float())  # all-zero draws (tiny alpha)
    share = gamma / gamma.sum(1, keepdim=True) * budget
    counts = torch.minimum(share.floor().long(), caps)
    for b in range(len(caps)):
        room, rest = (caps[b] - counts[b]).tolist(), budget - int(counts[b].sum())
        remainder = (share[b] - counts[b]).tolist()
        while rest > 0:
            m = max((k for k in range(len(room)) if room[k] > 0), key=lambda k: remainder[k])
            give = 1 if remainder[m] > 0 else min(room[m], rest)
            counts[b, m] += give
            room[m], remainder[m], rest = room[m] - give, remainder[m] - give, rest - give
    return counts


def select_tokens(n_in: torch.Tensor, n_tgt: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random, disjoint token positions: within modality ``m`` of sample ``b``, ``n_in[b, m]`` input and
    ``n_tgt[b, m]`` target tokens. Returns indices into the concatenated sequence (``sum(lengths)`` tokens):
    inputs ``(B, n_in.sum(1))`` and targets ``(B, n_tgt.sum(1))`` (each row the same total), sorted."""
    B = n_in.shape[0]
    is_in, is_tgt = [], []
    for m, L in enumerate(lengths):
        rank = torch.rand(B, L).argsort(1).argsort(1)  # a random permutation's rank of each position
        is_in.append(rank < n_in[:, m : m + 1])
        is_tgt.append((rank >= n_in[:, m : m + 1]) & (rank < (n_in + n_tgt)[:, m : m + 1]))
    picks = []
    for mask, counts in ((torch.cat(is_in, 1), n_in), (torch.cat(is_tgt, 1), n_tgt)):
        k = int(counts[0].sum())
        picks.append(torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k])
    return picks[0], picks[1]


def unmask_schedule(length: int, steps: int) -> list[int]:
    """Tokens revealed at each of ``steps`` rounds of iterative unmasking (MaskGIT's cosine schedule: after round
    ``s`` a share ``cos(pi / 2 * s / steps)`` stays masked); at least one per round, all ``length`` by the last."""
    if not 1 <= steps <= length:
        raise ValueError(f"steps must be in [1, {length}] for {length} tokens, got {steps}")
    masked = [length] + [math.floor(length * math.cos(math.pi / 2 * s / steps)) for s in range(1, steps)] + [0]
    out, left = [], length
    for s in range(steps):
        k = max(min(left - masked[s + 1], left - (steps - s - 1)), 1)  # keep one token for each later round
        out.append(k)
        left -= k
    return out


def iterative_unmask(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int,
    length: int,
    steps: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """MaskGIT-style decoding of one modality's ``length`` tokens in ``steps`` rounds (``unmask_schedule``): each
    round ``predict(tokens (B, L), known positions (B, k), masked positions (B, L - k))`` gives logits for the masked
    positions; the most confident predictions (argmax, or sampled at ``temperature`` > 0) are kept. -> ``(B, L)``."""
    known = torch.zeros(batch, length, dtype=torch.bool, device=device)
    out = torch.zeros(batch, length, dtype=torch.long, device=device)
    for reveal in unmask_schedule(length, steps):
        n_known = int(known[0].sum())
        order = torch.argsort(known.to(torch.int8), dim=1, stable=True)  # masked positions first, then known
        logits = predict(out, order[:, length - n_known :], order[:, : length - n_known])
        probs = logits.softmax(-1)
        if temperature > 0:
            flat = (logits / temperature).softmax(-1).flatten(0, 1)
            pred = torch.multinomial(flat, 1, generator=generator).view(batch, -1)
        else:
            pred = probs.argmax(-1)
        pick = probs.gather(-1, pred[..., None])[..., 0].topk(reveal, dim=1).indices
        pos = torch.gather(order[:, : length - n_known], 1, pick)
        out.scatter_(1, pos, torch.gather(pred, 1, pick))
        known.scatter_(1, pos, True)
    if not bool(known.all()):
        raise RuntimeError(f"iterative unmasking left {int((~known).sum())} tokens masked")
    return out


def decoder_mask(target_modality: torch.Tensor) -> torch.Tensor:
    """4M's decoder self-attention mask: target ``i`` attends to target ``j`` only when both belong to the same
    modality. ``(B, N)`` modality ids -> bool ``(B, 1, N, N)`` (True = attend)."""
    return (target_modality[:, :, None] == target_modality[:, None, :])[:, None]


def per_modality_loss(
    logits: list[torch.Tensor], targets: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """4M's "mod" loss: cross-entropy averaged over each modality's target tokens, then over the modalities that
    have targets in the batch. ``logits[m]`` ``(n_m, V_m)``, ``targets[m]`` ``(n_m,)``; returns (loss, per modality).
    A modality without targets contributes 0 (and stays in the graph, so its head gets a zero gradient)."""
    per, present = [], []
    for lg, t in zip(logits, targets, strict=True):
        per.append(F.cross_entropy(lg, t, reduction="sum") / max(len(t), 1))
        present.append(len(t) > 0)
    weights = torch.tensor(present, dtype=per[0].dtype, device=per[0].device)
    return (torch.stack(per) * weights).sum() / weights.sum().clamp(min=1), per


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x (B, N, D)`` to a context ``(B, M, D)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(B, N, D))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: masked self-attention among the targets, cross-attention to the encoder, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias=mask)
        x = x + self.cross_attn(self.norm2(x), self.norm_context(context))
        return x + self.mlp(self.norm3(x))
