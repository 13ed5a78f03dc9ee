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


def _naive_mctf(x, attn, size, r, tau):
    """MCTF Sec. 3.2-3.3 in loops: score pairs, merge r//2 A -> B, then the rest B -> unmerged A."""
    out = []
    for xb, ab, sb in zip(x, attn, size, strict=True):
        a, b = list(range(0, len(xb), 2)), list(range(1, len(xb), 2))
        xn = xb / xb.norm(dim=-1, keepdim=True)
        info, small = (1 / ab) / (1 / ab).max(), (1 / sb) / (1 / sb).max()

        def score(i, j, xn=xn, info=info, small=small):
            sim = ((xn[i] @ xn[j] + 1) / 2) ** (1 / tau[0])
            return float(sim * (info[i] * info[j]) ** (1 / tau[1]) * (small[i] * small[j]) ** (1 / tau[2]))

        r1, r2 = r // 2, r - r // 2
        best = {i: max(b, key=lambda j, i=i: score(i, j)) for i in a}
        order = sorted(a, key=lambda i: -score(i, best[i]))
        moved, unm = order[:r1], order[r1:]
        groups = {j: [j] + [i for i in moved if best[i] == j] for j in b}
        back = {j: max(unm, key=lambda i, j=j: score(i, j)) for j in b}
        order2 = sorted(b, key=lambda j: -score(back[j], j))
        moved2, stay = order2[:r2], order2[r2:]
        final = [[i] + [m for j in moved2 if back[j] == i for m in groups[j]] for i in unm] + [groups[j] for j in stay]
        out.append(torch.stack([(xb[g] * sb[g, None]).sum(0) / sb[g].sum() for g in final]))
    return torch.stack(out)


@pytest.mark.parametrize(("t", "r"), [(10, 4), (9, 3), (12, 6), (7, 1)])
def test_mctf_matches_naive_reference(t, r):
    tau = (1.0, 20.0, 40.0)
    x, size = torch.randn(2, t, 6), torch.randint(1, 5, (2, t)).float()
    attn = torch.rand(2, t) + 0.05
    dest, num_out = multi_criteria_matching(x, attn, size, r, tau)
    merged, _ = apply_plan(Plan(dest, size, num_out, normalize=True), x, _state(size))
    torch.testing.assert_close(merged, _naive_mctf(x, attn, size, r, tau))


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
