"""Multi-scale retention: one module, three forms of the same function (parallel, recurrent, chunkwise).

Retention is RetNet's (arXiv:2307.08621) decayed causal linear attention, ``o_n = sum_{m<=n} g^(n-m) (q_n k_m) v_m``
per head; ViR ("ViR: Towards Efficient Vision Retention Backbones", arXiv:2310.19731, official code
github.com/NVlabs/ViR, whose isotropic models were published at github.com/anom63931/ViR) uses it as the token
mixer of a ViT. The decay ``g`` differs per head, ``1 - g`` log-spaced from 1/32 to 1/512 as in ViR's code.
The parallel form costs O(N²) like attention; the recurrent form carries a ``(head_dim, head_dim)`` state per head
token by token, and the chunkwise form runs chunks in parallel with the state carried between them: both O(N).

Deviations: ViR's official ``parallel`` applies a softmax to the decayed scores while its own recurrent and
chunkwise forms (and the paper's equations) have none, so its forms disagree; here no form has a softmax, so all
three compute one function (the paper's claim). As in ViR's code there is no group norm or swish gate (RetNet has
both). Parameter names are timm's ``qkv``/``proj`` (ViR's code: ``qkv``/``out_proj``; no weights were released).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .tracing import is_fx_tracing

__all__ = ["RETENTION_FORMS", "Retention", "run_retention_form"]

RETENTION_FORMS = ("parallel", "recurrent", "chunkwise")


def _exact(t: torch.Tensor) -> torch.dtype:
    # decay powers in float32 (float64 for float64 inputs): g^n underflows to 0 in half precision too early
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _log_decay(
    decay_range: tuple[float, float], num_heads: int, device: torch.device | None, dtype: torch.dtype
) -> torch.Tensor:
    lo, hi = (math.log(r) for r in decay_range)
    return torch.log1p(-torch.exp(torch.linspace(lo, hi, num_heads, device=device, dtype=dtype)))


def _decay_matrix(log_decay: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.arange(n, device=log_decay.device, dtype=log_decay.dtype)
    dist = idx[:, None] - idx[None, :]
    # an infinite distance above the diagonal gives g^inf = 0: the causal mask and the decay in one tensor
    dist = dist.masked_fill(dist < 0, math.inf)
    return torch.exp(dist * log_decay[:, None, None])


@torch.fx.wrap  # one FX graph node: built from the token count and dtype, which a trace holds as proxies
def _decay_matrix_for(q: torch.Tensor, decay_range: tuple[float, float]) -> torch.Tensor:
    """The ``(heads, N, N)`` decay matrix for queries ``q (B, heads, N, d)``, in ``q``'s dtype."""
    return _decay_matrix(_log_decay(decay_range, q.shape[1], q.device, _exact(q)), q.shape[2]).to(q.dtype)


