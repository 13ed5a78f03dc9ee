"""Token-reduction plug-ins (STYLE.md B.6): methods x hosts, exactness, bookkeeping, host checks."""

import math

import pytest
import timm
import torch
import torch.nn as nn

import vitlab
from vitlab import reduce
from vitlab.reduce import METHODS
from vitlab.reduce._runtime import Method, Plan, ReducingBlock, TokenState, apply_plan, prefix_plan
from vitlab.reduce.tome import bipartite_soft_matching

_VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 64, "num_classes": 5}
HOSTS = {
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", **_VIT),
    "vit_tiny_reg": lambda: timm.create_model("vit_tiny_patch16_224", reg_tokens=2, **_VIT),
    "deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", **_VIT),
    "vit_nano_patch4_28": lambda: vitlab.create_model("vit_nano_patch4_28", embed_dim=32, depth=4, num_heads=2),
    # vitlab's own isotropic family (layers.IsotropicBackbone, MetaBlock + layers.Attention), per-channel tokens
    "channelvit_nano": lambda: vitlab.create_model("channelvit_nano_patch4_28", embed_dim=32, depth=4, num_heads=2),
}
NOOP = {"tome": {"r": 0}, "evit": {"keep": 1.0}, "ats": {"layers": []}, "mctf": {"r": 0}}
ACTIVE = {
    "tome": {"r": 3},
    "evit": {"keep": 0.5, "layers": [1, 2]},
    "ats": {"keep": 0.5, "layers": [1, 2, 3]},
    "mctf": {"r": 4},
}


def _host(name):
    model = HOSTS[name]().eval()
    chans = model.pretrained_cfg["input_size"][0]
    size = getattr(model.patch_embed, "img_size", None) or model.pretrained_cfg["input_size"][1:]
    return model, torch.randn(3, chans, *size)


@pytest.fixture(params=sorted(HOSTS))
def host(request):
    return _host(request.param)


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def test_list_methods():
    assert reduce.list_methods() == ["ats", "evit", "mctf", "tome"]


def test_noop_schedule_is_bit_exact(host, method):
    model, x = host
    ref = model(x)
    host_blocks = list(model.blocks)
    reduce.apply(model, method, **NOOP[method])
    assert all(a is b for a, b in zip(model.blocks, host_blocks, strict=True)), "nothing may be wrapped"
    assert torch.equal(model(x), ref)


def test_state_dict_keys_unchanged(host, method):
    model, _ = host
    before = model.state_dict()
    reduce.apply(model, method, **ACTIVE[method])
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before), "parameters must be shared, not copied"


def test_remove_restores_outputs(host, method):
    model, x = host
    ref, host_blocks = model(x), model.blocks
    assert reduce.apply(model, method, **ACTIVE[method]) is model
    assert reduce.is_reduced(model)
    assert not torch.equal(model(x), ref)
    reduce.remove(model)
    assert model.blocks is host_blocks
    assert not reduce.is_reduced(model)
    assert torch.equal(model(x), ref)


def _expected_tokens(method, amount, n, p):
    """Token count after a block, re-derived from each paper's rule (ATS: its upper bound)."""
    t = n - p
    if not amount:
        return n
    if method == "tome":
        return n - min(amount, t // 2)
    if method == "mctf":
        return n - max(0, min(amount, t // 2, n - 10))
    k = math.ceil(amount * t)
    if method == "evit":
        return n if k >= t else p + k + 1
    return p + min(t, max(k, 8))  # ats: at most the budget


def _num_patches(model, x):
    """Patch tokens of the unreduced model (ChannelViT has one grid per input channel)."""
    with torch.no_grad():
        return model.forward_features(x).shape[1] - model.num_prefix_tokens


def test_token_counts_follow_schedule(host, method):
    model, x = host
    patches = _num_patches(model, x)
    reduce.apply(model, method, **ACTIVE[method])
    counts = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: counts.append((o[0] if isinstance(o, tuple) else o).shape[1]))
        for b in model.blocks
    ]
    n = patches + model.num_prefix_tokens
    model(x)
    for h in hooks:
        h.remove()
    p = model.num_prefix_tokens
    for amount, got in zip(reduce.schedule_of(model), counts, strict=True):
        want = _expected_tokens(method, amount, n, p)
        assert (got <= want) if method == "ats" else (got == want), (reduce.schedule_of(model), counts)
        n = got
    assert counts[-1] < patches + p


def test_tome_default_reduces_and_r0_stays_exact(host):
    model, x = host
    ref = model(x)
    n = _num_patches(model, x) + model.num_prefix_tokens
    reduce.apply(model, "tome")  # no r: ToMe's default must merge (it once merged nothing)
    assert all(reduce.schedule_of(model))
    feats, _ = reduce.forward_with_state(model, x)
    assert feats.shape[1] < n
    reduce.apply(model, "tome", r=0)
    assert torch.equal(model(x), ref)


def test_source_map_partitions_patches(host, method):
    model, x = host
    patches = _num_patches(model, x)
    reduce.apply(model, method, **ACTIVE[method])
    feats, state = reduce.forward_with_state(model, x)
    assert torch.allclose(model.forward_head(feats), model(x))
    p, (B, N) = model.num_prefix_tokens, state.size.shape
    assert state.source.shape == (B, patches)
    if method != "ats":  # ATS drops tokens: their patches leave the map
        assert (state.source >= 0).all()
    assert ((state.source == -1) | (state.source >= p)).all()
    assert (state.source < N).all()
    # every patch sits in exactly one token, and a token's size counts its patches
    held = torch.zeros(B, N).scatter_add(1, state.source.clamp_min(0), (state.source >= 0).float())
    assert torch.equal(held[:, p:], state.size[:, p:])
    assert (state.size[:, :p] == 1).all()


def test_batch_matches_single_images(host, method):
    """Variable token counts (ATS) and padding must not leak between the images of a batch."""
    model, x = host
    reduce.apply(model, method, **ACTIVE[method])
    batch = model(x)
    single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4)


