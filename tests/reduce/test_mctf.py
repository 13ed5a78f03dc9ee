"""MCTF's approximate one-step-ahead (``one_step_ahead="approx"``) against explicit fused attention maps."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab import reduce
from vitlab.reduce import mctf, tome
from vitlab.reduce._runtime import ReducingBlock, Signals, TokenState, apply_plan

_VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 64, "num_classes": 5}
HOSTS = {
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", **_VIT),
    "deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", **_VIT),
    "vit_nano_patch4_28": lambda: vitlab.create_model("vit_nano_patch4_28", embed_dim=32, depth=4, num_heads=2),
}
APPROX = {"one_step_ahead": "approx"}


def _assignment(plan, N):
    """(B, S, N) 0/1 matrix: token j ends in slot s, from the plan's index lists one entry at a time."""
    B, S = plan.keep.shape
    M = torch.zeros(B, S, N)
    for b in range(B):
        for s, j in enumerate(plan.keep[b].tolist()):
            M[b, s, j] = 1.0
        for j, s in zip(plan.merge_src[b].tolist(), plan.merge_dst[b].tolist(), strict=True):
            M[b, s, j] = 1.0
    return M


def _naive_approx_block(block, x, size, r, p):
    """The block as the official ``one_step_ahead=1`` forms it (its ``merge_wavg`` with size weights): the explicit
    softmax map A (B, H, N, N) of the input scores the tokens; the keys' columns of a slot are summed, the queries'
    rows averaged with size weights; that map times the values of the fused tokens is the attention."""
    attn = block.attn
    B, N, C = x.shape
    H = attn.num_heads
    q, k, _ = attn.qkv(block.norm1(x)).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    A = ((q @ k.transpose(-1, -2)) * attn.scale + size.log()[:, None, None, :]).softmax(-1)
    state = TokenState(size)
    plan = mctf.plan(Signals(x=x, attn_received=A.mean((1, 2))), state, r, p)
    x_new, new_state = apply_plan(plan, x, state)
    S = x_new.shape[1]
    M = _assignment(plan, N)
    rows = M * size[:, None, :]
    fused = (rows / rows.sum(-1, keepdim=True))[:, None] @ A @ M.transpose(1, 2)[:, None]  # (B, H, S, S)
    v = attn.qkv(block.norm1(x_new)).reshape(B, S, 3, H, -1)[:, :, 2].transpose(1, 2)
    out = x_new + block.ls1(attn.proj((fused @ v).transpose(1, 2).reshape(B, S, C)))
    return out + block.ls2(block.mlp(block.norm2(out))), new_state, fused


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("chunk", [1, 1 << 15], ids=["image_by_image", "batch_at_once"])
def test_approx_block_matches_explicit_fused_map(host, chunk, monkeypatch):
    from vitlab.reduce import _attention_sums

    monkeypatch.setattr(_attention_sums, "_SCORE_CHUNK", chunk)  # one image per chunk (q, k read in place) or all
    torch.manual_seed(0)
    model = HOSTS[host]().eval()
    p, C = model.num_prefix_tokens, model.embed_dim
    x = torch.randn(3, p + 16, C)
    size = torch.cat([torch.ones(3, p), torch.randint(1, 5, (3, 16)).float()], 1)  # proportional attention at work
    block = model.blocks[1]
    with torch.no_grad():
        ref, ref_state, fused = _naive_approx_block(block, x, size, 6, p)
        out, state = ReducingBlock.adopt(block, mctf.METHOD, 6, p, APPROX)(x, TokenState(size))
    torch.testing.assert_close(fused.sum(-1), torch.ones_like(fused[..., 0]))  # fusing keeps rows stochastic
    assert out.shape[1] == p + 16 - 6
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(state.size, ref_state.size)


def test_approx_block_without_reduction_is_plain_attention():
    """r = 0 schedules leave the host blocks alone; a block whose r is clipped to 0 attends over all tokens."""
    model = HOSTS["vit_tiny"]().eval()
    x = torch.randn(2, 10, 32)  # at least 10 tokens stay (official): r = 4 is clipped to 0
    block = model.blocks[2]
    with torch.no_grad():
        out, state = ReducingBlock.adopt(block, mctf.METHOD, 4, 1, APPROX)(x, TokenState.initial(x, 1))
        torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(state.size, torch.ones(2, 10))
    images = torch.randn(2, 3, 64, 64)
    ref = model(images)
    reduce.apply(model, "mctf", r=0, one_step_ahead="approx")
    assert torch.equal(model(images), ref)


def test_approx_model_counts_batches_and_flops():
    model = HOSTS["deit_tiny_distilled"]().eval()
    x = torch.randn(3, 3, 64, 64)
    flops = {}
    for ahead in ("precise", "approx"):
        reduce.apply(model, "mctf", r=4, one_step_ahead=ahead)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            batch = model(x)
        flops[ahead] = counter.get_total_flops()
        torch.testing.assert_close(batch, torch.cat([model(x[i : i + 1]) for i in range(3)]), atol=1e-4, rtol=1e-4)
        feats, state = reduce.forward_with_state(model, x)
        assert feats.shape[1] == 10  # 16 patches + 2 prefix: 18 -> 14 -> 10, where the official floor stops
        assert torch.equal(state.size.sum(1), torch.full((3,), 18.0))
    # the fused map replaces the second attention: no q k^T over the fused tokens, v only for them
    assert flops["approx"] < flops["precise"]


def test_approx_trains():
    model = HOSTS["vit_tiny"]().train()
    reduce.apply(model, "mctf", r=4, one_step_ahead="approx")
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    grad = model.blocks[2].attn.qkv.weight.grad
    assert grad is not None
    assert grad[:32].abs().sum() > 0  # through the fused map (q)
    assert grad[64:].abs().sum() > 0  # and the new tokens' values


def test_one_step_ahead_errors():
    model = HOSTS["vit_tiny"]()
    with pytest.raises(ValueError, match="one_step_ahead must be one of"):
        reduce.apply(model, "mctf", r=4, one_step_ahead="aprox")
    with pytest.raises(ValueError, match=r"one_step_ahead='approx'.*tome"):
        ReducingBlock(tome.METHOD, 4, 1, APPROX)


@pytest.mark.export
def test_approx_torch_export():
    model = reduce.apply(HOSTS["vit_tiny"]().eval(), "mctf", r=4, one_step_ahead="approx")
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)
