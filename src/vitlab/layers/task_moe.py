"""Task-conditioned mixtures of experts: per-task routers, attention with per-head experts, and the task-expert
mutual-information loss.

An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous Training (Chen et al.,
arXiv:2306.17165) builds on Mod-Squad (Chen et al., CVPR 2023, https://github.com/UMass-Foundation-Model/Mod-Squad,
read only; the paper has no code of its own):

- ``TaskRouter``: one linear gate (and noise gate) per task; a token is routed by its task's gate.
- ``MoEAttention``: ``num_experts`` query/output projection pairs of one head each, chosen top-k per token; keys and
  values are one shared head (multi-query style), so k active experts cost about k dense heads.
- ``mutual_information``: I(T; E) of the joint ``P(t) p(e|t)``, with ``p(e|t)`` the mean routing probability of
  task t's tokens. Maximising it makes each task use few experts (low H(E|T)) while all experts stay used (high
  H(E)).

Reconstructed (the paper's body is not reachable): Mod-Squad trains on images labelled for every task, so one
batch holds every task's routing. Heterogeneous training sees one data set per batch, where the batch's own I(T;E)
is always 0. The router therefore keeps an exponential moving average of ``p(e|t)`` per task (``usage``); the
loss uses the current batch's rows (with gradient) for the tasks it holds and the averages (without gradient) for
the others, weighting the tasks seen so far equally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe import MixtureOfExperts, RouterOutput, select_top_k

__all__ = ["MoEAttention", "TaskMoEMlp", "TaskRouter", "mutual_information", "task_routed_modules"]


def mutual_information(cond: torch.Tensor, prior: torch.Tensor | None = None, eps: float = 1e-9) -> torch.Tensor:
    """I(T; E) in nats of the joint ``prior[t] * cond[t, e]``; ``cond`` (T, E) rows are distributions over experts.

    ``prior`` (T,) defaults to uniform. Identical rows give 0; rows on disjoint experts give H(T).
    """
    if cond.dim() != 2:
        raise ValueError(f"cond must be (tasks, experts), got shape {tuple(cond.shape)}")
    if prior is None:
        prior = cond.new_full((cond.shape[0],), 1.0 / cond.shape[0])
    if prior.shape != cond.shape[:1]:
        raise ValueError(f"prior must hold one weight per task ({cond.shape[0]}), got shape {tuple(prior.shape)}")
    joint = prior[:, None] * cond
    marginal = joint.sum(0, keepdim=True)  # p(e)
    return (joint * ((cond + eps).log() - (marginal + eps).log())).sum()


class TaskRouter(nn.Module):
    """Top-k router with one gate per task: ``forward(x (N, C), task (N,) int64) -> RouterOutput``.

    Besides the routing it records, per task, the moving average of ``p(e|t)`` (``usage``, trained on, saved with
    the model) and the hard top-k counts since ``reset_counts()`` (``counts``, for expert extraction).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_tasks: int,
        k: int = 1,
        noisy_gating: bool = False,
        renormalize: bool = True,
        usage_momentum: float = 0.9,
        noise_eps: float = 1e-2,
    ) -> None:
        super().__init__()
        if num_tasks < 1 or num_experts < 1 or not 1 <= k <= num_experts:
            raise ValueError(f"router needs num_tasks, num_experts >= 1 and 1 <= k <= num_experts, got "
                             f"num_tasks={num_tasks}, num_experts={num_experts}, k={k}")  # fmt: skip
        if noisy_gating and k == num_experts:
            raise ValueError(f"noisy gating needs k < num_experts, got k={k}, num_experts={num_experts}")
        if not 0.0 <= usage_momentum < 1.0:
            raise ValueError(f"usage_momentum must be in [0, 1), got {usage_momentum}")
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.renormalize, self.noise_eps, self.usage_momentum = renormalize, noise_eps, usage_momentum
        self.gates = nn.ModuleList(self._gate(True) for _ in range(num_tasks))
        self.noises = nn.ModuleList(self._gate(False) for _ in range(num_tasks)) if noisy_gating else None
        self.register_buffer("usage", torch.full((num_tasks, num_experts), 1.0 / num_experts))
        self.register_buffer("seen", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("counts", torch.zeros(num_tasks, num_experts), persistent=False)
        self.stats: RouterOutput | None = None
        self.task_probs: torch.Tensor | None = None  # (T, E) this forward's p(e|t), rows of absent tasks = usage
        self.present: torch.Tensor | None = None  # (T,) tasks of this forward

    def _gate(self, bias: bool) -> nn.Linear:
        gate = nn.Linear(self.dim, self.num_experts, bias=bias)
        if bias:
            nn.init.zeros_(gate.bias)
        return gate

    @property
    def num_tasks(self) -> int:
        return len(self.gates)

    def add_task(self, init_from: int | None = None) -> int:
        """Append a gate for a new task (a copy of task ``init_from``'s, default the mean of all); its index."""
        gate = self._gate(True).to(self.gates[0].weight.device)
        with torch.no_grad():
            source = [self.gates[init_from]] if init_from is not None else list(self.gates)
            gate.weight.copy_(torch.stack([g.weight for g in source]).mean(0))
            gate.bias.copy_(torch.stack([g.bias for g in source]).mean(0))
        self.gates.append(gate)
        if self.noises is not None:
            self.noises.append(self._gate(False).to(gate.weight.device))
        pad = lambda t, v: torch.cat([t, t.new_full((1, *t.shape[1:]), v)])  # noqa: E731
        self.usage, self.seen = pad(self.usage, 1.0 / self.num_experts), pad(self.seen, False)
        self.counts = pad(self.counts, 0.0)
        return self.num_tasks - 1

    def select(self, experts: Sequence[int], task: int) -> TaskRouter:
        """A one-task router over ``experts`` only, with task ``task``'s gate rows (for expert extraction)."""
        new = TaskRouter(self.dim, len(experts), 1, min(self.k, len(experts)), renormalize=self.renormalize)
        idx = torch.as_tensor(list(experts), dtype=torch.long)
        with torch.no_grad():
            new.gates[0].weight.copy_(self.gates[task].weight[idx])
            new.gates[0].bias.copy_(self.gates[task].bias[idx])
            usage = self.usage[task, idx]
            new.usage.copy_((usage / usage.sum().clamp(min=1e-9))[None])
            new.seen.fill_(bool(self.seen[task]))
        return new.to(self.gates[0].weight.device)

    def reset_counts(self) -> None:
        self.counts.zero_()

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> RouterOutput:
        if task.shape != x.shape[:1] or task.dtype != torch.long:
            raise ValueError(f"task must be int64 ids, one per token ({x.shape[0]}), got {task.dtype} "
                             f"{tuple(task.shape)}")  # fmt: skip
        if x.shape[0] and not 0 <= int(task.min()) <= int(task.max()) < self.num_tasks:
            raise ValueError(f"task ids must be in 0..{self.num_tasks - 1}, got {task.unique().tolist()}")
        clean = self._per_task(self.gates, x, task)
        std = None
        if self.noises is not None and self.training:
            std = F.softplus(self._per_task(self.noises, x, task)) + self.noise_eps
        route = select_top_k(clean, std, self.k, self.renormalize)
        self._record(route, task)
        self.stats = route
        return route

    @staticmethod
    def _per_task(gates: nn.ModuleList, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        if len(gates) == 1:
            return gates[0](x)
        weight = torch.cat([g.weight for g in gates])  # (T*E, C): every task's logits at once, then each token's
        bias = torch.cat([g.bias for g in gates]) if gates[0].bias is not None else None
        logits = F.linear(x, weight, bias).view(x.shape[0], len(gates), -1)
        return logits[torch.arange(x.shape[0], device=x.device), task]

    def _record(self, route: RouterOutput, task: torch.Tensor) -> None:
        T, E = self.num_tasks, self.num_experts
        n = torch.bincount(task, minlength=T).to(route.probs.dtype)
        sums = route.probs.new_zeros(T, E).index_add(0, task, route.probs)
        present = n > 0
        current = sums / n.clamp(min=1)[:, None]
        self.task_probs = torch.where(present[:, None], current, self.usage.detach())
        self.present = present
        with torch.no_grad():
            hits = F.one_hot(route.indices, E).sum(1).to(self.counts.dtype)  # (N, E)
            self.counts.index_add_(0, task, hits)
            if self.training:
                m = torch.where(self.seen, self.usage_momentum, 0.0)[:, None]  # a task's first batch sets its row
                updated = m * self.usage + (1 - m) * current.detach()
                self.usage.copy_(torch.where(present[:, None], updated, self.usage))
                self.seen |= present

    def mutual_information(self) -> torch.Tensor:
        """I(T; E) of the last forward's rows (present tasks) and the moving averages (tasks seen before)."""
        if self.task_probs is None or self.present is None:
            raise ValueError("mutual_information needs a forward pass first")
        known = self.present | self.seen
        return mutual_information(self.task_probs[known])

    def __getstate__(self) -> dict:
        # the stashed statistics hold autograd graphs, which deepcopy / pickle cannot copy
        return {**super().__getstate__(), "stats": None, "task_probs": None, "present": None}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, num_tasks={self.num_tasks}, k={self.k}"


class _TaskRouted(nn.Module):
    """A module routed by task: the model sets ``routing_task`` (B,) before each forward."""

    routing_task: torch.Tensor | None = None

    def _token_tasks(self, x: torch.Tensor) -> torch.Tensor:
        task = self.routing_task
        if task is None:
            raise ValueError(f"{type(self).__name__} needs routing_task (one task id per image) set before forward")
        if task.shape != x.shape[:1]:
            raise ValueError(f"routing_task must hold one id per image ({x.shape[0]}), got {tuple(task.shape)}")
        return task[:, None].expand(x.shape[:2]).to(x.device)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "routing_task": None}


class TaskMoEMlp(_TaskRouted):
    """A block's MLP as ``num_experts`` smaller MLPs (``hidden`` wide each), top-k per token by a ``TaskRouter``."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        k: int,
        num_tasks: int,
        noisy_gating: bool = True,
        experts: Sequence[nn.Module] | None = None,
        router: TaskRouter | None = None,
    ) -> None:
        super().__init__()
        from timm.layers import Mlp

        experts = experts if experts is not None else [Mlp(dim, hidden) for _ in range(num_experts)]
        router = router or TaskRouter(dim, len(experts), num_tasks, k, noisy_gating=noisy_gating)
        self.moe = MixtureOfExperts(experts, dim, router=router)

    @property
    def router(self) -> TaskRouter:
        return self.moe.router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x, task=self._token_tasks(x))

    def select(self, experts: Sequence[int], task: int) -> TaskMoEMlp:
        kept = [self.moe.experts[e] for e in experts]
        return TaskMoEMlp(0, 0, len(kept), 1, 1, experts=kept, router=self.router.select(experts, task))

    def experts_of(self, e: int) -> list[nn.Module]:
        return [self.moe.experts[e]]


class MoEAttention(_TaskRouted):
    """Mixture of attention heads: per-token top-k of ``num_experts`` (query, output) projections of ``head_dim``
    over one shared key/value head. ``forward(x (B, N, C)) -> (B, N, C)``; masks are not supported.

    ``compute="sparse"`` runs each expert on its routed tokens only (the active compute); ``"dense"`` runs every
    expert on every token and weights the unchosen ones by 0: the same output and gradients, and on CPUs with a
    handful of experts several times faster (one matmul and one SDPA instead of per-expert gathers).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int,
        num_tasks: int,
        head_dim: int,
        qkv_bias: bool = True,
        noisy_gating: bool = True,
        compute: str = "dense",
    ) -> None:
        super().__init__()
        if compute not in ("dense", "sparse"):
            raise ValueError(f"compute must be 'dense' or 'sparse', got {compute!r}")
        self.compute = compute
        self.head_dim, self.scale = head_dim, head_dim**-0.5
        self.kv = nn.Linear(dim, 2 * head_dim, bias=qkv_bias)
        self.q = nn.ModuleList(nn.Linear(dim, head_dim, bias=qkv_bias) for _ in range(num_experts))
        self.o = nn.ModuleList(nn.Linear(head_dim, dim, bias=False) for _ in range(num_experts))
        self.proj_bias = nn.Parameter(torch.zeros(dim))
        self.router = TaskRouter(dim, num_experts, num_tasks, k, noisy_gating=noisy_gating)

    @property
    def num_experts(self) -> int:
        return len(self.q)

    def forward(self, x: torch.Tensor, *args: object, attn_mask: torch.Tensor | None = None, **kw: object):
        # vitlab blocks pass the token grid (unused); a mask or bias is refused rather than ignored
        if attn_mask is not None or kw.get("bias") is not None or (len(args) > 1 and args[1] is not None):
            raise ValueError("MoEAttention does not take attention masks or biases")
        B, N, C = x.shape
        route = self.router(x.reshape(B * N, C), self._token_tasks(x).reshape(-1))
        key, value = self.kv(x).split(self.head_dim, dim=-1)  # (B, N, d) each, shared by every expert
        if self.compute == "sparse":
            out = self._sparse(x.reshape(B * N, C), key, value, route.indices, route.weights)
        else:
            out = self._dense(x, key, value, route.indices, route.weights)
        return (out + self.proj_bias).reshape(B, N, C)

    def _sparse(self, tokens, key, value, indices, weights) -> torch.Tensor:
        """Each expert on its routed tokens only: the active compute (what a FLOP counter should see)."""
        N, k = key.shape[1], indices.shape[1]
        flat_expert, flat_weight = indices.reshape(-1), weights.reshape(-1)
        flat_token = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(k)
        out = tokens.new_zeros(tokens.shape)
        for e in range(self.num_experts):
            sel = (flat_expert == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue  # an expert without tokens costs nothing
            idx = flat_token[sel]
            image = idx // N
            q = self.q[e](tokens[idx]).unsqueeze(1)  # (T_e, 1, d): each token attends over its own image
            attn = ((q @ key[image].transpose(1, 2)) * self.scale).softmax(-1)  # (T_e, 1, N)
            head = (attn @ value[image]).squeeze(1)
            out.index_add_(0, idx, self.o[e](head) * flat_weight[sel, None].to(tokens.dtype))
        return out

    def _dense(self, x, key, value, indices, weights) -> torch.Tensor:
        """Every expert on every token, unchosen ones weighted 0: the same result, faster on CPUs for few experts."""
        B, N, C = x.shape
        wq = torch.cat([q.weight for q in self.q])  # (E*d, C)
        bq = torch.cat([q.bias for q in self.q]) if self.q[0].bias is not None else None
        q = F.linear(x, wq, bq).view(B, N, self.num_experts, self.head_dim).transpose(1, 2)  # (B, E, N, d)
        heads = F.scaled_dot_product_attention(q, key[:, None], value[:, None], scale=self.scale)  # (B, E, N, d)
        gate = weights.new_zeros(B * N, self.num_experts).scatter_add(1, indices, weights).view(B, N, -1, 1)
        mixed = (heads.transpose(1, 2) * gate.to(x.dtype)).reshape(B, N, -1)  # (B, N, E*d)
        wo = torch.cat([o.weight for o in self.o], dim=1)  # (C, E*d)
        return F.linear(mixed, wo).reshape(B * N, C)

    def select(self, experts: Sequence[int], task: int) -> MoEAttention:
        new = MoEAttention(self.proj_bias.numel(), len(experts), min(self.router.k, len(experts)), 1,
                           self.head_dim, qkv_bias=self.kv.bias is not None, noisy_gating=False,
                           compute=self.compute)  # fmt: skip
        new.kv, new.proj_bias = self.kv, self.proj_bias
        new.q = nn.ModuleList(self.q[e] for e in experts)
        new.o = nn.ModuleList(self.o[e] for e in experts)
        new.router = self.router.select(experts, task)
        return new

    def experts_of(self, e: int) -> list[nn.Module]:
        return [self.q[e], self.o[e]]


def task_routed_modules(model: nn.Module) -> list[_TaskRouted]:
    """Every task-routed module (``MoEAttention``, ``TaskMoEMlp``) in ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, _TaskRouted)]