def test_adopted_block_without_reduction_matches_host(host, method):
    model, x = host
    block = model.blocks[1]
    if hasattr(model, "_pos_embed"):  # timm
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    else:  # layers.IsotropicBackbone
        tokens, _ = model._embed(x)
    adopted = ReducingBlock.adopt(block, METHODS[method], 0, model.num_prefix_tokens)
    out, state = adopted(tokens, TokenState.initial(tokens, model.num_prefix_tokens))
    torch.testing.assert_close(out, block(tokens), atol=1e-5, rtol=1e-5)
    assert torch.equal(state.size, torch.ones_like(state.size))


def test_training_backward(method):
    model, x = _host("vit_tiny")
    reduce.apply(model.train(), method, **ACTIVE[method])
    model(x).sum().backward()
    assert model.blocks[3].attn.qkv.weight.grad is not None


def test_methods_run_on_deit_small():
    model = timm.create_model("deit_small_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    for method, kw in {"tome": {"r": 13}, "evit": {"keep": 0.7}, "ats": {}, "mctf": {"r": 16}}.items():
        reduce.apply(model, method, **kw)
        feats, state = reduce.forward_with_state(model, x)
        assert feats.shape[1] < 197, method
        assert state.size.sum() <= 197
        assert torch.isfinite(model.forward_head(feats)).all()
    reduce.remove(model)


def test_unknown_method_and_keyword():
    model, _ = _host("vit_tiny")
    with pytest.raises(ValueError, match="tome"):
        reduce.apply(model, "tomee")
    with pytest.raises(TypeError, match="keep"):
        reduce.apply(model, "tome", keep=0.5)


def test_bad_hosts_name_what_is_missing():
    with pytest.raises(ValueError, match=r"'blocks'.*VisionTransformer"):
        reduce.apply(nn.Linear(2, 2), "tome")
    model, _ = _host("vit_tiny")
    del model.blocks[2].attn.qkv
    with pytest.raises(ValueError, match=r"blocks\[2\]\.attn has no attribute 'qkv'"):
        reduce.apply(model, "tome")
    nocls = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **_VIT)
    with pytest.raises(ValueError, match="cls_token"):
        reduce.apply(nocls, "evit")
    avg = timm.create_model("vit_tiny_patch16_224", global_pool="avg", **_VIT)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        reduce.apply(avg, "ats", keep=0.5)
    assert reduce.is_reduced(reduce.apply(avg, "tome", r=2))  # merging leaves no padding: any pooling works
    with pytest.raises(ValueError, match="not isotropic"):
        reduce.apply(vitlab.create_model("tiny_vit_1m_28"), "tome")
    post = timm.create_model("vit_tiny_patch16_224", block_fn=timm.models.vision_transformer.ResPostBlock, **_VIT)
    with pytest.raises(ValueError, match="pre-norm"):
        reduce.apply(post, "tome")


