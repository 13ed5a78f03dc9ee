"""CroCo cross-view completion pretraining for the DUSt3R-style model (paper 37, the review "DUSt3R -> VGGT").

DUSt3R (Wang et al., CVPR 2024, Sec. 3.3) starts from CroCo (Weinzaepfel et al., NeurIPS 2022): most patches of one
view are masked, the encoder sees only the visible ones, and a decoder that cross-attends to the other (unmasked)
view reconstructs the masked patches; the loss is the MSE on masked patches only, against per-patch normalised
pixels (MAE's ``norm_pix_loss``). The review and the DUSt3R paper report that training from scratch is much worse.
Reconstructed, no code copied; our :class:`~.dust3r.Dust3R` already has the shared encoder and cross-attending
decoders, so :class:`CroCoPretrainer` adds only a learned mask token and a linear pixel head per decoder:

- :func:`random_mask`: exactly ``round(ratio * N)`` masked patches per sample (CroCo: 0.9), and the kept indices.
- :func:`encode_visible`: the shared encoder on the kept patches only (a timm ``VisionTransformer``: patch and
  position embedding of the whole grid, then the blocks on the prefix tokens and the kept patch tokens).
- :meth:`CroCoPretrainer.loss`: the masked view's kept tokens are embedded (``Dust3R.embed``), scattered back onto
  the grid with the mask token at the masked places, and both decoders run as in :meth:`Dust3R.decode` (they
  exchange tokens every block); the masked view's decoder output (its ``norms``) -> pixels -> the masked-patch loss.
- :func:`load_croco`: a fresh ``Dust3R`` takes the pretrained encoder, ``embed``, decoders and norms (its heads stay
  new); a ``cross_view=False`` model drops the cross-attention weights (the ablation after pretraining).

Deviations: CroCo has one decoder (the masked view's); DUSt3R copies it into both of its decoders. Here each of the
two decoders is pretrained in place, in the role it has later: ``masked_view=1`` masks view 2, whose decoder must find
its content in view 1 (what view 2's pointmap in view 1's frame needs), ``masked_view=0`` masks view 1; the
benchmark alternates them. The reference view's decoder gets gradients only as context. No RoPE in the encoder (the
backbone keeps its learned position embedding, as in :mod:`.dust3r`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ...layers.dit import patchify
from ..video.frames import FrameEncoder
from .dust3r import Dust3R

__all__ = [
    "CroCoPretrainer",
    "encode_visible",
    "load_croco",
    "masked_patch_loss",
    "normalised_patches",
    "random_mask",
]


def random_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask`` (B, N) bool (True = masked; exactly ``round(ratio * N)`` per sample) and ``keep`` (B, K) the indices
    of the visible patches in increasing order. At least one patch stays visible."""
    if not 0 <= ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    masked = min(round(ratio * num_patches), num_patches - 1)
    order = torch.rand(batch, num_patches, generator=generator).argsort(1)
    keep = order[:, masked:].sort(1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool).scatter(1, keep, False)
    return mask.to(device), keep.to(device)


def normalised_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean, over its standard deviation (MAE's and CroCo's normalised pixel targets)."""
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only: ``pred``, ``target`` (B, N, P), ``mask`` (B, N) bool."""
    if pred.shape != target.shape or tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} differ")
    per_patch = (pred - target).pow(2).mean(-1)
    w = mask.to(per_patch.dtype)
    return (per_patch * w).sum() / w.sum().clamp_min(1)


