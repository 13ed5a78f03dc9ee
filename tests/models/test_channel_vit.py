"""ChannelViT against a naive re-statement of the official formulation, and the paper's channel claims."""

from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

import vitlab
from vitlab.bench import count_params_meta
from vitlab.models.channel_vit import checkpoint_filter_fn

D, P, C, S = 32, 8, 4, 32  # width, patch, channels, image size: 4x4 patches per channel
# the official blocks' MLP ratio 4 (the nano variant halves it)
TINY = dict(embed_dim=D, depth=2, num_heads=2, mlp_ratio=4.0, img_size=S, patch_size=P, in_chans=C, num_classes=5)


class _OfficialLayout(nn.Module):
    """The official ChannelViT forward, written out naively with the official parameter layout.

    Conv3d (1, D, (1, p, p)) shared projection, channel embedding (1, D, C, 1, 1), a position embedding
    with a class slot, timm's pre-norm Block (the official Block's names), LayerNorm eps 1e-6, CLS head.
    """

    def __init__(self) -> None:
        super().__init__()
        n = (S // P) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(1, D, (1, P, P), (1, P, P))
        self.patch_embed.channel_embed = nn.Parameter(torch.randn(1, D, C, 1, 1))
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, D))
        self.blocks = nn.ModuleList(
            Block(D, 2, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, 5)

    def forward(self, x: torch.Tensor, channels: list[int]) -> torch.Tensor:
        B, c = x.shape[:2]
        t = self.patch_embed.proj(x.unsqueeze(1))  # (B, D, c, H', W')
        t = t + self.patch_embed.channel_embed[:, :, channels]
        t = t.flatten(2).transpose(1, 2)  # (B, c*H'*W', D), channel-major
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1)
        pos = torch.cat([self.pos_embed[:, :1], self.pos_embed[:, 1:].repeat(1, c, 1)], dim=1)
        t = t + pos
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t)[:, 0])


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = _OfficialLayout().eval()
    for p in ref.parameters():  # non-trivial norms and biases everywhere
        p.data.add_(0.1 * torch.randn_like(p))
    ours = vitlab.create_model("channelvit_nano_patch4_28", **TINY).eval()
    ours.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ours))
    return ref, ours


def test_matches_official_formulation_on_all_channels_and_subsets():
    ref, ours = _pair()
    x = torch.randn(2, C, S, S)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, list(range(C))), atol=1e-5, rtol=1e-4)
        for subset in ([2], [0, 3], [1, 2, 3]):
            got = ours(x[:, subset], channels=subset)
            torch.testing.assert_close(got, ref(x[:, subset], subset), atol=1e-5, rtol=1e-4)


def test_filter_accepts_the_embedding_layout_of_the_hcs_code():
    ref, ours = _pair()
    sd = ref.state_dict()
    # hcs_channel_vit.py keeps the channel embedding as nn.Embedding(C, D)
    sd["patch_embed.channel_embed.weight"] = sd.pop("patch_embed.channel_embed").flatten(2)[0].t()
    fresh = vitlab.create_model("channelvit_nano_patch4_28", **TINY).eval()
    fresh.load_state_dict(checkpoint_filter_fn(sd, fresh))
    x = torch.randn(2, C, S, S)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x))


def test_channel_order_does_not_matter():
    # tokens are told apart by their channel embedding, not their position in the sequence
    _, model = _pair()
    x = torch.randn(2, C, S, S)
    order = [3, 0, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, order], channels=order), model(x[:, [0, 2, 3]], channels=[0, 2, 3]))


def test_tokens_per_channel_and_channel_mean_intermediates():
    _, model = _pair()
    x = torch.randn(2, C, S, S)
    with torch.no_grad():
        feats = model.forward_features(x[:, [1, 3]], channels=[1, 3])
        assert feats.shape == (2, 1 + 2 * 16, D)
        final, inter = model.forward_intermediates(x, indices=1, norm=True)
    assert inter[0].shape == (2, D, 4, 4)
    # the map is the mean over channels of each channel's 4x4 token map (channel c: tokens 1 + 16c ... 16(c+1))
    mean = final[:, 1:].unflatten(1, (C, 16)).mean(1)  # (B, 16, D)
    torch.testing.assert_close(inter[0].flatten(2).transpose(1, 2), mean)


def _assert_reduction(maps: list[torch.Tensor], feature_info: list[dict], size: int) -> None:
    assert len(maps) == len(feature_info)
    for info, fmap in zip(feature_info, maps, strict=True):
        assert fmap.shape == (2, info["num_chs"], size // info["reduction"], size // info["reduction"])


@pytest.mark.parametrize("channels", [[2], [3, 1], [0, 1, 2, 3]])
def test_intermediates_match_the_declared_reduction(channels):
    # a dense head built from feature_info gets maps at input / reduction, whatever the channels
    model = vitlab.create_model("channelvit_nano_patch4_28", **TINY).eval()
    for size in (S, S + 2 * P):  # the built size and a larger one (position embedding resampled)
        x = torch.randn(2, len(channels), size, size)
        with torch.no_grad():
            maps = model.forward_intermediates(x, indices=2, channels=channels, intermediates_only=True)
        _assert_reduction(maps, model.feature_info, size)


@pytest.mark.parametrize("in_chans", [1, C])
def test_features_only_match_the_declared_reduction(in_chans):
    features = vitlab.create_model("channelvit_nano_patch4_28", **{**TINY, "in_chans": in_chans}, features_only=True)
    with torch.no_grad():
        maps = features.eval()(torch.randn(2, in_chans, S, S))
    _assert_reduction(maps, features.feature_info.get_dicts(), S)


def test_only_the_channel_embedding_grows_with_channels():
    one, eight = (
        count_params_meta("channelvit_small_patch16_224", in_chans=1),
        count_params_meta("channelvit_small_patch16_224", in_chans=8),
    )
    assert eight - one == 7 * 384
    # against timm's ViT-S/16: one 1-channel projection instead of a 3-channel one, 3 channel embeddings,
    # and no class slot in the position embedding
    vit = count_params_meta("vit_small_patch16_224")
    assert count_params_meta("channelvit_small_patch16_224") == vit - 2 * 256 * 384 + 3 * 384 - 384


@pytest.mark.parametrize(
    ("channels", "n_in", "match"),
    [(None, 3, "in_chans=4"), ([0, 1], 3, "3 channels"), ([0, 4, 1], 3, r"0\.\.3"), ([1, 1, 2], 3, "distinct")],
)
def test_bad_channel_arguments_are_named(channels, n_in, match):
    model = vitlab.create_model("channelvit_nano_patch4_28", **TINY).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, n_in, S, S), channels=channels)


def test_declares_channel_subsets():
    assert vitlab.create_model("channelvit_nano_patch4_28", **TINY).supports_channel_subsets
    assert not getattr(vitlab.create_model("vit_nano_patch4_28", in_chans=4), "supports_channel_subsets", False)
