"""Each method's selection/merge rule against a naive token-by-token reference on small tensors."""

import math

import pytest
import torch

from vitlab.reduce import evit
from vitlab.reduce._runtime import Plan, Signals, TokenState, apply_plan
from vitlab.reduce.ats import sample
from vitlab.reduce.mctf import multi_criteria_matching


def _state(size):
    B, t = size.shape
    return TokenState(size, torch.arange(t).expand(B, t))


def _naive_mctf(x, attn, size, r, tau, bidirectional=True):
    """MCTF Sec. 3.2-3.3 in loops: score pairs, merge r//2 A -> B, then the rest B -> unmerged A."""
    out = []
    for xb, ab, sb in zip(x, attn, size, strict=True):
        a, b = list(range(0, len(xb), 2)), list(range(1, len(xb), 2))
        xn = xb / xb.norm(dim=-1, keepdim=True)
        info, small = (1 / ab) / (1 / ab).max(), (1 / sb) / (1 / sb).max()

        def score(i, j, xn=xn, info=info, small=small):
            sim = ((xn[i] @ xn[j] + 1) / 2) ** (1 / tau[0])
            return float(sim * (info[i] * info[j]) ** (1 / tau[1]) * (small[i] * small[j]) ** (1 / tau[2]))

        r1 = r // 2 if bidirectional else r
        r2 = r - r1
        best = {i: max(b, key=lambda j, i=i: score(i, j)) for i in a}
        order = sorted(a, key=lambda i: -score(i, best[i]))
        moved, unm = order[:r1], order[r1:]
        groups = {j: [j] + [i for i in moved if best[i] == j] for j in b}
        if r2:
            back = {j: max(unm, key=lambda i, j=j: score(i, j)) for j in b}
        order2 = sorted(b, key=lambda j: -score(back[j], j)) if r2 else b  # nothing moves: B keeps its order
        moved2, stay = order2[:r2], order2[r2:]
        final = [[i] + [m for j in moved2 if back[j] == i for m in groups[j]] for i in unm] + [groups[j] for j in stay]
        out.append(torch.stack([(xb[g] * sb[g, None]).sum(0) / sb[g].sum() for g in final]))
    return torch.stack(out)


@pytest.mark.parametrize(("t", "r"), [(10, 4), (9, 3), (12, 6), (7, 1)])
@pytest.mark.parametrize(
    ("tau", "bidirectional"),
    [((1.0, 20.0, 40.0), True), ((2.0, 20.0, 40.0), True), ((1.0, 2.0, 3.0), False)],
    ids=["official", "tau_sim2", "one_way"],  # tau_sim = 1 scores pairs with one matmul, others elementwise
)
def test_mctf_matches_naive_reference(t, r, tau, bidirectional):
    x, size = torch.randn(2, t, 6), torch.randint(1, 5, (2, t)).float()
    attn = torch.rand(2, t) + 0.05
    keep, src, dst = multi_criteria_matching(x, attn, size, r, tau, bidirectional)
    merged, _ = apply_plan(Plan(keep, size, src, dst, normalize=True), x, _state(size))
    torch.testing.assert_close(merged, _naive_mctf(x, attn, size, r, tau, bidirectional))


def test_mctf_rejects_non_positive_temperatures():
    with pytest.raises(ValueError, match="tau"):
        multi_criteria_matching(torch.randn(1, 6, 4), torch.rand(1, 6), torch.ones(1, 6), 2, (1.0, 0.0, 40.0))


def test_apply_plan_matches_naive_token_loop():
    """Gather + scatter-add of the fast path == each slot summed token by token, with weights, sizes,
    normalisation, dropped tokens, padding and the source map."""
    torch.manual_seed(0)
    B, N, C, S = 3, 11, 4, 6
    x, size = torch.randn(B, N, C), torch.randint(1, 4, (B, N)).float()
    order = torch.stack([torch.randperm(N) for _ in range(B)])
    keep, src, dropped = order[:, :S], order[:, S : S + 3], order[:, S + 3 :]
    dst = torch.randint(0, S, (B, 3))
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -1] = True  # its seed token counts as dropped
    weight = torch.rand(B, N) + 0.1
    source = torch.arange(N).expand(B, N)
    for normalize in (False, True):
        plan = Plan(keep, weight, src, dst, normalize=normalize, pad=pad)
        out, state = apply_plan(plan, x, TokenState(size, source))
        for b in range(B):
            for s in range(S):
                if pad[b, s]:
                    assert state.size[b, s] == 0
                    assert not (state.source[b] == s).any()
                    continue
                group = [int(keep[b, s])] + [int(i) for i, d in zip(src[b], dst[b], strict=True) if d == s]
                w = weight[b, group]
                want = (x[b, group] * w[:, None]).sum(0) / (w.sum() if normalize else 1)
                torch.testing.assert_close(out[b, s], want)
                assert state.size[b, s] == size[b, group].sum()
                assert sorted(state.source[b].eq(s).nonzero().flatten().tolist()) == sorted(group)
            assert (state.source[b, dropped[b]] == -1).all()