class Retention(nn.Module):
    """Multi-head retention with a fixed per-head decay; the mixer contract ``forward(x, grid=None)``.

    ``forward`` is the parallel form; ``forward_recurrent`` and ``forward_chunkwise`` return the same outputs
    plus the final state ``(B, num_heads, head_dim, head_dim)``, which a later call can continue from.
    Tokens are mixed causally in the order given (``grid`` is accepted and unused), except prefix tokens.

    Args:
        decay_range: ``1 - decay`` of the first and the last head, log-spaced in between.
        num_prefix_tokens: leading (class) tokens that are moved behind the patches for the retention, as ViR
            places its class token last so that under the causal decay it sees every patch; outputs return in
            the input order. Streaming one sequence over several calls (``state``) needs 0.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        decay_range: tuple[float, float] = (1 / 32, 1 / 512),
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads} (>= 1)")
        if len(decay_range) != 2 or not all(0.0 < r < 1.0 for r in decay_range):
            raise ValueError(f"decay_range must be two values in (0, 1), got {decay_range!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.decay_range = tuple(decay_range)
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def log_decay(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``log g`` per head, ``(num_heads,)`` (computed, not stored: nothing to load or move)."""
        return _log_decay(self.decay_range, self.num_heads, device, dtype)

    def decay_matrix(
        self, n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``D[h, i, j] = g_h^(i-j)`` for ``i >= j`` else 0: ``(num_heads, n, n)``."""
        return _decay_matrix(self.log_decay(device, dtype), n)

    def _check(self, x: torch.Tensor, state: torch.Tensor | None = None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}) tokens, got shape {tuple(x.shape)}")
        want = (x.shape[0], self.num_heads, self.head_dim, self.head_dim)
        if state is not None and tuple(state.shape) != want:
            raise ValueError(
                f"state must have shape {want} (B, num_heads, head_dim, head_dim), got {tuple(state.shape)}"
            )

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.num_prefix_tokens
        if p:
            x = torch.cat([x[:, p:], x[:, :p]], dim=1)  # prefix tokens last (ViR's order)
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q * self.scale, k, v  # each (B, heads, N, head_dim)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = o.shape
        o = self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, self.dim)))
        p = self.num_prefix_tokens
        return torch.cat([o[:, N - p :], o[:, : N - p]], dim=1) if p else o  # back to the input order

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Parallel form: ``((q kᵀ) ⊙ D) v`` with the causal decay matrix ``D``, O(N²)."""
        if not is_fx_tracing():
            self._check(x)
        q, k, v = self._qkv(x)
        scores = (q @ k.transpose(-2, -1)) * _decay_matrix_for(q, self.decay_range)
        return self._out(scores @ v)

    def forward_recurrent(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recurrent form, one token at a time: ``S_n = g S_{n-1} + k_nᵀ v_n``, ``o_n = q_n S_n``.

        Memory per step is the state, independent of ``N``; projections run for all tokens at once.
        """
        self._check(x, state)
        q, k, v = self._qkv(x)
        B, H, N, d = q.shape
        g = self.log_decay(x.device, _exact(q)).exp().to(q.dtype).view(1, H, 1, 1)
        s = q.new_zeros(B, H, d, d) if state is None else state.to(q.dtype)
        outs = []
        for n in range(N):
            s = torch.addcmul(s * g, k[:, :, n, :, None], v[:, :, n, None, :])
            outs.append(q[:, :, n, None, :] @ s)  # (B, H, 1, d)
        o = torch.cat(outs, dim=2) if outs else q
        return self._out(o), s

    def forward_chunkwise(
        self, x: torch.Tensor, chunk_size: int, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunkwise form: parallel inside chunks of ``chunk_size`` tokens, the state carried across chunks.

        O(N · chunk_size) time; all chunks are processed in one batch, the carried states by a log-depth scan.
        A last chunk shorter than ``chunk_size`` is run on its own.
        """
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self._check(x, state)
        q, k, v = self._qkv(x)
        B, H, N, d = q.shape
        s = q.new_zeros(B, H, d, d) if state is None else state.to(q.dtype)
        full = N // chunk_size * chunk_size
        parts = []
        for lo, hi, size in ((0, full, chunk_size), (full, N, N - full)):
            if hi > lo:
                chunks = [t[:, :, lo:hi].unflatten(2, (-1, size)) for t in (q, k, v)]  # (B, H, nC, L, d)
                o, s = self._chunks(*chunks, s)
                parts.append(o.flatten(2, 3))
        o = torch.cat(parts, dim=2) if parts else q
        return self._out(o), s

    def _chunks(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Equal-length chunks ``(B, H, nC, L, d)`` entered with ``state`` -> outputs and the state after them."""
        L, nC = q.shape[3], q.shape[2]
        log_g = self.log_decay(q.device, _exact(q))  # (H,)
        pos = torch.arange(L, device=q.device, dtype=log_g.dtype)
        inner = (q @ k.transpose(-2, -1)) * self.decay_matrix(L, q.device, log_g.dtype).to(q.dtype)[:, None]
        # each chunk's own contribution to the state at its end: sum_j g^(L-1-j) k_jᵀ v_j -> (B, H, nC, d, d)
        to_end = torch.exp((L - 1 - pos) * log_g[:, None]).to(q.dtype)[:, None, :, None]  # (H, 1, L, 1)
        kv = (k * to_end).transpose(-2, -1) @ v
        # inclusive scan over chunks of s_c = G s_{c-1} + kv_c with G = g^L (Hillis-Steele, log2(nC) steps)
        log_G = (L * log_g).view(1, -1, 1, 1, 1)
        step = 1
        while step < nC:
            shifted = torch.exp(step * log_G).to(q.dtype) * kv[:, :, :-step]
            kv = torch.cat([kv[:, :, :step], kv[:, :, step:] + shifted], dim=2)
            step *= 2
        # state entering chunk c: scan_{c-1} + G^c * state
        powers = torch.exp(torch.arange(nC, device=q.device).view(1, 1, -1, 1, 1) * log_G).to(q.dtype)
        entering = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], 2) + powers * state[:, :, None]
        from_start = torch.exp((pos + 1) * log_g[:, None]).to(q.dtype)[:, None, :, None]  # g^(i+1), (H, 1, L, 1)
        out = inner @ v + (q @ entering) * from_start
        final = kv[:, :, -1] + torch.exp(nC * log_G[:, :, 0]).to(q.dtype) * state
        return out, final


def run_retention_form(module: Retention, x: torch.Tensor, form: str, chunk_size: int = 64) -> torch.Tensor:
    """Run one form of ``module`` on ``x (B, N, C)`` and return ``(B, N, C)``: the scaling benchmark's entry.

    ``form`` is one of ``RETENTION_FORMS``; ``chunk_size`` is used by the chunkwise form only.
    """
    if form == "parallel":
        return module(x)
    if form == "recurrent":
        return module.forward_recurrent(x)[0]
    if form == "chunkwise":
        return module.forward_chunkwise(x, chunk_size)[0]
    raise ValueError(f"form must be one of {RETENTION_FORMS}, got {form!r}")
