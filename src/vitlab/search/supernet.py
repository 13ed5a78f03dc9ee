"""ViT-ResNAS weight-sharing supernet (arXiv:2109.00642 Sec. 3.2; official ``nets/channel_drop.py``,
``nets/masked_layer_norm.py``, ``supernet_config/``).

The supernet is the largest ``ViTResNAS`` of a ``SearchSpace``; a sub-network keeps the first ``k`` channels of
each searched width: the token width of each stage, the attention heads (whole heads, ``heads x head_dim``), the
MLP hidden width, and whether a block is on. **Multi-architecture sampling**: one forward carries several
sub-networks, each on its own slice of the batch, through per-example channel masks ``(B, 1, C)``; LayerNorms
normalise over each example's active channels only (``masked_layer_norm``), so a masked forward equals the
standalone network built from the sliced weights (``Supernet.extract``), which the tests check.

Deviations: the official code also re-sorts heads and MLP channels by weight magnitude during warm-up
("rewiring"); not done here. The official masks are interleaved over the batch (``mask.repeat``); here each
architecture gets a contiguous slice (the same thing up to a permutation of examples). Progressive unlocking of
choices over warm-up epochs (official ``num_warmup_epochs``) is ``SearchSpace.sample(unlocked=...)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import attend, map_to_tokens, tokens_to_map
from ..models.vit_resnas import BlockSpec, ResNASSpec, StageSpec, ViTResNAS, count_macs

__all__ = ["Arch", "SearchSpace", "StageSpace", "Supernet", "masked_layer_norm"]

Gene = tuple[int, int, bool]  # (heads, mlp hidden, on) of one block


@dataclass(frozen=True)
class StageSpace:
    """Choices of one stage: token widths, heads per block, MLP hidden widths, and which blocks may be off."""

    embed: tuple[int, ...]
    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    head_dim: int
    depth: int
    skippable: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("embed", "heads", "mlp"):
            v = getattr(self, name)
            if not v or any(not isinstance(c, int) or c < 1 for c in v):
                raise ValueError(f"StageSpace.{name} must be a non-empty tuple of positive ints, got {v!r}")
        if self.depth < 1 or any(not 0 <= i < self.depth for i in self.skippable):
            raise ValueError(f"StageSpace: depth {self.depth} must be >= 1 and skippable indices within it")


@dataclass(frozen=True)
class Arch:
    """One sub-network: a token width per stage and ``(heads, mlp hidden, on)`` per block of each stage."""

    embed: tuple[int, ...]
    blocks: tuple[tuple[Gene, ...], ...]


@dataclass(frozen=True)
class SearchSpace:
    """Per-stage choices plus the fixed parts (stem, image size, classes); the largest choices build the supernet."""

    stages: tuple[StageSpace, ...]
    patch_size: int = 4
    stem_chans: int = 16
    img_size: int = 28
    in_chans: int = 1
    num_classes: int = 10

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("SearchSpace.stages must not be empty")
        for s in range(1, len(self.stages)):
            if min(self.stages[s].embed) < max(self.stages[s - 1].embed):
                raise ValueError(f"SearchSpace stage {s}: its smallest width is below stage {s - 1}'s largest")

    def largest(self) -> Arch:
        return Arch(
            tuple(max(s.embed) for s in self.stages),
            tuple(((max(s.heads), max(s.mlp), True),) * s.depth for s in self.stages),
        )

    def smallest(self) -> Arch:
        return Arch(
            tuple(min(s.embed) for s in self.stages),
            tuple(tuple((min(s.heads), min(s.mlp), i not in s.skippable) for i in range(s.depth)) for s in self.stages),
        )

    def sample(self, rng: random.Random, unlocked: float = 1.0) -> Arch:
        """A uniformly random sub-network; ``unlocked < 1`` draws only from the largest fraction of each choice list."""

        def pick(choices: tuple[int, ...]) -> int:
            ordered = sorted(choices, reverse=True)
            return rng.choice(ordered[: 1 + math.floor(unlocked * (len(ordered) - 1))])

        embed = tuple(pick(s.embed) for s in self.stages)
        on = unlocked >= 1.0  # skipping unlocks last, as the official layer choices do
        blocks = tuple(
            tuple(
                (pick(s.heads), pick(s.mlp), not (on and i in s.skippable and rng.random() < 0.5))
                for i in range(s.depth)
            )
            for s in self.stages
        )
        return Arch(embed, blocks)

    def validate(self, arch: Arch) -> None:
        """Raise ValueError if ``arch`` is not a sub-network of this space."""
        if len(arch.embed) != len(self.stages) or len(arch.blocks) != len(self.stages):
            raise ValueError(f"arch has {len(arch.embed)} stage widths for a {len(self.stages)}-stage space")
        for i, (s, e, blocks) in enumerate(zip(self.stages, arch.embed, arch.blocks, strict=True)):
            if e not in s.embed or len(blocks) != s.depth:
                raise ValueError(f"arch stage {i}: width {e} not in {s.embed} or {len(blocks)} blocks != {s.depth}")
            for j, (h, m, on) in enumerate(blocks):
                if h not in s.heads or m not in s.mlp or (not on and j not in s.skippable):
                    raise ValueError(f"arch stage {i} block {j}: ({h}, {m}, {on}) is not a choice of this space")

    def to_spec(self, arch: Arch) -> ResNASSpec:
        """The standalone network of ``arch`` (blocks that are off are left out)."""
        self.validate(arch)
        stages = tuple(
            StageSpec(e, tuple(BlockSpec(h, s.head_dim, m) for h, m, on in blocks if on))
            for s, e, blocks in zip(self.stages, arch.embed, arch.blocks, strict=True)
        )
        return ResNASSpec(stages, patch_size=self.patch_size, stem_chans=self.stem_chans)

    def macs(self, arch: Arch) -> int:
        return count_macs(self.to_spec(arch), self.img_size, self.in_chans, self.num_classes)


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm of ``x (B, N, C)`` over each example's active channels ``mask (B, 1, C)``; inactive ones -> 0.

    With the first ``k`` channels active this is ``nn.LayerNorm(k)`` (weights ``[:k]``) on ``x[..., :k]``.
    """
    m = mask.to(x.dtype)
    k = m.sum(-1, keepdim=True)
    mean = (x * m).sum(-1, keepdim=True) / k
    var = ((x - mean).square() * m).sum(-1, keepdim=True) / k
    return ((x - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias) * m


def _first(k: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """``(len(k), 1, width)`` bool masks keeping the first ``k[i]`` channels."""
    return (torch.arange(width, device=device)[None, :] < torch.tensor(k, device=device)[:, None]).unsqueeze(1)


class Supernet(nn.Module):
    """The space's largest ``ViTResNAS`` (``self.model``) run with per-example channel masks.

    ``forward(x, archs)``: the batch is split into ``len(archs)`` equal slices, slice ``i`` runs sub-network
    ``archs[i]``; with one arch the whole batch runs it. ``extract(arch)`` is that sub-network as a standalone
    ``ViTResNAS`` holding the sliced shared weights.
    """

    def __init__(self, space: SearchSpace, reduction: str = "residual") -> None:
        super().__init__()
        self.space = space
        self.model = ViTResNAS(
            space.to_spec(space.largest()),
            img_size=space.img_size,
            in_chans=space.in_chans,
            num_classes=space.num_classes,
            reduction=reduction,
        )

    def _masks(self, archs: Sequence[Arch], per: int, dev: torch.device) -> list[dict[str, torch.Tensor]]:
        stages = []
        for s, (st, stage) in enumerate(zip(self.space.stages, self.model.stages, strict=True)):
            width = stage.dim
            rep = lambda m: m.repeat_interleave(per, 0)  # noqa: E731  (arch i owns examples i*per ... )
            heads = [[a.blocks[s][j][0] * st.head_dim for a in archs] for j in range(st.depth)]
            mlps = [[a.blocks[s][j][1] for a in archs] for j in range(st.depth)]
            on = [torch.tensor([float(a.blocks[s][j][2]) for a in archs], device=dev) for j in range(st.depth)]
            stages.append(
                {
                    "embed": rep(_first([a.embed[s] for a in archs], width, dev)),
                    "heads": [rep(_first(h, max(st.heads) * st.head_dim, dev)) for h in heads],
                    "mlp": [rep(_first(m, max(st.mlp), dev)) for m in mlps],
                    "on": [rep(o)[:, None, None] for o in on],
                }
            )
        return stages

    def forward(self, x: torch.Tensor, archs: Arch | Sequence[Arch]) -> torch.Tensor:
        archs = [archs] if isinstance(archs, Arch) else list(archs)
        if not archs or x.shape[0] % len(archs):
            raise ValueError(f"batch of {x.shape[0]} must split evenly over {len(archs)} architectures (>= 1)")
        for a in archs:
            self.space.validate(a)
        masks = self._masks(archs, x.shape[0] // len(archs), x.device)
        m = self.model
        x, grid = m.embed(x)
        prev = None
        for stage, mk in zip(m.stages, masks, strict=True):
            emb = mk["embed"]
            if prev is not None:
                x, grid = self._reduce(stage.downsample, x, grid, prev)
            x = x * emb
            for j, block in enumerate(stage.blocks):
                keep = emb * mk["on"][j]
                y = self._attention(block.attn, masked_layer_norm(x, emb, block.norm1), mk["heads"][j])
                x = x + block.drop_path1(y) * keep
                h = block.mlp.act(block.mlp.fc1(masked_layer_norm(x, emb, block.norm2))) * mk["mlp"][j]
                x = x + block.drop_path2(block.mlp.fc2(h)) * keep
            prev = emb
        return m.forward_head(masked_layer_norm(x, prev, m.norm))

    @staticmethod
    def _attention(attn: nn.Module, x: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return attn.proj(out * head_mask)  # inactive heads contribute nothing to the active ones or the output

    @staticmethod
    def _reduce(sr: nn.Module, x: torch.Tensor, grid: tuple[int, int], mask_in: torch.Tensor):
        y = masked_layer_norm(x, mask_in, sr.norm)
        patches, new_grid = map_to_tokens(sr.conv(tokens_to_map(y, grid, 1)))
        out = torch.cat([sr.token_proj(y[:, :1]), patches + sr.pos_embed], dim=1)
        # x is zero beyond the active input width, so the zero-padded shortcut is the sub-network's
        return (out + sr.shortcut(x, grid) if sr.residual else out), new_grid

    @torch.no_grad()
    def extract(self, arch: Arch) -> ViTResNAS:
        """The standalone network of ``arch`` with the shared weights sliced into it."""
        sub = ViTResNAS(
            self.space.to_spec(arch),
            img_size=self.space.img_size,
            in_chans=self.space.in_chans,
            num_classes=self.space.num_classes,
            reduction=self.model.reduction,
        )
        src = self.model.state_dict()
        rename = {}  # standalone block index -> supernet block index (blocks that are off are absent)
        for s, blocks in enumerate(arch.blocks):
            kept = [j for j, g in enumerate(blocks) if g[2]]
            rename.update({f"stages.{s}.blocks.{i}.": f"stages.{s}.blocks.{j}." for i, j in enumerate(kept)})
        state = {}
        for name, dst in sub.state_dict().items():
            key = name
            for a, b in rename.items():
                if name.startswith(a):
                    key = b + name[len(a) :]
            t = src[key]
            if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
                t = self._slice_qkv(t, key, dst.shape)
            state[name] = t[tuple(slice(0, n) for n in dst.shape)].clone() if dst.ndim else t.clone()
        sub.load_state_dict(state)
        return sub.train(self.training)

    def _slice_qkv(self, t: torch.Tensor, key: str, shape: torch.Size) -> torch.Tensor:
        s = int(key.split(".")[1])
        hd, heads = self.space.stages[s].head_dim, max(self.space.stages[s].heads)
        h = shape[0] // (3 * hd)
        rows = t.reshape(3, heads, hd, *t.shape[1:])[:, :h]  # the first h heads of each of q, k, v
        return rows.reshape(3 * h * hd, *t.shape[1:])