def test_attention_received_matches_explicit_softmax():
    from vitlab.reduce._attention_sums import _attention_received

    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    bias = torch.randn(2, 1, 1, 7)
    logits = (q @ k.transpose(-2, -1)) * 0.5
    torch.testing.assert_close(_attention_received(q, k, bias, 0.5), (logits + bias).softmax(-1).mean(dim=(1, 2)))
    torch.testing.assert_close(_attention_received(q, k, None, 0.5), logits.softmax(-1).mean(dim=(1, 2)))


def test_evit_keeps_top_attended_and_fuses_the_rest():
    B, H, N, p = 2, 3, 9, 1
    x, cls_attn = torch.randn(B, N, 4), torch.rand(B, H, N).softmax(-1)
    plan = evit.plan(Signals(x=x, cls_attn=cls_attn), _state(torch.ones(B, N)), 0.5, p)
    out, state = apply_plan(plan, x, _state(torch.ones(B, N)))
    k = math.ceil(0.5 * (N - p))
    a = cls_attn.mean(1)[:, p:]
    for bi in range(B):
        top = a[bi].argsort(descending=True)[:k]
        rest = [i for i in range(N - p) if i not in top.tolist()]
        torch.testing.assert_close(out[bi, p : p + k], x[bi, p + top])
        torch.testing.assert_close(out[bi, -1], (x[bi, p + torch.tensor(rest)] * a[bi, rest, None]).sum(0))
    assert out.shape[1] == p + k + 1
    assert torch.equal(state.size[:, -1], torch.full((B,), float(N - p - k)))


def test_ats_sampling_matches_naive_inverse_transform():
    torch.manual_seed(1)
    scores = torch.rand(3, 20) ** 4
    scores[0, :4] = 0.0  # padding tokens: tied CDF values
    scores = scores / scores.sum(1, keepdim=True)
    for k in (4, 8, 20):
        got = sample(scores, k)
        for b in range(3):
            order = scores[b].argsort()
            cdf = scores[b, order].cumsum(0)
            cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
            start = cdf[cdf > 0].min()
            picked = {int(order[(start + (1 - start) * i / (k - 1) - cdf).abs().argmin()]) for i in range(k)}
            assert set(got[b].nonzero().flatten().tolist()) == picked
        assert (got.sum(1) <= k).all()


def test_schedules_follow_the_papers():
    from vitlab.reduce import ats, mctf, tome

    assert tome.schedule(4, r=3) == [3, 3, 3, 3]
    assert tome.schedule(3, r=[5, 2]) == [5, 2, 0]
    assert tome.schedule(12) == [13] * 12  # default: the official README's off-the-shelf r for ViT-S/B/16
    assert tome.schedule(24) == [7] * 24  # the same 156 merges over ViT-L/16's depth, as the README's r = 7
    assert tome.schedule(12, r=0) == [0] * 12
    dec = tome.schedule(12, r=8, inflect=-1)  # ToMe's decreasing schedule: 2r down to 0, same total
    assert dec[0] == 16
    assert dec[-1] == 0
    assert evit.schedule(12, keep=0.7) == [0.7 if i in (3, 6, 9) else 0.0 for i in range(12)]
    assert ats.schedule(12) == [0.0] * 3 + [1.0] * 9  # official: blocks 4..12, budget = all tokens
    assert mctf.schedule(12) == [0] + [16] * 11  # official evaluation: r = 16 at blocks 2..12
    with pytest.raises(ValueError, match="keep"):
        evit.schedule(12, keep=0.0)
    with pytest.raises(ValueError, match="layers"):
        ats.schedule(4, layers=[7])


def test_ats_export_search_matches_binary_search(monkeypatch):
    """Under torch.export ATS finds CDF neighbours by counting (ONNX has no searchsorted): same picks."""
    torch.manual_seed(2)
    scores = torch.rand(4, 30) ** 3
    scores[0, :5] = 0.0  # padding: a run of equal CDF values
    scores = scores / scores.sum(1, keepdim=True)
    eager = [sample(scores, k) for k in (3, 8, 30)]
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    for k, want in zip((3, 8, 30), eager, strict=True):
        assert torch.equal(sample(scores, k), want)


def test_tome_default_scales_with_the_host_token_count():
    from vitlab.reduce import tome

    assert tome.schedule(12, num_tokens=196) == [13] * 12  # ToMe's README setting for ViT-S/B/16
    assert tome.schedule(24, num_tokens=196) == [7] * 24  # ... and ViT-L/16
    small = tome.schedule(6, num_tokens=49)  # a 28 px host keeps a fifth of its patches, not one
    assert 49 - sum(small) == 7
    assert tome.schedule(6, num_tokens=4) == [1] * 6  # never zero by default
