"""layers.moe: top-k routing shapes and weights, dense-expert equivalence, the cv² and latency-aware losses."""

import pytest
import torch
import torch.nn as nn

from vitlab.layers.moe import MixtureOfExperts, TopKRouter, balance_loss, cv_squared


@pytest.mark.parametrize(("num_experts", "k", "noisy"), [(2, 1, False), (4, 2, True), (3, 3, False), (8, 2, False)])
def test_router_topk_shapes_and_weights_sum_to_one(num_experts, k, noisy):
    router = TopKRouter(16, num_experts, k=k, noisy_gating=noisy).train()
    out = router(torch.randn(50, 16))
    assert out.indices.shape == out.weights.shape == (50, k)
    assert out.probs.shape == (50, num_experts)
    assert (out.indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(50))  # top-k renormalised
    assert out.counts.sum() == 50 * k
    assert out.importance.shape == out.load.shape == (num_experts,)


def test_without_renormalisation_weights_are_the_router_probabilities():
    router = TopKRouter(16, 4, k=2, renormalize=False).eval()
    out = router(torch.randn(20, 16))
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
    assert (out.weights.sum(-1) < 1).all()


def test_topk_picks_the_largest_logits():
    router = TopKRouter(8, 5, k=2).eval()
    x = torch.randn(30, 8)
    expected = router.gate(x).topk(2, dim=-1).indices
    assert torch.equal(router(x).indices, expected)


def test_top1_forced_to_the_dense_expert_equals_the_dense_linear():
    dense, other = nn.Linear(12, 7), nn.Linear(12, 7)
    moe = MixtureOfExperts([dense, other], 12, k=1).eval()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.bias.copy_(torch.tensor([5.0, -5.0]))
    x = torch.randn(3, 10, 12)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-6)
    assert moe.stats.counts.tolist() == [30.0, 0.0]


def test_mixture_combines_each_token_with_its_experts():
    experts = [nn.Linear(6, 4) for _ in range(3)]
    moe = MixtureOfExperts(experts, 6, k=2).eval()
    x = torch.randn(25, 6)
    y = moe(x)
    r = moe.stats
    ref = torch.stack([sum(r.weights[t, j] * experts[r.indices[t, j]](x[t]) for j in range(2)) for t in range(25)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_cv_squared_and_equal_latencies_are_the_plain_loss():
    x = torch.tensor([1.0, 3.0])
    assert cv_squared(x).item() == pytest.approx(x.var(unbiased=False).item() / 4.0)
    assert cv_squared(torch.tensor([2.0])).item() == 0.0
    imp, load = torch.tensor([3.0, 5.0, 1.0]), torch.tensor([4.0, 2.0, 2.0])
    plain = cv_squared(imp) + cv_squared(load)
    torch.testing.assert_close(balance_loss(imp, load, None), plain)
    torch.testing.assert_close(balance_loss(imp, load, [2.0, 2.0, 2.0]), plain)
    # the weighted loss vanishes where latency x share is equal: shares inversely proportional to latency
    assert balance_loss(torch.tensor([2.0, 3.0]), torch.tensor([2.0, 3.0]), [6.0, 4.0]).item() == pytest.approx(0)


def _shift_share(moe: MixtureOfExperts, x: torch.Tensor) -> float:
    moe.eval()
    with torch.no_grad():
        moe(x)
    moe.train()
    return (moe.stats.counts[1] / moe.stats.counts.sum()).item()


@pytest.fixture
def one_thread():
    # 40 tiny steps: thread hand-offs cost more than the maths on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("noisy", [True, False])
def test_latency_aware_loss_moves_tokens_to_the_cheaper_expert(noisy, one_thread):
    x = torch.randn(256, 16)
    moe = MixtureOfExperts([nn.Linear(16, 16), nn.Linear(16, 16)], 16, noisy_gating=noisy, latency=[6.0, 4.0])
    with torch.no_grad():
        moe.router.gate.weight.mul_(0.1)
    before = _shift_share(moe, x)
    opt = torch.optim.SGD(moe.router.parameters(), lr=2.0)
    for _ in range(40):
        moe(x)
        loss = moe.balance_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _shift_share(moe, x)
    assert after > before + 0.03
    assert after > 0.53  # the optimum is 6 / (6 + 4) = 0.6 of the tokens on the shift expert


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k"):
        TopKRouter(8, 2, k=3)
    with pytest.raises(ValueError, match="noisy"):
        TopKRouter(8, 2, k=2, noisy_gating=True)
    with pytest.raises(ValueError, match="latency"):
        MixtureOfExperts([nn.Linear(4, 4)] * 2, 4, latency=[1.0])
    with pytest.raises(ValueError, match="forward"):
        MixtureOfExperts([nn.Linear(4, 4)], 4).balance_loss()
    with pytest.raises(ValueError, match="1-D"):
        cv_squared(torch.ones(2, 2))
