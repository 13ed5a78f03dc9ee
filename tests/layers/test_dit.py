"""layers.dit: adaLN-Zero blocks start as the identity, compute DiT's modulated residuals, adopt host blocks."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from vitlab.layers import Attention, MetaBlock
from vitlab.layers.dit import (
    AdaLNZeroBlock,
    DiTOutputLayer,
    LabelEmbedder,
    TimestepEmbedder,
    patchify,
    timestep_embedding,
    unpatchify,
)


def _randomize_zero_inits(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


HOSTS = {
    "own": lambda: AdaLNZeroBlock(32, num_heads=4),
    "timm": lambda: AdaLNZeroBlock.adopt(Block(32, num_heads=4), 32),
    "metablock": lambda: AdaLNZeroBlock.adopt(MetaBlock(32, lambda d: Attention(d, num_heads=4)), 32),
}


@pytest.mark.parametrize("host", list(HOSTS))
def test_block_is_the_identity_at_init(host):
    block = HOSTS[host]()
    x, c = torch.randn(3, 10, 32), torch.randn(3, 32)
    assert torch.equal(block(x, c, (3, 3)), x)
    # and stops being the identity once the modulation regresses something
    _randomize_zero_inits(block.ada_ln)
    assert not torch.allclose(block(x, c, (3, 3)), x)


@pytest.mark.parametrize("host", list(HOSTS))
def test_block_matches_dit_formula(host):
    block = HOSTS[host]()
    _randomize_zero_inits(block.ada_ln)
    x, c = torch.randn(2, 7, 32), torch.randn(2, 32)
    shift1, scale1, gate1, shift2, scale2, gate2 = block.ada_ln(c).chunk(6, -1)

    def ln(v):
        return F.layer_norm(v, (32,), eps=1e-6)

    attn = block.token_mixer
    call = (lambda h: attn(h, None)) if block.mixer_uses_grid else attn
    h = x + gate1[:, None] * call(ln(x) * (1 + scale1[:, None]) + shift1[:, None])
    want = h + gate2[:, None] * block.mlp(ln(h) * (1 + scale2[:, None]) + shift2[:, None])
    torch.testing.assert_close(block(x, c), want)


def test_adopt_moves_the_host_parts():
    host = Block(32, num_heads=4)
    block = AdaLNZeroBlock.adopt(host, 32)
    assert block.attn is host.attn
    assert block.mlp is host.mlp
    assert not block.mixer_uses_grid  # timm's attention takes no grid
    meta = MetaBlock(32, lambda d: torch.nn.Identity(), mixer_name="mixer")
    adopted = AdaLNZeroBlock.adopt(meta, 32)
    assert adopted.token_mixer is meta.mixer
    assert adopted.mixer_uses_grid
    with pytest.raises(ValueError, match="needs a host block with 'attn' and 'mlp'"):
        AdaLNZeroBlock.adopt(torch.nn.Linear(32, 32), 32)
    with pytest.raises(ValueError, match="mlp_ratio"):
        AdaLNZeroBlock(32, mlp_ratio=0)


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    freqs = [math.exp(-math.log(10000.0) * k / 4) for k in range(4)]
    for i, ti in enumerate(t.tolist()):
        want = [math.cos(1000 * ti * f) for f in freqs] + [math.sin(1000 * ti * f) for f in freqs]
        torch.testing.assert_close(emb[i], torch.tensor(want), atol=1e-4, rtol=1e-4)
    assert timestep_embedding(t, 9).shape == (3, 9)  # odd widths are zero-padded
    assert torch.equal(timestep_embedding(t, 9)[:, -1], torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        timestep_embedding(t[:, None], 8)
    assert TimestepEmbedder(16)(t).shape == (3, 16)


def test_label_embedder_has_a_null_class():
    emb = LabelEmbedder(10, 16)
    assert emb.null_id == 10
    assert emb(torch.tensor([0, 10])).shape == (2, 16)
    with pytest.raises(IndexError):
        emb(torch.tensor([11]))


def test_patchify_and_unpatchify_match_unfold_and_invert_each_other():
    image = torch.randn(2, 3, 12, 8)
    p = 4
    # reference patchify: unfold gives (B, C*p*p, L) with C outermost; reorder to DiT's (p, p, C) per patch
    patches = F.unfold(image, p, stride=p).transpose(1, 2).reshape(2, -1, 3, p, p).permute(0, 1, 3, 4, 2)
    assert torch.equal(unpatchify(patches.reshape(2, 6, -1), (3, 2), p, 3), image)
    assert torch.equal(patchify(image, p), patches.reshape(2, 6, -1))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(image, 5)


def test_output_layer_is_zero_at_init():
    layer = DiTOutputLayer(32, 4, 2)
    out = layer(torch.randn(2, 5, 32), torch.randn(2, 32))
    assert out.shape == (2, 5, 32)
    assert not out.any()
