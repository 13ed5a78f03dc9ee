"""layers.task_moe: the mutual information against its entropy form, task routing by each task's own gate, the
usage and count bookkeeping, MoE attention's two compute forms against each other and a reference head, and the
expert selection used by extraction."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.layers.task_moe import MoEAttention, TaskMoEMlp, TaskRouter, mutual_information


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum()


def test_mutual_information_equals_entropy_difference():
    cond = torch.softmax(torch.randn(3, 5), -1)
    prior = torch.tensor([0.2, 0.3, 0.5])
    h_e = _entropy((prior[:, None] * cond).sum(0))
    h_e_given_t = sum(prior[t] * _entropy(cond[t]) for t in range(3))
    assert torch.allclose(mutual_information(cond, prior), h_e - h_e_given_t, atol=1e-5)


def test_mutual_information_extremes():
    same = torch.softmax(torch.randn(1, 4), -1).expand(3, 4)
    assert abs(float(mutual_information(same))) < 1e-6  # tasks share one expert distribution
    assert math.isclose(float(mutual_information(torch.eye(3))), math.log(3), rel_tol=1e-5)  # disjoint experts
    with pytest.raises(ValueError, match="prior"):
        mutual_information(torch.eye(3), torch.ones(2) / 2)


def test_router_uses_each_tokens_task_gate():
    router = TaskRouter(8, 4, num_tasks=3, k=2)
    x, task = torch.randn(12, 8), torch.tensor([0, 1, 2] * 4)
    route = router(x, task)
    for i in range(12):
        logits = router.gates[int(task[i])](x[i])
        assert set(route.indices[i].tolist()) == set(logits.topk(2).indices.tolist())
        assert torch.allclose(route.probs[i], logits.softmax(-1), atol=1e-6)


def test_router_counts_usage_and_rows():
    router = TaskRouter(8, 4, num_tasks=3, k=1).train()
    x = torch.randn(10, 8)
    route = router(x, torch.zeros(10, dtype=torch.long))
    # counts: one top-1 pick per token, all for task 0
    assert router.counts[0].sum() == 10
    assert router.counts[1:].sum() == 0
    assert torch.equal(router.counts[0], route.counts)
    # the first batch of a task sets its usage row; absent tasks keep the uniform start and are not "seen"
    assert torch.allclose(router.usage[0], route.probs.mean(0).detach())
    assert router.seen.tolist() == [True, False, False]
    assert torch.allclose(router.usage[1], torch.full((4,), 0.25))
    # mutual information over the seen tasks only: one task -> 0
    assert abs(router.mutual_information().item()) < 1e-6
    router(x, torch.ones(10, dtype=torch.long))
    mi = router.mutual_information()
    mi.backward()
    assert router.gates[1].weight.grad is not None  # the current task's row carries the gradient
    old = router.gates[0].weight.grad
    assert old is None or not old.any()  # the moving average of task 0 does not
    router.reset_counts()
    assert router.counts.sum() == 0


def test_router_rejects_bad_task_ids():
    router = TaskRouter(8, 4, num_tasks=2, k=1)
    with pytest.raises(ValueError, match=r"task ids must be in 0\.\.1"):
        router(torch.randn(3, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one per token"):
        router(torch.randn(3, 8), torch.tensor([0, 1]))


def _attention(E: int = 5, k: int = 2) -> MoEAttention:
    attn = MoEAttention(16, E, k, num_tasks=2, head_dim=8, noisy_gating=k < E).eval()
    attn.routing_task = torch.tensor([0, 1, 1])
    return attn


def test_moe_attention_dense_equals_sparse_with_gradients():
    attn = _attention()
    x = torch.randn(3, 7, 16, requires_grad=True)
    dense = attn(x)
    grads = torch.autograd.grad(dense.square().sum(), [x, *attn.parameters()], allow_unused=True)
    attn.compute = "sparse"
    sparse = attn(x)
    grads_sparse = torch.autograd.grad(sparse.square().sum(), [x, *attn.parameters()], allow_unused=True)
    assert torch.allclose(dense, sparse, atol=1e-5)
    for a, b in zip(grads, grads_sparse, strict=True):
        assert (a is None and b is None) or torch.allclose(
            a if a is not None else torch.zeros_like(b), b if b is not None else torch.zeros_like(a), atol=1e-4
        )


def test_moe_attention_one_expert_is_one_head_attention():
    attn = _attention(E=1, k=1)
    x = torch.randn(3, 7, 16)
    key, value = attn.kv(x).split(8, dim=-1)
    q = attn.q[0](x)
    ref = F.softmax(q @ key.transpose(1, 2) / math.sqrt(8), -1) @ value
    assert torch.allclose(attn(x), attn.o[0](ref) + attn.proj_bias, atol=1e-5)


def test_moe_attention_keeps_images_apart_and_refuses_masks():
    attn = _attention()
    x = torch.randn(3, 7, 16)
    y = x.clone()
    y[2] += 1.0
    assert torch.allclose(attn(x)[:2], attn(y)[:2], atol=1e-6)
    with pytest.raises(ValueError, match="masks"):
        attn(x, attn_mask=torch.ones(7, 7, dtype=torch.bool))
    attn.routing_task = None
    with pytest.raises(ValueError, match="routing_task"):
        attn(x)


def test_moe_mlp_is_the_weighted_sum_of_chosen_experts():
    mlp = TaskMoEMlp(16, 8, num_experts=4, k=2, num_tasks=2).eval()
    mlp.routing_task = torch.tensor([1, 0])
    x = torch.randn(2, 5, 16)
    y = mlp(x)
    route = mlp.router.stats
    tokens = x.reshape(-1, 16)
    ref = torch.stack([
        sum(w * mlp.moe.experts[int(e)](tokens[i]) for e, w in zip(route.indices[i], route.weights[i], strict=True))
        for i in range(10)
    ])  # fmt: skip
    assert torch.allclose(y.reshape(-1, 16), ref, atol=1e-5)


@pytest.mark.parametrize("module", ["attention", "mlp"])
def test_select_all_experts_keeps_a_tasks_output(module):
    layer = _attention(E=4, k=2) if module == "attention" else TaskMoEMlp(16, 8, 4, 2, num_tasks=2).eval()
    layer.routing_task = torch.tensor([1, 1, 1])
    x = torch.randn(3, 7, 16)
    full = layer(x)
    kept = layer.select([0, 1, 2, 3], task=1).eval()
    kept.routing_task = torch.tensor([0, 0, 0])  # the one task of the selection
    assert kept.router.num_tasks == 1
    assert torch.allclose(kept(x), full, atol=1e-5)
    fewer = layer.select([0, 2], task=1)
    assert fewer.router.num_experts == 2
    assert fewer.router.k == 2