def _naive_tome(x, metric, size, r):
    """ToMe Sec. 3 written out token by token: A = even, B = odd, merge the r best A edges."""
    out = []
    for xb, mb, sb in zip(x, metric, size, strict=True):
        m = mb / mb.norm(dim=-1, keepdim=True)
        a, b = list(range(0, len(m), 2)), list(range(1, len(m), 2))
        best = {i: max(b, key=lambda j, i=i: float(m[i] @ m[j])) for i in a}
        order = sorted(a, key=lambda i: -float(m[i] @ m[best[i]]))
        merged, kept = order[:r], order[r:]
        rows = [xb[i] for i in kept]
        for j in b:
            group = [j] + [i for i in merged if best[i] == j]
            w = sb[group]
            rows.append((xb[group] * w[:, None]).sum(0) / w.sum())
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize(("t", "r"), [(9, 3), (8, 4), (7, 0), (10, 1)])
def test_tome_merge_matches_naive_reference(t, r):
    x, metric, size = torch.randn(2, t, 5), torch.randn(2, t, 4), torch.randint(1, 4, (2, t)).float()
    keep, src, dst = bipartite_soft_matching(metric, r)
    state = TokenState(size, torch.arange(t).expand(2, t))
    merged, new = apply_plan(Plan(keep, size, src, dst, normalize=True), x, state)
    torch.testing.assert_close(merged, _naive_tome(x, metric, size, r))
    assert torch.equal(new.size.sum(1), size.sum(1))


def test_plain_forward_does_not_track_sources(monkeypatch):
    """The source map costs a scatter and a gather per reduction: only ``forward_with_state`` asks for it."""
    model, x = _host("vit_tiny")
    reduce.apply(model, "tome", r=3)
    seen = []
    forward = ReducingBlock.forward
    monkeypatch.setattr(
        ReducingBlock, "forward", lambda blk, x, state: seen.append(state.source) or forward(blk, x, state)
    )
    logits = model(x)
    assert seen
    assert all(s is None for s in seen)
    feats, state = reduce.forward_with_state(model, x)
    assert state.source is not None
    torch.testing.assert_close(model.forward_head(feats), logits)


def _tokens(model, x):
    if hasattr(model, "_pos_embed"):  # timm
        return model.norm_pre(model._pos_embed(model.patch_embed(x)))
    return model._embed(x)[0]  # layers.IsotropicBackbone


def _halve_and_drop_two(signals, state, amount, num_prefix):
    """A one-step-ahead plan that rescales the tokens it keeps (so their projections cannot be reused)."""
    B, N, _ = signals.x.shape
    keep = torch.arange(N - num_prefix - 2).expand(B, -1)
    return prefix_plan(keep, num_prefix, weight=torch.full_like(state.size, 0.5))


AHEAD = {
    "mctf": METHODS["mctf"],
    "rescaling": Method("rescale", METHODS["mctf"].schedule, _halve_and_drop_two, frozenset(), before_attn=True),
}


@pytest.mark.parametrize("ahead", sorted(AHEAD))
def test_reduce_ahead_equals_reducing_then_attending(host, ahead):
    """A one-step-ahead block reuses the q, k, v of tokens that only moved and projects only fused slots
    again (MCTF), or everything again when the plan rescales kept tokens: either way the same as reducing
    first and running a plain block (with the method's attention bias) on the new tokens."""
    from vitlab.reduce._runtime import Signals, _attn_bias

    model, x = host
    method, p = AHEAD[ahead], model.num_prefix_tokens
    with torch.no_grad():
        tokens = _tokens(model, x)
        state = TokenState.initial(tokens, p, track_source=True)
        block = ReducingBlock.adopt(model.blocks[1], method, 6, p)
        out, new = block(tokens, state)
        q, k, v = block._split(block.attn.qkv(block.norm1(tokens)))
        signals = block._signals(q, k, v, _attn_bias(state, method, q.dtype), method.needs)
        plan = method.plan(Signals(x=tokens, **signals), state, 6, p)
        reduced, reduced_state = apply_plan(plan, tokens, state)
        ref, _ = ReducingBlock.adopt(model.blocks[1], method, 0, p)(reduced, reduced_state)  # no reduction
    assert out.shape[1] < tokens.shape[1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(new.size, reduced_state.size)
    assert torch.equal(new.source, reduced_state.source)


def test_attention_received_in_chunks(monkeypatch):
    """A few images at a time (to stay in cache) gives the same column means as the whole batch at once."""
    from vitlab.reduce import _attention_sums

    q, k, bias = torch.randn(5, 2, 6, 4), torch.randn(5, 2, 6, 4), torch.randn(5, 1, 1, 6)
    whole = _attention_sums._attention_received(q, k, bias, 0.5)
    monkeypatch.setattr(_attention_sums, "_SCORE_CHUNK", 2 * 2 * 6 * 6)  # two images per chunk: 3 chunks
    torch.testing.assert_close(_attention_sums._attention_received(q, k, bias, 0.5), whole)
