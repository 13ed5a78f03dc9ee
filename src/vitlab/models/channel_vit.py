"""ChannelViT: "Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words" (arXiv:2309.16108),
github.com/insitro/ChannelViT (PAPERS.md row 14; arXiv v4 is titled "... 1 x 16 x 16 Words").

Each input channel is cut into its own patch tokens by one projection shared across channels, and a learned
channel embedding (plus the position embedding, also shared across channels) tells the tokens apart, so a
``C``-channel image becomes ``C * H' * W'`` tokens (Sec. 3.1). The model runs on any subset of its channels:
``model(x, channels=idx)`` with ``x`` holding only the channels listed in ``idx`` uses their embeddings, which
is what Hierarchical Channel Sampling (``vitlab.engine.hcs``, ``vitlab train --hcs``) trains for and
``vitlab eval --channels`` tests. Blocks, head and the timm contract come from ``layers.IsotropicBackbone``.

The paper publishes no parameter or FLOP table, so the reference figures are reconstructed from the official
code (``channelvit_small`` / ``channelvit_base`` in ``backbone/hcs_channel_vit.py``: ViT-S/B, qkv bias,
LayerNorm eps 1e-6) at 224 px with the ImageNet setting of 3 channels; compute grows with the channel count
(589 tokens for 3 channels; the 1-channel cost is roughly a ViT's).
Deviations: a ``Conv2d(1, D)`` over the channels folded into the batch instead of the official
``Conv3d(1, D, (1, p, p))`` (the same weights); the class token's position embedding is folded into the class
token (the official pos_embed has a class slot; ``checkpoint_filter_fn`` adds it in), hence 384/768 fewer
parameters; the channel embedding is excluded from weight decay like the position embedding; attention runs
through ``F.scaled_dot_product_attention``. ``forward_intermediates`` (and ``features_only``) return each
patch's tokens averaged over the channels, ``(B, D, H', W')`` at stride ``p`` as ``feature_info`` declares: the
paper defines no dense output, and the mean keeps the width ``D`` and the scale for any channel subset (the
subsets HCS trains on), where stacking or concatenating would make the map's shape depend on the channel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, to_2tuple, trunc_normal_

from ..layers import Attention, Grid, IsotropicBackbone, MetaBlock, tokens_to_map
from ._variants import Paper, VariantSpec, build_with_features, register_variants

__all__ = ["CHANNELVIT", "VARIANTS", "ChannelViT", "checkpoint_filter_fn"]

CHANNELVIT = Paper(
    14,
    "Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words",
    "2309.16108",
    "https://github.com/insitro/ChannelViT",
    kind="B+T",
)

ChannelIndex = torch.Tensor | Sequence[int] | None


class _PatchEmbedPerChannel(nn.Module):
    """A patch projection shared by all channels plus a learned embedding per channel (Sec. 3.1, Eq. 1).

    ``(B, C, H, W)`` image and ``(C,)`` channel indices -> ``(B, C, H / p, W / p, D)`` tokens.
    """

    def __init__(self, img_size: Any, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(1, embed_dim, patch_size, patch_size)
        self.channel_embed = nn.Parameter(torch.zeros(in_chans, embed_dim))

    def forward(self, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = self.proj(x.reshape(B * C, 1, H, W))  # every channel through the same weights: (B*C, D, H', W')
        x = x.unflatten(0, (B, C)).permute(0, 1, 3, 4, 2)  # (B, C, H', W', D)
        return x + self.channel_embed[channels].view(1, C, 1, 1, -1)


class ChannelViT(IsotropicBackbone):
    """ViT whose tokens are (channel, patch) pairs; runs on any subset of its ``in_chans`` channels.

    ``forward(x, channels=None)``: ``x`` is ``(B, len(channels), H, W)``; ``channels`` lists which of the
    model's channels ``x`` holds (default: all ``in_chans``, in order).
    """

    # read by vitlab.engine.hcs: the model takes a channel subset plus its indices
    supports_channel_subsets = True

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Any = None,
    ) -> None:
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        mixer = partial(
            Attention, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate
        )

        def block_fn(index: int, drop_path: float) -> nn.Module:
            return MetaBlock(embed_dim, mixer, None, norm_layer, mlp_ratio, drop_path, proj_drop_rate)

        super().__init__(
            block_fn,
            depth,
            embed_dim,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            embed_layer=_PatchEmbedPerChannel,
        )
        self.in_chans = in_chans

    def init_weights(self) -> None:
        super().init_weights()
        trunc_normal_(self.patch_embed.channel_embed, std=0.02)  # as the official code

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {*super().no_weight_decay(), "patch_embed.channel_embed"}

    def channel_index(self, x: torch.Tensor, channels: ChannelIndex = None) -> torch.Tensor:
        """The model channels ``x`` holds as a ``(C,)`` long tensor, checked against ``x`` and ``in_chans``."""
        return _channel_index(x, channels, self.in_chans)

    def _embed(self, x: torch.Tensor, channels: ChannelIndex = None) -> tuple[torch.Tensor, Grid]:
        x = self.patch_embed(x, self.channel_index(x, channels))  # (B, C, H', W', D)
        B, C, H, W, D = x.shape
        # one position embedding for every channel; tokens are channel-major: (B, C*H'*W', D)
        x = (x + self._pos_embed_for((H, W)).view(1, 1, H, W, D)).reshape(B, C * H * W, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        # the blocks ignore the grid; it is the patch grid each channel's tokens fill
        return self.pos_drop(x), (H, W)

    def _tokens_to_map(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``(B, 1 + C*H'*W', D)`` -> ``(B, D, H', W')``: the channels' token maps averaged (module docstring)."""
        tokens = x[:, 1:].unflatten(1, (-1, grid[0] * grid[1])).mean(dim=1)  # (B, H'*W', D)
        return tokens_to_map(tokens, grid)

    def forward_features(self, x: torch.Tensor, channels: ChannelIndex = None) -> torch.Tensor:
        """``(B, C, H, W)`` (the channels listed in ``channels``) -> normed tokens ``(B, 1 + C*H'*W', D)``."""
        x, grid = self._embed(x, channels)
        return self.norm(self._run_blocks(x, grid))

    def forward(self, x: torch.Tensor, channels: ChannelIndex = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, channels))