def encode_visible(encoder: FrameEncoder, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The encoder's patch tokens (B, K, D) of images (B, C, H, W) computed from the kept patches ``keep`` (B, K)
    only: the masked patches never enter the blocks (CroCo's encoder sees the visible patches alone)."""
    bb = encoder.backbone
    if not all(hasattr(bb, a) for a in ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm")):
        raise ValueError(
            f"encode_visible needs a timm VisionTransformer-like backbone (patch_embed, _pos_embed, blocks, norm); "
            f"got {type(bb).__name__}"
        )
    x = bb._pos_embed(bb.patch_embed(images))  # (B, prefix + N, D), position embedding of the whole grid
    P = encoder.num_prefix_tokens
    if keep.ndim != 2 or keep.shape[0] != x.shape[0] or bool((keep < 0).any() | (keep >= x.shape[1] - P).any()):
        raise ValueError(f"keep must be (B={x.shape[0]}, K) indices into {x.shape[1] - P} patches, got {keep.shape}")
    x = torch.cat([x[:, :P], x[:, P:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))], 1)
    return bb.norm(bb.blocks(bb.norm_pre(x)))[:, P:]


class CroCoPretrainer(nn.Module):
    """Cross-view completion around a :class:`Dust3R` model (module docstring); ``model`` is trained in place.

    Args:
        model: the DUSt3R-style model whose encoder, ``embed``, decoders and norms are pretrained (cross_view=True).
        mask_ratio: the fraction of the masked view's patches that are hidden (CroCo: 0.9).
    """

    def __init__(self, model: Dust3R, mask_ratio: float = 0.9) -> None:
        super().__init__()
        if not isinstance(model, Dust3R) or not model.cross_view:
            raise ValueError("CroCo pretraining needs a Dust3R model with cross_view=True (the decoders must see the "
                             "other view)")  # fmt: skip
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.model, self.mask_ratio = model, mask_ratio
        dim = model.embed.out_features
        self.mask_token = nn.Parameter(torch.zeros(dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.pixel_heads = nn.ModuleList(nn.Linear(dim, model.patch**2 * model.in_chans) for _ in range(2))

    def forward(
        self, image: torch.Tensor, masked_view: int = 1, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Views (B, 2, C, H, W) -> ``pred`` (B, N, patch**2 * C) pixels of the masked view and its ``mask`` (B, N)."""
        m = self.model
        m.check_image(image)
        if masked_view not in (0, 1):
            raise ValueError(f"masked_view must be 0 or 1, got {masked_view}")
        B, N = image.shape[0], (m.img_size // m.patch) ** 2
        mask, keep = random_mask(B, N, self.mask_ratio, generator, image.device)
        visible = m.embed(encode_visible(m.encoder, image[:, masked_view], keep))  # (B, K, dec_dim)
        grid = self.mask_token.expand(B, N, -1)
        grid = grid.scatter(1, keep[..., None].expand(-1, -1, grid.shape[-1]), visible)
        ref = m.embed(m.encoder.patch_tokens(m.encoder(image[:, 1 - masked_view, None])))[:, 0]
        taps = m.decode(grid, ref) if masked_view == 0 else m.decode(ref, grid)
        out = m.norms[masked_view](taps[masked_view][-1])
        return {"pred": self.pixel_heads[masked_view](out), "mask": mask}

    def loss(
        self, image: torch.Tensor, masked_view: int = 1, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"loss"}``: the masked-patch MSE against normalised pixels of the masked view (module docstring)."""
        out = self(image, masked_view, generator)
        target = normalised_patches(patchify(image[:, masked_view].float(), self.model.patch))
        return {"loss": masked_patch_loss(out["pred"], target, out["mask"])}


def load_croco(model: Dust3R, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a pretrained ``Dust3R`` state (``CroCoPretrainer.model.state_dict()``) into ``model`` for fine-tuning:
    everything but the heads (kept as initialised); a ``cross_view=False`` model leaves out the cross-attention
    weights. Returns the loaded keys; raises on any other missing or unexpected key."""
    own = model.state_dict()
    cross = (".cross_attn.", ".norm2.", ".norm_other.")
    use = {k: v for k, v in state.items() if not k.startswith("heads.")}
    if not model.cross_view:
        use = {k: v for k, v in use.items() if not (k.startswith("decoders.") and any(c in k for c in cross))}
    missing = [k for k in own if k not in use and not k.startswith("heads.")]
    unexpected = [k for k in use if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"pretrained state does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in use.items():
        if own[k].shape != v.shape:
            raise ValueError(f"pretrained {k!r} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict(use, strict=False)
    return sorted(use)
