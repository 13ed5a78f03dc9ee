"""Discrete tokenizers: an image-like map <-> a grid of codes (FSQ or VQ), and a word-level text tokenizer.

4M (Mizrahi et al., "4M: Massively Multimodal Masked Modeling", arXiv:2312.06647) turns every modality into
discrete tokens with a tokenizer trained beforehand and frozen: VQ-VAEs for dense maps, WordPiece for text (captions
and bounding boxes written as text with coordinate tokens). This module holds small stand-ins that train in minutes
on a CPU at 16-64 px:

- ``ImageTokenizer``: a conv encoder (stride ``2 ** downsample``), a quantiser and a conv decoder. The quantiser is
  FSQ (Mentzer et al., arXiv:2309.15505; ``levels`` per latent channel, no codebook to collapse) or a VQ codebook
  (van den Oord et al., arXiv:1711.00937) with EMA updates, both from ``vector-quantize-pytorch`` (the optional
  ``vitlab[generative]`` extra, imported when a tokenizer is built). ``kind="regression"`` reconstructs a float
  map (MSE), ``kind="classes"`` takes class ids, one-hot encodes them and decodes logits (cross-entropy), as 4M's
  semantic-segmentation tokenizer does. ``train_tokenizer`` fits one.
- ``WordTokenizer``: a fixed word vocabulary (no WordPiece: the demo's captions use a dozen words) plus ``bins``
  coordinate tokens ``<loc_k>`` for box corners, ``<pad>`` and ``<eos>``; ``encode`` / ``decode`` round-trip.

Deviations from 4M: its image tokenizers are ViT VQ-VAEs (some with diffusion decoders) at 224 px with 14x14 tokens
and 4-16 k codes; here small conv autoencoders give ``(H / 2**downsample)``-sided grids with a few hundred codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ImageTokenizer", "WordTokenizer", "require_vector_quantize", "train_tokenizer"]

KINDS = ("regression", "classes")
QUANTIZERS = ("fsq", "vq")


def require_vector_quantize() -> Any:
    """The ``vector_quantize_pytorch`` module, or an ImportError naming the extra that installs it."""
    try:
        import vector_quantize_pytorch
    except ImportError as err:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError("discrete tokenizers need vector-quantize-pytorch: pip install 'vitlab[generative]'") from err
    return vector_quantize_pytorch


def _conv_stack(chans: Sequence[int], downsample: int, up: bool) -> nn.Sequential:
    """3x3 conv in, ``downsample`` stride-2 (transposed) 4x4 convs, 3x3 conv out; GELU between."""
    c_in, hidden, c_out = chans
    layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, 3, padding=1), nn.GELU()]
    for _ in range(downsample):
        step = nn.ConvTranspose2d if up else nn.Conv2d
        layers += [step(hidden, hidden, 4, stride=2, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(hidden, c_out, 3, padding=1) if up else nn.Conv2d(hidden, c_out, 1))
    return nn.Sequential(*layers)


class ImageTokenizer(nn.Module):
    """A map ``(B, C, H, W)`` (or class ids ``(B, H, W)``) <-> codes ``(B, H / s, W / s)`` with ``s = 2**downsample``.

    Args:
        in_chans: channels of a regression map; for ``kind="classes"`` the number of classes.
        kind: "regression" (float maps, MSE) or "classes" (int64 class ids, cross-entropy on decoded logits).
        quantizer: "fsq" (``levels``: one level count per latent channel; codebook ``prod(levels)``) or "vq"
            (``codebook_size`` codes of ``len(levels)`` channels, EMA updates, commitment loss).
        hidden: width of the conv encoder and decoder.
        downsample: stride-2 stages (2: a 32 px map -> 8x8 codes).
    """

    def __init__(
        self,
        in_chans: int,
        *,
        kind: str = "regression",
        quantizer: str = "fsq",
        levels: Sequence[int] = (5, 5, 5),
        codebook_size: int = 256,
        hidden: int = 32,
        downsample: int = 2,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if not levels or any(int(n) < 3 for n in levels):
            raise ValueError(f"levels must be level counts >= 3 per latent channel, got {tuple(levels)!r}")
        if in_chans < 1 or downsample < 0 or hidden < 1:
            raise ValueError(
                f"in_chans, hidden must be >= 1 and downsample >= 0, got {in_chans}, {hidden}, {downsample}"
            )
        vq = require_vector_quantize()
        dim = len(levels)
        self.kind, self.in_chans, self.downsample, self.quantizer_name = kind, in_chans, downsample, quantizer
        self.encoder = _conv_stack((in_chans, hidden, dim), downsample, up=False)
        self.decoder = _conv_stack((dim, hidden, in_chans), downsample, up=True)
        if quantizer == "fsq":
            self.quantizer = vq.FSQ(levels=[int(n) for n in levels])
            self.codebook_size = int(self.quantizer.codebook_size)
        else:
            self.quantizer = vq.VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.9, commitment_weight=0.25)
            self.codebook_size = codebook_size

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "classes":
            if x.ndim != 3 or x.dtype != torch.long:
                raise ValueError(
                    f"a class-map tokenizer takes int64 (B, H, W) class ids, got {x.dtype} {tuple(x.shape)}"
                )
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.in_chans):
                raise ValueError(f"class ids must lie in [0, {self.in_chans}), got [{int(x.min())}, {int(x.max())}]")
            return F.one_hot(x, self.in_chans).permute(0, 3, 1, 2).float()
        if x.ndim != 4 or x.shape[1] != self.in_chans or not x.is_floating_point():
            raise ValueError(
                f"the tokenizer takes float (B, {self.in_chans}, H, W) maps, got {x.dtype} {tuple(x.shape)}"
            )
        side = 2**self.downsample
        if x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(f"map sides must be multiples of {side}, got {tuple(x.shape[-2:])}")
        return x

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent ``(B, d, h, w)`` -> quantised latent, codes ``(B, h, w)`` int64, auxiliary (commitment) loss."""
        if self.quantizer_name == "fsq":
            q, codes = self.quantizer(z)
            return q, codes.long(), z.new_zeros(())
        B, d, h, w = z.shape
        q, codes, aux = self.quantizer(z.flatten(2).transpose(1, 2))
        return q.transpose(1, 2).reshape(B, d, h, w), codes.view(B, h, w).long(), aux.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` -> (reconstruction or class logits ``(B, C, H, W)``, codes ``(B, h, w)``, auxiliary loss)."""
        q, codes, aux = self._quantize(self.encoder(self._input(x)))
        return self.decoder(q), codes, aux

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Map (or class ids) -> codes ``(B, h, w)`` int64 in ``[0, codebook_size)``."""
        return self._quantize(self.encoder(self._input(x)))[1]

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> quantised latents ``(B, d, h, w)``."""
        if codes.dtype != torch.long or codes.ndim != 3:
            raise ValueError(f"codes must be int64 (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        if self.quantizer_name == "fsq":
            return self.quantizer.indices_to_codes(codes)  # (B, h, w) ids come back channel-first
        return self.quantizer.get_codes_from_indices(codes.flatten(1)).view(*codes.shape, -1).permute(0, 3, 1, 2)

    def vectors_to_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Quantised latents ``(B, d, h, w)`` (FSQ grid points) -> codes ``(B, h, w)``: the inverse of the above."""
        if self.quantizer_name == "fsq":
            return self.quantizer.codes_to_indices(vectors.permute(0, 2, 3, 1)).long()
        return self._quantize(vectors)[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> the map: float ``(B, C, H, W)``, or class ids ``(B, H, W)`` for ``kind="classes"``."""
        out = self.decoder(self.codes_to_vectors(codes))
        return out.argmax(1) if self.kind == "classes" else out

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss on a batch: reconstruction (MSE or cross-entropy) plus the quantiser's auxiliary loss."""
        out, _, aux = self(x)
        rec = F.cross_entropy(out, x) if self.kind == "classes" else F.mse_loss(out, x)
        return rec + aux


def train_tokenizer(
    tokenizer: ImageTokenizer, data: torch.Tensor, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0
) -> list[float]:
    """Fit ``tokenizer`` on ``data`` (maps or class ids, first dim N) with AdamW and a cosine schedule; returns the
    losses. Leaves the tokenizer in eval mode with gradients off (4M freezes its tokenizers)."""
    if steps < 1 or batch < 1 or len(data) == 0:
        raise ValueError(f"steps and batch must be >= 1 and data non-empty, got {steps}, {batch}, {len(data)}")
    g = torch.Generator().manual_seed(seed)
    tokenizer.train().requires_grad_(True)
    opt = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (min(batch, len(data)),), generator=g)
        loss = tokenizer.loss(data[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tokenizer.eval().requires_grad_(False)
    return losses


class WordTokenizer:
    """Words <-> ids over a fixed vocabulary: ``<pad>`` (0), ``<eos>`` (1), ``words``, then ``<loc_0>`` ..
    ``<loc_{bins-1}>``.

    Coordinate tokens quantise a position in ``[0, size)`` into ``bins`` equal cells (``coord_word``); ``coord_value``
    returns the cell's centre.
    """

    PAD, EOS = "<pad>", "<eos>"

    def __init__(self, words: Sequence[str], bins: int = 16) -> None:
        words = list(words)
        if len(set(words)) != len(words) or any((not w) or (" " in w) for w in words):
            raise ValueError(f"words must be distinct non-empty words without spaces, got {words!r}")
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.vocab = [self.PAD, self.EOS, *words, *(f"<loc_{k}>" for k in range(bins))]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError(f"words must not reuse the special or coordinate tokens, got {words!r}")

    def __len__(self) -> int:
        return len(self.vocab)

    def coord_word(self, value: float, size: float) -> str:
        """A position ``value`` in ``[0, size]`` -> its coordinate token."""
        return f"<loc_{min(max(int(value / size * self.bins), 0), self.bins - 1)}>"

    def coord_value(self, word: str, size: float) -> float:
        """A coordinate token -> the centre of its cell in ``[0, size)``."""
        if not (word.startswith("<loc_") and word in self.index):
            raise ValueError(f"{word!r} is not a coordinate token of this tokenizer (<loc_0> .. <loc_{self.bins - 1}>)")
        return (int(word[5:-1]) + 0.5) * size / self.bins

    def encode(self, words: Sequence[str], length: int) -> torch.Tensor:
        """Words -> int64 ``(length,)``: their ids, ``<eos>``, then ``<pad>``."""
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"words {unknown!r} are not in the vocabulary ({len(self.vocab)} entries)")
        if len(words) + 1 > length:
            raise ValueError(f"{len(words)} words and <eos> do not fit in length {length}")
        ids = [self.index[w] for w in words] + [1] + [0] * (length - len(words) - 1)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        """Ids -> the words before the first ``<eos>`` (``<pad>`` skipped)."""
        out = []
        for i in torch.as_tensor(ids).tolist():
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"id {i} is outside the vocabulary [0, {len(self.vocab)})")
            if i == 1:
                break
            if i:
                out.append(self.vocab[i])
        return out
