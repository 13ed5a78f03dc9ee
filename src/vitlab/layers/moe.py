"""Token-level mixture of experts: a top-k router, an experts container and the load-balancing losses.

Sparsely-gated MoE (Shazeer et al., arXiv:1701.06538): a linear router scores every token, the top-k experts
run on the tokens routed to them and their outputs are summed with the router's weights. Optional noisy
gating adds learned Gaussian noise to the logits while training, which makes the expected *load* (tokens per
expert) differentiable (Shazeer's ``prob_in_top_k``). Balance loss: cv² (squared coefficient of variation) of
the per-expert importance plus cv² of the load. ShiftAddViT (You et al., arXiv:2306.06446, NeurIPS 2023,
https://github.com/GATECH-EIC/ShiftAddViT) weights each expert's importance and load by its latency before the
cv², so minimising it balances *time*, and a faster expert receives proportionally more tokens
(``balance_loss(..., latency=...)``); with equal latencies it is the plain cv² loss. Experts are any modules
mapping ``(T, C_in) -> (T, C_out)`` (shared with the modular MoE ViT, arXiv:2306.17165).

Deviations: importance sums the router's full softmax probabilities (as Switch/GShard do), not the top-k
gates, so the loss reaches the router even with k = 1 (where renormalised top-1 gates are constantly 1).
Noise is added in training only (the released ``NoisyGate`` adds it in eval too). The top-k weights are
renormalised to sum to 1 (``renormalize=False`` keeps the raw probabilities, Switch-style, which lets the task
loss train a top-1 router).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MixtureOfExperts", "RouterOutput", "TopKRouter", "balance_loss", "cv_squared", "select_top_k"]


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean²`` of a 1-D tensor (0 for fewer than two entries)."""
    if x.dim() != 1:
        raise ValueError(f"cv_squared expects a 1-D tensor of per-expert values, got shape {tuple(x.shape)}")
    if x.numel() < 2:
        return x.new_zeros(())
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def balance_loss(
    importance: torch.Tensor, load: torch.Tensor, latency: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """``cv²(latency · importance) + cv²(latency · load)``; ``latency=None`` (or all equal) is the plain cv² loss.

    Minimising the weighted form makes ``latency_e · importance_e`` equal across experts, i.e. each expert's
    share of tokens inversely proportional to its latency (ShiftAddViT's latency-aware balancing).
    """
    if importance.shape != load.shape or importance.dim() != 1:
        raise ValueError(f"importance and load must be equal 1-D tensors, got {importance.shape} and {load.shape}")
    if latency is not None:
        lat = torch.as_tensor(latency, dtype=torch.float32, device=importance.device)
        if lat.shape != importance.shape or not bool((lat > 0).all()):
            raise ValueError(f"latency must hold one positive value per expert ({importance.numel()}), got {latency}")
        lat = lat / lat.mean()  # cv² is scale-free; normalising only keeps magnitudes readable
        importance, load = importance * lat, load * lat
    return cv_squared(importance) + cv_squared(load)


@dataclass
class RouterOutput:
    """Routing of T tokens to E experts with k choices each.

    ``indices``/``weights`` (T, k): chosen experts and their combine weights; ``probs`` (T, E): softmax over
    all experts; ``importance`` (E,): summed ``probs`` (differentiable); ``load`` (E,): tokens per expert,
    smooth (differentiable) with noisy gating in training, else hard counts; ``counts`` (E,): hard counts.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    importance: torch.Tensor
    load: torch.Tensor
    counts: torch.Tensor


class TopKRouter(nn.Module):
    """Linear token router choosing ``k`` of ``num_experts`` experts per token, optionally with noisy gating."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        noisy_gating: bool = False,
        renormalize: bool = True,
        noise_eps: float = 1e-2,
    ) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= k <= num_experts:
            raise ValueError(f"router needs num_experts >= 1 and 1 <= k <= num_experts, got k={k}, E={num_experts}")
        if noisy_gating and k == num_experts:
            raise ValueError(f"noisy gating needs k < num_experts (the load estimate compares to the k+1-th), k={k}")
        self.num_experts, self.k = num_experts, k
        self.renormalize, self.noise_eps = renormalize, noise_eps
        self.gate = nn.Linear(dim, num_experts)
        self.noise = nn.Linear(dim, num_experts, bias=False) if noisy_gating else None
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route ``x`` (T, C)."""
        clean = self.gate(x)  # (T, E)
        std = F.softplus(self.noise(x)) + self.noise_eps if self.noise is not None and self.training else None
        return select_top_k(clean, std, self.k, self.renormalize)


def select_top_k(clean: torch.Tensor, std: torch.Tensor | None, k: int, renormalize: bool = True) -> RouterOutput:
    """Top-``k`` routing from router logits ``clean`` (T, E), plus Gaussian noise of scale ``std`` when given.

    Shared by every router here (plain and task-conditioned); with noise, ``load`` is Shazeer's smooth estimate.
    """
    num_experts = clean.shape[-1]
    logits = clean if std is None else clean + torch.randn_like(clean) * std
    probs = logits.softmax(-1)
    top_logits, indices = logits.topk(min(k + 1, num_experts), dim=-1)
    indices = indices[:, :k]
    # renormalised: softmax over the top-k logits == the top-k probabilities divided by their sum
    weights = top_logits[:, :k].softmax(-1) if renormalize else probs.gather(1, indices)
    counts = F.one_hot(indices, num_experts).sum((0, 1)).to(probs.dtype)
    load = counts if std is None else _smooth_load(clean, logits, std, top_logits, k)
    return RouterOutput(indices, weights, probs, probs.sum(0), load, counts.detach())


def _smooth_load(
    clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, top: torch.Tensor, k: int
) -> torch.Tensor:
    """Expected tokens per expert: P(expert in the top k) under fresh noise, summed over tokens (Shazeer)."""
    # an expert now in the top k stays there if it beats the k+1-th value, one outside must beat the k-th
    thr_in, thr_out = top[:, k : k + 1], top[:, k - 1 : k]
    is_in = noisy > thr_in
    normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
    prob = torch.where(is_in, normal.cdf((clean - thr_in) / std), normal.cdf((clean - thr_out) / std))
    return prob.sum(0)


class MixtureOfExperts(nn.Module):
    """Top-k mixture over ``experts`` (each ``(T, C_in) -> (T, C_out)``); input ``(..., C_in) -> (..., C_out)``.

    After every forward, ``self.stats`` holds the last ``RouterOutput`` (importance, load, counts) so a training
    loop can add ``self.balance_loss()`` and report routing shares.

    Args:
        experts: modules of equal input and output width.
        dim: input width (the router's).
        latency: per-expert cost for the latency-aware balance loss (None: plain cv²).
        router: a router to use instead of a ``TopKRouter`` (e.g. ``layers.task_moe.TaskRouter``); then ``k``,
            ``noisy_gating`` and ``renormalize`` are the router's own.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        dim: int,
        k: int = 1,
        noisy_gating: bool = False,
        renormalize: bool = True,
        latency: Sequence[float] | None = None,
        router: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ValueError("MixtureOfExperts needs at least one expert")
        if latency is not None and (len(latency) != len(experts) or min(latency) <= 0):
            raise ValueError(f"latency must hold one positive value per expert ({len(experts)}), got {latency}")
        self.experts = nn.ModuleList(experts)
        self.router = router or TopKRouter(dim, len(experts), k, noisy_gating=noisy_gating, renormalize=renormalize)
        self.latency = tuple(float(v) for v in latency) if latency is not None else None
        self.stats: RouterOutput | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., C_in); ``task`` (one id per token, shape ``x.shape[:-1]``) for a task-conditioned router."""
        lead, dim = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, dim)
        route = self.router(tokens) if task is None else self.router(tokens, task.reshape(-1))
        self.stats = route
        k = route.indices.shape[1]
        flat_expert = route.indices.reshape(-1)  # (T*k,)
        flat_weight = route.weights.reshape(-1)
        flat_token = torch.arange(tokens.shape[0], device=x.device).repeat_interleave(k)
        out = None
        for e, expert in enumerate(self.experts):
            sel = (flat_expert == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue  # an expert without tokens is not run (its cost is zero)
            idx = flat_token[sel]
            y = expert(tokens[idx]) * flat_weight[sel, None].to(x.dtype)
            out = (y.new_zeros(tokens.shape[0], y.shape[-1]) if out is None else out).index_add(0, idx, y)
        if out is None:  # no tokens at all
            out = self.experts[0](tokens)
        return out.reshape(*lead, out.shape[-1])

    def balance_loss(self, latency: Sequence[float] | str | None = "own") -> torch.Tensor:
        """Balance loss of the last forward; ``latency="own"`` uses this layer's ``latency`` (None: plain cv²)."""
        if self.stats is None:
            raise ValueError("balance_loss needs a forward pass first (router statistics are taken from it)")
        lat = self.latency if latency == "own" else latency
        return balance_loss(self.stats.importance, self.stats.load, lat)  # type: ignore[arg-type]

    def __getstate__(self) -> dict:
        # the stashed statistics hold autograd graphs, which deepcopy / pickle cannot copy (EMA copies the model)
        return {**super().__getstate__(), "stats": None}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.router.k}, latency={self.latency}"
