"""The token-reduction runtime shared by every method: ``ReducingBlock``, ``ReducedBlocks``, host checks.

A method (``tome.py``, ``evit.py``, ``ats.py``, ``mctf.py``) only scores tokens and returns a ``Plan``
(``_plan.py``: which token seeds each output slot, which tokens are added into which slot, with what
weight). This file runs the host block's own children with attention on ``layers.attend`` / SDPA
(``log(size)`` as an additive (B, 1, 1, N) bias gives ToMe's proportional attention and keeps SDPA on its
fused CPU kernel; size 0 marks padding), computes only the signals a method declares, and applies plans.
The plain forward does not track the source map; the one-step-ahead pass (MCTF) reuses the projections
of tokens that only moved, or (``one_step_ahead="approx"``) fuses its attention map instead of attending again.
Deviation from the reference implementations: no ``__class__`` swap and no per-host forward copy;
the host block's children are adopted under their own names, so ``state_dict`` keys are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from ..layers import Attention as VitlabAttention
from ..layers import MetaBlock, attend
from ._attention_sums import _attention_received, _column_sums, _softmax_chunks
from ._plan import Plan, TokenState, _flat, _slots, apply_plan, prefix_plan

__all__ = [
    "SUPPORTED_HOSTS",
    "Method",
    "Plan",
    "ReducedBlocks",
    "ReducingBlock",
    "Signals",
    "TokenState",
    "apply_plan",
    "check_host",
    "prefix_plan",
]

SUPPORTED_HOSTS = (
    "timm VisionTransformer (class token, optional register tokens), timm VisionTransformerDistilled "
    "(DeiT with distillation token) and the isotropic vitlab models whose blocks are pre-norm: timm's Block, or a "
    "MetaBlock with vitlab's Attention and a token-wise MLP"
)
_BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_ATTRS = ("qkv", "proj", "num_heads", "q_norm", "k_norm")


class Signals(NamedTuple):
    """What a method may score on; only the fields it declares in ``Method.needs`` are computed."""

    x: torch.Tensor  # (B, N, C) the block's features at the reduction point
    keys: torch.Tensor | None = None  # (B, N, head_dim) keys averaged over heads (ToMe)
    cls_attn: torch.Tensor | None = None  # (B, H, N) softmax row of the class token (EViT, ATS)
    value_norm: torch.Tensor | None = None  # (B, N) norm of the values over all heads (ATS)
    attn_received: torch.Tensor | None = None  # (B, N) attention each key receives, mean over heads, queries


@dataclass(frozen=True)
class Method:
    """A token-reduction method: its per-layer schedule, its plan, and what it needs from the runtime.

    Args:
        schedule: ``(depth, **kw) -> list`` of per-block amounts; 0 means the block does not reduce.
        plan: ``(signals, state, amount, num_prefix, **options) -> Plan``, or None to keep every token.
        needs: the ``Signals`` fields the plan reads.
        before_attn: reduce at the block input (MCTF's one-step-ahead attention), else after attention.
        prop_attn: add ``log(size)`` to the attention logits of later blocks (proportional attention).
        padded: token counts vary per image; padding slots have size 0 and are masked out.
        needs_cls: the host must have a class token at position 0.
    """

    name: str
    schedule: Callable[..., list[float]]
    plan: Callable[..., Plan | None]
    needs: frozenset[str]
    before_attn: bool = False
    prop_attn: bool = False
    padded: bool = False
    needs_cls: bool = False


def _attn_bias(state: TokenState, method: Method, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias over keys, (B, 1, 1, N): log(size) (proportional) or a padding mask."""
    if method.prop_attn:
        bias = state.size.log()  # log(0) = -inf masks padding
    elif method.padded:
        bias = torch.zeros_like(state.size).masked_fill(state.size == 0, -math.inf)
    else:
        return None
    return bias.to(dtype)[:, None, None, :]


AHEAD_MODES = ("precise", "approx")  # MCTF's one-step-ahead variants (option ``one_step_ahead``)


class ReducingBlock(nn.Module):
    """A timm pre-norm transformer block, run with token reduction between attention and MLP.

    Built by ``ReducingBlock.adopt(block, ...)``: the host's children (``norm1``, ``attn``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``) are registered here under the same
    names, so parameters are shared with the host block and ``state_dict`` keys do not change.
    ``forward(x, state) -> (x, state)``.
    """

    def __init__(self, method: Method, amount: float, num_prefix: int, options: dict | None = None) -> None:
        super().__init__()
        self.method = method
        self.amount = amount
        self.num_prefix = num_prefix
        self.options = dict(options or {})  # keyword options of the method's plan
        ahead = self.options.get("one_step_ahead", "precise")
        if ahead not in AHEAD_MODES:
            raise ValueError(f"one_step_ahead must be one of {AHEAD_MODES}, got {ahead!r}")
        if ahead == "approx" and not (method.before_attn and method.needs == {"attn_received"}):
            raise ValueError(
                f"one_step_ahead='approx' needs a one-step-ahead method scoring by attention received, "
                f"not {method.name}"
            )
        self.fuse_attn = ahead == "approx"  # fuse this block's attention map instead of attending again

    @classmethod
    def adopt(
        cls, block: nn.Module, method: Method, amount: float, num_prefix: int, options: dict | None = None
    ) -> ReducingBlock:
        _check_block(block, "block")
        new = cls(method, amount, num_prefix, options)
        for name, child in block.named_children():
            new.add_module(name, child)
        new.train(block.training)
        return new

    def extra_repr(self) -> str:
        return f"method={self.method.name}, amount={self.amount}"

    def _split(self, proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k (and v), (B, H, N, head_dim) each, from the host's qkv projection (B, N, 3 D) or its q, k part
        (B, N, 2 D); q and k through the host's q_norm / k_norm."""
        attn = self.attn
        B, N, width = proj.shape
        parts = width // (attn.qkv.weight.shape[0] // 3)
        q, k, *v = proj.reshape(B, N, parts, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), *v

    def _signals(self, q, k, v, bias: torch.Tensor | None, needs: frozenset[str]) -> dict[str, torch.Tensor]:
        """Only the signals the method declares; the N x N matrix is formed only for MCTF's column means."""
        scale = q.shape[-1] ** -0.5 if not hasattr(self.attn, "scale") else self.attn.scale
        signals: dict[str, torch.Tensor] = {}
        if "cls_attn" in needs:
            # the 1 x N class-token row on its own, so the N x N matrix stays inside SDPA; it keeps its
            # gradient because EViT's fused token is weighted by it
            logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
            signals["cls_attn"] = (logits if bias is None else logits + bias).softmax(-1).squeeze(2)
        with torch.no_grad():  # the other signals only choose tokens
            if "keys" in needs:
                signals["keys"] = k.mean(1)
            if "value_norm" in needs:
                signals["value_norm"] = v.transpose(1, 2).flatten(2).norm(dim=-1)
            if "attn_received" in needs:
                signals["attn_received"] = _attention_received(q, k, bias, scale)
        return signals

    def _attend(
        self, h: torch.Tensor | None, state: TokenState, needs: frozenset[str], qkv: tuple | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The host attention around one SDPA call (``log(size)`` or padding bias), plus the signals in ``needs``.

        ``qkv``: q, k, v of ``h`` when already known (then ``h`` is needed only by a gated attention).
        """
        attn = self.attn
        q, k, v = self._split(attn.qkv(h)) if qkv is None else qkv
        bias = _attn_bias(state, self.method, q.dtype)
        signals = self._signals(q, k, v, bias, needs) if needs else {}
        out = attend(q, k, v, bias, self._attn_drop(), getattr(attn, "scale", None))
        return self._project(out.transpose(1, 2).flatten(2), h), signals

    def _attn_drop(self) -> float:
        attn = self.attn  # timm holds a Dropout module, vitlab's Attention the probability
        return getattr(attn.attn_drop, "p", attn.attn_drop) if self.training and hasattr(attn, "attn_drop") else 0.0

    def _project(self, out: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """The host attention after its softmax: heads (B, N, H * head_dim) -> norm, gate (of ``h``), proj."""
        attn = self.attn
        if getattr(attn, "norm", None) is not None:
            out = attn.norm(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(h).sigmoid()
        out = attn.proj(out)
        return attn.proj_drop(out) if hasattr(attn, "proj_drop") else out

    def _reduce(
        self, x: torch.Tensor, state: TokenState, signals: dict
    ) -> tuple[torch.Tensor, TokenState, Plan | None]:
        plan = self.method.plan(Signals(x=x, **signals), state, self.amount, self.num_prefix, **self.options)
        return (x, state, None) if plan is None else (*apply_plan(plan, x, state), plan)

    def _qkv(self, h: torch.Tensor, parts: slice) -> torch.Tensor:
        """Part of the host's qkv projection of ``h``: ``parts`` counts in q, k, v (``slice(0, 2)``: q and k)."""
        qkv = self.attn.qkv
        D = qkv.weight.shape[0] // 3
        rows = slice(parts.start * D, parts.stop * D)  # a view of the weight: no copy
        return F.linear(h, qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])

    def _v(self, h: torch.Tensor) -> torch.Tensor:
        """v (B, H, N, head_dim) of ``h`` (B, N, C)."""
        B, N, _ = h.shape
        return self._qkv(h, slice(2, 3)).view(B, N, self.attn.num_heads, -1).transpose(1, 2)

    def _reduce_ahead(self, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState, tuple]:
        """One-step-ahead (MCTF): score with this block's attention on its input, then reduce.

        Also returns the new tokens' ``norm1`` output and their q, k, v for the attention that follows. The scores
        need only q and k of the input; v is projected from the new tokens. q and k are per token, so a slot that
        only moved takes its token's rows: its features are exactly that token's (weight size / size = 1, or no
        weights); only slots that received fused tokens are projected again. (None, None) when the plan weighs
        tokens otherwise.
        """
        h = self.norm1(x)
        qk = self._qkv(h, slice(0, 2))
        q, k = self._split(qk)
        needs = self.method.needs
        v = self._v(h) if "value_norm" in needs else None
        signals = self._signals(q, k, v, _attn_bias(state, self.method, q.dtype), needs)
        size_in = state.size
        x, state, plan = self._reduce(x, state, signals)
        if plan is None:
            return x, state, (h, (q, k, self._v(h) if v is None else v))
        if not (plan.weight is None or (plan.normalize and plan.weight is size_in)):
            return x, state, (None, None)
        (B, N, _), S = h.shape, x.shape[1]
        h = self.norm1(x)
        qk = qk.reshape(B * N, -1).index_select(0, _flat(plan.keep, N))
        if plan.merge_dst is not None:
            slots = _flat(plan.merge_dst, S)  # repeats write identical rows
            qk.index_copy_(0, slots, self._qkv(h.reshape(B * S, -1).index_select(0, slots), slice(0, 2)))
        return x, state, (h, (*self._split(qk.view(B, S, -1)), self._v(h)))

    def _fuse_ahead(self, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState, torch.Tensor]:
        """Approximate one-step-ahead (``one_step_ahead="approx"``, the official MCTF evaluation's): this block's
        attention on its input both scores the tokens and, fused like them, is the attention of the new tokens.

        The fused map keeps the queries' rows as the tokens are fused (same weights) and sums the columns of the
        keys that share a slot; times the values of the new tokens. Written as ``rows(P @ v[slot])``: each key's
        column meets the value of the slot its token went to, and the (N, head_dim) product is fused along rows,
        so the (N, N) map is never gathered. Only q, k are projected from the input, v from the new tokens.
        Returns the new tokens, their state and the attention branch's output (before ``ls1``).
        """
        attn = self.attn
        B, N, _ = x.shape
        H = attn.num_heads
        h = self.norm1(x)
        q, k = self._split(self._qkv(h, slice(0, 2)))
        scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
        bias = _attn_bias(state, self.method, q.dtype)
        weight = None if bias is None else bias.exp().flatten(1)  # (B, N) key weights (sizes)
        chunks, sums = [], []
        for e, inv in _softmax_chunks(q, k, weight, scale):
            chunks.append((e, inv))
            with torch.no_grad():  # the scores only choose tokens; summed while the chunk is in cache
                sums.append(_column_sums(e, inv))
        received = torch.cat(sums) if weight is None else torch.cat(sums) * weight
        state_in = state
        x, state, plan = self._reduce(x, state, {"attn_received": received / (H * N)})
        if plan is not None:
            h = self.norm1(x)
        S = x.shape[1]
        v = self._qkv(h, slice(2, 3))  # (B, S, D)
        D = v.shape[-1]
        if plan is not None:  # each token's key meets the value of its slot
            v = v.reshape(B * S, D).index_select(0, _flat(_slots(plan, N), S)).view(B, N, D)
        if weight is not None:  # attention = inv * e * weight: the weights go on the values' rows
            v = v.mul_(weight.unsqueeze(-1))  # a fresh tensor
        v = v.view(B, N, H, -1).transpose(1, 2)  # (B, H, N, head_dim)
        drop = self._attn_drop()  # dropping entries of e drops the same entries of the attention
        out, i = v.new_empty(B, N, H, v.shape[-1]), 0
        for e, inv in chunks:
            n, i = e.shape[0], i + e.shape[0]
            o = torch.bmm((F.dropout(e, drop) if drop else e).view(n * H, N, N), v[i - n : i].reshape(n * H, N, -1))
            o = o.view(n, H * N, -1).mul_(inv)
            out[i - n : i] = o.view(n, H, N, -1).transpose(1, 2)  # (B, N, H, head_dim) rows, written once
        out = out.view(B, N, D)
        if plan is not None:  # the queries' rows, fused like the tokens
            out, _ = apply_plan(plan, out, TokenState(state_in.size))
        return x, state, self._project(out, h)

    def forward(self, x: torch.Tensor, state: TokenState) -> tuple[torch.Tensor, TokenState]:
        method, active = self.method, bool(self.amount)
        after = active and not method.before_attn
        if active and self.fuse_attn:
            x, state, y = self._fuse_ahead(x, state)
        else:
            h = qkv = None
            if active and method.before_attn:
                x, state, (h, qkv) = self._reduce_ahead(x, state)
            if h is None and qkv is None:
                h = self.norm1(x)
            y, signals = self._attend(h, state, method.needs if after else frozenset(), qkv)
        x = x + self.drop_path1(self.ls1(y))
        if after:
            x, state, _ = self._reduce(x, state, signals)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, state


class ReducedBlocks(nn.Sequential):
    """Replaces ``model.blocks``: the same blocks under the same indices, with a ``TokenState`` threaded through.

    Blocks before the first reduction stay the host's own modules (so a schedule of zeros is bit-exact).
    """

    threads_state = True  # hosts call the container once instead of each block (layers.IsotropicBackbone)

    def __init__(self, blocks: Sequence[nn.Module], host: nn.Sequential, method: Method, num_prefix: int) -> None:
        super().__init__(*blocks)
        self.host_blocks = (host,)  # a tuple, so the original container is not a registered child
        self.method = method
        self.num_prefix = num_prefix

    def forward_with_state(self, x: torch.Tensor, track_source: bool = True) -> tuple[torch.Tensor, TokenState | None]:
        state = None
        for blk in self:
            if isinstance(blk, ReducingBlock):
                if state is None:
                    state = TokenState.initial(x, self.num_prefix, track_source)
                x, state = blk(x, state)
            else:
                x = blk(x)
        return x, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_state(x, track_source=False)[0]  # the source map costs work nobody reads here


def _check_block(block: nn.Module, where: str) -> None:
    for name in _BLOCK_CHILDREN:
        if not hasattr(block, name):
            raise ValueError(
                f"{where} ({type(block).__name__}) has no attribute {name!r}; supported hosts: {SUPPORTED_HOSTS}"
            )
    # a MetaBlock runs the same pre-norm residual steps as timm's Block when its MLP is token-wise
    meta = type(block).forward is MetaBlock.forward and not getattr(block.mlp, "uses_grid", False)
    if type(block).forward is not Block.forward and not meta:
        raise ValueError(
            f"{where} is {type(block).__name__}, whose forward is not timm's pre-norm Block; supported hosts: "
            f"{SUPPORTED_HOSTS}"
        )
    for name in _ATTN_ATTRS:
        if not hasattr(block.attn, name):
            raise ValueError(f"{where}.attn has no attribute {name!r}; supported hosts: {SUPPORTED_HOSTS}")
    if type(block.attn).forward not in (Attention.forward, VitlabAttention.forward):
        raise ValueError(
            f"{where}.attn is {type(block.attn).__name__}, not timm's Attention (e.g. rotary attention is not "
            f"supported); supported hosts: {SUPPORTED_HOSTS}"
        )


def check_host(model: nn.Module, method: Method) -> None:
    """Raise ``ValueError`` naming what is missing unless ``model`` is an isotropic ViT this runtime can patch."""
    name = type(model).__name__
    for attr in ("blocks", "patch_embed", "num_prefix_tokens"):
        if not hasattr(model, attr):
            raise ValueError(f"{name} has no attribute {attr!r}; supported hosts: {SUPPORTED_HOSTS}")
    if not isinstance(model.blocks, nn.Sequential) or len(model.blocks) == 0:
        raise ValueError(f"{name}.blocks is not a non-empty nn.Sequential; supported hosts: {SUPPORTED_HOSTS}")
    for i, block in enumerate(model.blocks):
        _check_block(block, f"{name}.blocks[{i}]")
    if method.needs_cls and getattr(model, "cls_token", None) is None:
        raise ValueError(f"{method.name} scores tokens by class-token attention, but {name} has no 'cls_token'")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("token reduction does not support gradient checkpointing; call set_grad_checkpointing(False)")