@torch.fx.wrap
def _channel_index(x: torch.Tensor, channels: ChannelIndex, in_chans: int) -> torch.Tensor:
    """``ChannelViT.channel_index``; one FX graph node (the checks read values), so the model traces."""
    C = x.shape[1]
    if channels is None:
        if in_chans != C:
            raise ValueError(
                f"input has {C} channels but the model takes in_chans={in_chans}; for a subset of the "
                "channels pass channels= with their indices"
            )
        return torch.arange(C, device=x.device)
    index = torch.as_tensor(channels, dtype=torch.long, device=x.device).flatten()
    if index.numel() != C:
        raise ValueError(f"channels lists {index.numel()} indices for an input of {C} channels")
    if index.device.type != "meta":
        values = index.tolist()
        if not all(0 <= c < in_chans for c in values) or len(set(values)) != len(values):
            raise ValueError(f"channels must be distinct indices in 0..{in_chans - 1}, got {values}")
    return index


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ChannelViT | None = None) -> dict[str, Any]:
    """Map an official insitro/ChannelViT state dict (``channel_vit.py`` or ``hcs_channel_vit.py``) onto ours.

    The Conv3d patch weight loses its depth axis, both channel-embedding layouts become ``(C, D)``, and the
    class slot of the official position embedding moves into the class token (the same sum).
    """
    state_dict = state_dict.get("state_dict", state_dict)
    official = state_dict.get("patch_embed.proj.weight", torch.empty(0)).ndim == 5  # the Conv3d projection
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key == "patch_embed.proj.weight" and value.ndim == 5:
            value = value.squeeze(2)  # (D, 1, 1, p, p) -> (D, 1, p, p)
        elif key == "patch_embed.channel_embed" and value.ndim == 5:
            value = value.flatten(2).squeeze(0).t()  # (1, D, C, 1, 1) -> (C, D)
        elif key == "patch_embed.channel_embed.weight":
            key = "patch_embed.channel_embed"  # nn.Embedding(C, D)
        out[key] = value
    if official and "pos_embed" in out:
        # the official class token gets pos_embed[:, 0] added unconditionally: fold it in
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    if model is not None and "pos_embed" in out and out["pos_embed"].shape[1] != model.grid[0] * model.grid[1]:
        out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], new_size=model.grid, num_prefix_tokens=0)
    return out


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ChannelViT:
    return build_with_features(ChannelViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


# Tiny config for the registry tests: 2 blocks at 32 px, 4x4 patches per channel.
_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}
_OFFICIAL = "reconstructed: official hcs_channel_vit.py config, 3 channels, 224 px, 1000 classes"


def _spec(desc: str, ref_source: str = _OFFICIAL, **kw: Any) -> VariantSpec:
    return VariantSpec(CHANNELVIT, ref_source=ref_source, test_kwargs=_TINY, isotropic=True, description=desc, **kw)


# Reference figures, worked out by hand from the official config (D = width, T = 1 + 3*196 = 589 tokens):
# params = (256*D + D) projection + 3*D channel embedding + D class token + 197*D official pos_embed
# + 12 * (12*D*D + 13*D) blocks + 2*D norm + (1000*D + 1000) head = 21.855M (S) / 86.177M (B);
# MACs = 12 * (12*T*D*D + 2*T*T*D) + 588 patches * 256 * D + 1000*D = 15.76G (S) / 56.54G (B).
VARIANTS = {
    "channelvit_small_patch16_224": _spec(
        "ChannelViT-S/16, ImageNet setting (3 channels)", ref_params_m=21.86, ref_gmacs=15.76
    ),
    "channelvit_base_patch16_224": _spec(
        "ChannelViT-B/16, ImageNet setting (3 channels)",
        ref_params_m=86.18,
        ref_gmacs=56.54,
        kwargs={"embed_dim": 768, "num_heads": 12},
    ),
    "channelvit_small_patch8_224": _spec(
        "ChannelViT-S/8, JUMP-CP setting (5 Cell Painting + 3 brightfield channels)",
        kwargs={"patch_size": 8, "in_chans": 8},
        in_chans=8,
        mean=(0.5,) * 8,
        std=(0.5,) * 8,
        ref_source="official hub model cpjump_cellpaint_bf_channelvit_small_p8 (no paper table)",
    ),
    "channelvit_nano_patch4_28": _spec(
        "ChannelViT at vit_nano_patch4_28's size for the 4-channel Fashion-MNIST set",
        kwargs=dict(
            img_size=28, patch_size=4, in_chans=4, num_classes=10, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0
        ),
        img_size=28,
        in_chans=4,
        num_classes=10,
        mean=(0.5,) * 4,
        std=(0.5,) * 4,
        ref_source="vitlab small-image size (no paper table)",
    ),
}

register_variants(_create, VARIANTS, module=__name__)
