"""MSVMamba's multi-scale 2-D selective-scan mixer (MS2D), ``SelectiveScan2d``.

"Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model" (arXiv:2405.14174,
github.com/YuHengsss/MSVMamba), Sec. 3.2; the S6 scan itself is ``selective_scan.py``.

Layout: maps are stored transposed with the batch inside, ``(W, H, B, C)``, so that the row-major scan cut
into row chunks is already step-major (``(steps, chunks, B, C)``) and each scan step reads one contiguous
slice; the three half-scale routes are one index into the half-size map (no flipped or concatenated copies).

Inference (no autograd, ``d_state = 1`` as in MSVMamba, CPU float32) runs both scans in the compiled kernel of
``scan_cpu.py`` when it builds on the machine: one pass per scan with the ``dt`` product, softplus, decay, ``C``,
``D`` and the LayerNorm fused, the half-scale routes adding onto their pixels and the full scale onto the upsampled
branch. Otherwise (no compiler, other dtypes, FLOP counting) it runs each scan step by step over all chunks at once,
with everything of a step fused while its slices are in cache (``linear_recurrence.py`` explains the
chunking): pass 1 computes ``dt``, the decay and the input and scans each chunk from state 0, a short
recurrence gives the chunk carries, pass 2 rescans from them and applies ``C``, ``D``, the LayerNorm and,
at full scale, the upsampled half-scale branch, the SE mean and the SiLU(z) gate, ``z`` being projected step
by step there (a small matmul whose output stays in cache, not a full-size map written out and read back);
the SE gate itself is folded into ``out_proj``. At half scale ``dt``, decay and input depend on the pixel only,
so they are computed once per pixel, not once per route. With autograd the same function runs vectorised
(``chunked_recurrence``). On CPU these passes are bound by memory traffic and per-op overhead, not
arithmetic: a closed form per chunk (``h_t = e^{S_t} (h_0 + cumsum(e^{-S} b))``, ``S = cumsum(log a)``) needs
more full passes than the recurrence's two and ``torch.cumsum`` costs 2x a multiply along the last dim
(10x or more along a leading one), so it was measured slower and is not used.

Deviations: none in the function (it is the official one; tests compare both paths with the routes written
out, in fp64). Rounding differs, and softplus is ``log1p(exp(x))`` without its ``x > 20`` branch when no
pre-activation can reach 20 (below 88 the two agree to rounding anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SEModule
from torch import Tensor

from .block import Grid, tokens_to_map
from .linear_recurrence import _records, chunked_recurrence, linear_recurrence
from .scan_cpu import scan_d1, use_kernel
from .selective_scan import _acc, _mamba_scan_fn, selective_scan

__all__ = ["SelectiveScan2d"]


def _scan_flops(batch: int, dim: int, length: int, d_state: int, like: Tensor) -> None:
    """Emit the FLOP marker of one scan with ``D`` and no ``z`` (shapes only; expanded scalars, no memory)."""
    e = like.new_empty(())
    torch.ops.vitlab.selective_scan_flops(e.expand(batch, dim, length), e.expand(batch, d_state, length), True, False)


def _divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``max(cap, 1)``."""
    return next(t for t in range(max(min(cap, n), 1), 0, -1) if n % t == 0)


def _softplus_for(bias: Tensor, W: Tensor, dts: Tensor) -> Callable[[Tensor], Tensor]:
    """Softplus for ``bias + dts @ W`` (may work in place): ``log1p(exp(x))``, F.softplus's formula below its
    threshold 20, unless a pre-activation can pass 20 (a strict bound: ``bias + |W|^T max|dts|``)."""
    bound = (bias + W.abs().t() @ dts.abs().flatten(0, -2).amax(0)).max()
    return F.softplus if bound > 20 else lambda x: torch.exp(x, out=x).log1p_()


def _entering(decay: Tensor, h: Tensor) -> Tensor:
    """The state entering each chunk from the chunks' decays and end states (from 0), in sequence order."""
    h = linear_recurrence(decay, h)
    return torch.cat([torch.zeros_like(h[:1]), h[:-1]])


def _route_index(h: int, w: int, chunk: int, device: torch.device) -> Tensor:
    """Where each token of the half-scale sequence [rows reversed, columns, columns reversed] (the official route
    order) lies in the map stored column-major (index ``j * h + i``); cut into chunks of ``chunk`` and listed
    step-major: entry ``t * n + c`` is step ``t`` of chunk ``c``."""
    cols = torch.arange(h * w, device=device)
    rows = cols.view(w, h).t().reshape(-1)
    return torch.cat([rows.flip(0), cols, cols.flip(0)]).view(-1, chunk).t().reshape(-1)


def _conv_transposed(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Depthwise ``conv`` of a map stored transposed, ``(W, H, B, C)`` -> ``(W', H', B, C)``: batch folded into
    channels (one channels-last image of ``B C`` channels) and the kernel transposed."""
    W, H, B, C = x.shape
    weight = conv.weight.transpose(-1, -2).repeat(B, 1, 1, 1)
    bias = conv.bias.repeat(B) if conv.bias is not None else None
    x = x.reshape(1, W, H, B * C).permute(0, 3, 1, 2)
    x = F.conv2d(x, weight, bias, conv.stride[::-1], conv.padding[::-1], conv.dilation[::-1], B * C)
    return x.permute(0, 2, 3, 1).reshape(x.shape[2], x.shape[3], B, C)


class SelectiveScan2d(nn.Module):
    """Multi-scale 2-D selective scan (MSVMamba's MS2D mixer, Sec. 3.2): ``(B, H*W, C), grid -> same``.

    One scan runs over the full map (row-major); one 7x7 stride-2 depthwise conv makes a half-size map,
    scanned row-reversed, column-wise and column-reversed as a single sequence (the official code
    concatenates the three routes, so the state carries over), then merged back and bilinearly upsampled.
    Each branch has its own S6 parameters; a shared LayerNorm, an SE gate and SiLU(z) gating follow.

    Args:
        d_state: state size ``N`` (MSVMamba uses 1); ssm_ratio: inner width over ``dim``.
        dt_rank: rank of the ``dt`` projection; ``"auto"``: ``ceil(dim / 16)``.
        d_conv: the full-scale branch's depthwise kernel; ms_kernel_size/ms_stride: the half-scale one.
    """

    # Inference scans: at most _steps steps per chunk (fewer, larger steps), and only for maps of at least
    # _fused_min_numel inner activations (B L d): below that their many small ops cost more than they save.
    _steps, _fused_min_numel = 32, 1 << 18

    def __init__(
        self,
        dim: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        ms_kernel_size: int = 7,
        ms_stride: int = 2,
        conv_bias: bool = True,
        use_se: bool = True,
        act_layer: type[nn.Module] = nn.SiLU,
        proj_drop: float = 0.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        if dim < 1 or d_state < 1 or ssm_ratio <= 0:
            raise ValueError(f"dim, d_state and ssm_ratio must be positive, got {dim}, {d_state}, {ssm_ratio}")
        if dt_rank != "auto" and not (isinstance(dt_rank, int) and dt_rank > 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        d_inner = self.d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = rank = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, 1, (d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        pad = (ms_kernel_size - 1) // 2
        self.conv2d_b1 = nn.Conv2d(d_inner, d_inner, ms_kernel_size, ms_stride, pad, groups=d_inner, bias=conv_bias)
        # per branch k: x -> (dt low-rank, B, C); dt -> d_inner; A = -exp(A_logs); D skip (official names)
        self.x_proj_weight = nn.Parameter(torch.empty(2, rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(2, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(2, d_inner))
        self.A_logs = nn.Parameter(torch.empty(2 * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(2 * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.se = SEModule(d_inner, rd_channels=d_inner // 8, bias=False) if use_se else nn.Identity()
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters(dt_min, dt_max)

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 0.001, dt_max: float = 0.1) -> None:
        """Mamba's S6 init: S4D-real ``A = -(1..N)``, ``D = 1``, ``softplus(dt_bias)`` log-uniform in [min, max]."""
        bound = self.d_inner**-0.5  # nn.Linear's default for x_proj
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * math.log(dt_max / dt_min) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def _ssm(self, u: torch.Tensor, k: int) -> torch.Tensor:
        """Branch ``k``'s S6 over ``u (B, d_inner, L)`` by ``selective_scan`` -> normed ``(B, L, d_inner)``."""
        rank, n, d = self.dt_rank, self.d_state, self.d_inner
        x_dbl = torch.einsum("bdl,cd->bcl", u, self.x_proj_weight[k])  # (B, rank + 2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [rank, n, n], dim=1)
        dts = torch.einsum("brl,dr->bdl", dts, self.dt_projs_weight[k])  # (B, d_inner, L)
        A = -torch.exp(self.A_logs[k * d : (k + 1) * d].float())
        Ds, bias = self.Ds[k * d : (k + 1) * d], self.dt_projs_bias[k]
        y = selective_scan(u, dts, A, Bs, Cs, Ds, delta_bias=bias, delta_softplus=True)
        return self.out_norm(y.transpose(1, 2))

    def forward_routes(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``forward`` with the routes materialised as sequences for ``selective_scan`` (mamba_ssm's CUDA kernel)."""
        B = x.shape[0]
        H, W = grid
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = tokens_to_map(x, grid)  # (B, d_inner, H, W)
        y = self._ssm(self.act(self.conv2d(x)).flatten(2), 0)  # full scale, row-major: (B, H*W, d_inner)
        xs = self.act(self.conv2d_b1(x))  # (B, d_inner, h, w)
        h, w = xs.shape[-2:]
        cols = xs.transpose(2, 3).flatten(2)
        ys = self._ssm(torch.cat([xs.flatten(2).flip(-1), cols, cols.flip(-1)], dim=-1), 1)  # (B, 3hw, d_inner)
        row_r, col, col_r = ys.split(h * w, dim=1)
        ys = row_r.flip(1).unflatten(1, (h, w)) + (col + col_r.flip(1)).unflatten(1, (w, h)).transpose(1, 2)
        ys = F.interpolate(ys.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
        y = self.se(y.transpose(1, 2).reshape(B, self.d_inner, H, W) + ys)
        y = y.flatten(2).transpose(1, 2) * self.act(z)
        return self.proj_drop(self.out_proj(y))

    def _s6_params(self, k: int, u: Tensor, length: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Branch ``k``'s ``(dt_proj weight (rank, d), dt bias, A (d, N), D)`` in ``u``'s accumulation dtype; counts
        the scan of ``length`` tokens (default: all of ``u (..., B, d)``) for the FLOP counter."""
        d, batch = self.d_inner, u.shape[-2]
        _scan_flops(batch, d, length or u.numel() // (batch * d), self.d_state, like=u)
        A = -torch.exp(_acc(self.A_logs[k * d : (k + 1) * d], u))
        W, bias, D = self.dt_projs_weight[k].t(), self.dt_projs_bias[k], self.Ds[k * d : (k + 1) * d]
        return _acc(W, u), _acc(bias, u), A, _acc(D, u)

    def _s6(self, u: Tensor, x_dbl: Tensor, k: int) -> Tensor:
        """Branch ``k``'s S6 on chunks stored step-major, ``u (T, n, B, d)``, ``x_dbl = x_proj(u)`` -> normed y."""
        W, bias, A, D = self._s6_params(k, u)
        rank, N, dtype, u, x_dbl = self.dt_rank, self.d_state, u.dtype, _acc(u, u), _acc(x_dbl, u)
        dt = F.softplus(torch.matmul(x_dbl[..., :rank], W) + bias)  # (T, n, B, d)
        a = torch.exp(dt.unsqueeze(-1) * A)  # (T, n, B, d, N)
        h = chunked_recurrence(a, (dt * u).unsqueeze(-1) * x_dbl[..., None, rank : rank + N])
        y = (h * x_dbl[..., None, rank + N :]).sum(-1)
        return self.out_norm(torch.addcmul(y, u, D).to(dtype))

    def _s6_steps(self, u: Tensor, x_dbl: Tensor, k: int) -> Iterator[tuple[int, Tensor]]:
        """``_s6`` for ``d_state = 1`` without autograd, yielding ``(t, normed y[t] (m, n, B, d))`` step by step.

        ``u (T, m, n, B, d)``: ``m n`` chunks of ``T`` steps, chunk ``(j, i)`` being the ``i m + j``-th of the sequence.

        One step's slices at a time, so that they stay in cache: pass 1 scans every chunk from state 0 (storing
        the decays ``a`` and inputs ``b``), the chunk carries follow, pass 2 restarts the chunks from them.
        """
        (W, bias, A, D), rank = self._s6_params(k, u), self.dt_rank
        (T, m, n, B, d), dtype, u, x_dbl = u.shape, u.dtype, _acc(u, u), _acc(x_dbl, u).contiguous()
        xd = x_dbl.view(T, m * n * B, rank + 2)
        softplus = _softplus_for(bias, W, xd[..., :rank])
        a, b = u.new_empty(T, m, n, B, d), u.new_empty(T, m, n, B, d)
        h, h_next, decay = u.new_zeros(m, n, B, d), u.new_empty(m, n, B, d), u.new_ones(m, n, B, d)
        # per-step views made once (unbind), to keep the Python work per step small
        a_, b_, u_, Bs, Cs = (t.unbind(0) for t in (a, b, u, x_dbl[..., rank, None], x_dbl[..., rank + 1, None]))
        for t, dts in enumerate(xd[..., :rank].unbind(0)):
            dt = softplus(torch.addmm(bias, dts, W)).view(m, n, B, d)
            torch.exp(torch.mul(dt, A[:, 0]), out=a_[t])  # a_, b_ (streamed to memory) written once each
            torch.mul(dt.mul_(Bs[t]), u_[t], out=b_[t])
            h, h_next = torch.addcmul(b_[t], a_[t], h, out=h_next), h
            decay.mul_(a_[t])
        seq = lambda t: t.transpose(0, 1).reshape(n * m, B, d)  # noqa: E731  chunks in sequence order
        h = _entering(seq(decay), seq(h)).view(n, m, B, d).transpose(0, 1)
        norm = self.out_norm
        for t in range(T):
            h = torch.addcmul(b_[t], a_[t], h)
            y = torch.mul(h, Cs[t]).addcmul_(u_[t], D)
            yield t, F.layer_norm(y.to(dtype), (d,), norm.weight, norm.bias, norm.eps)

    def _s6_routes(self, u: Tensor, x_dbl: Tensor, idx: Tensor, T: int) -> Iterator[tuple[int, Tensor]]:
        """``_s6_steps`` of the half-scale branch, yielding ``(t, normed y[t] (n, B, d))``: the sequence is the map's
        pixels ``u (P, B, d)`` (``x_dbl = x_proj(u)``) in the order ``idx`` (step-major, ``T`` steps).

        ``dt``, decay, input and ``D u`` depend on the pixel only, so they are computed once per pixel (not once
        per route) and gathered at each step.
        """
        (W, bias, A, D), rank = self._s6_params(1, u, idx.numel()), self.dt_rank
        (P, B, d), dtype, u, x_dbl = u.shape, u.dtype, _acc(u, u), _acc(x_dbl, u)
        dt = torch.addmm(bias, x_dbl[..., :rank].reshape(P * B, rank), W).view(P, B, d)
        dt = _softplus_for(bias, W, x_dbl[..., :rank])(dt)
        a = torch.exp(dt * A[:, 0])
        b, du = dt.mul_(u).mul_(x_dbl[..., rank, None]), u * D
        idx_, n = idx.view(T, -1).unbind(0), idx.numel() // T
        Cs = x_dbl[..., rank + 1, None].index_select(0, idx).view(T, n, B, 1).unbind(0)
        h, decay = u.new_zeros(n, B, d), u.new_ones(n, B, d)
        for i in idx_:
            a_t = a.index_select(0, i)
            h = torch.addcmul(b.index_select(0, i), a_t, h)
            decay.mul_(a_t)
        h, norm = _entering(decay, h), self.out_norm
        for t, i in enumerate(idx_):
            h = torch.addcmul(b.index_select(0, i), a.index_select(0, i), h)
            y = torch.addcmul(du.index_select(0, i), h, Cs[t])
            yield t, F.layer_norm(y.to(dtype), (d,), norm.weight, norm.bias, norm.eps)

    def _kernel_scan(self, k: int, u: Tensor, rows: Tensor, out: Tensor, out_rows: Tensor) -> Tensor:
        """Branch ``k``'s S6 (``d_state = 1``) by the compiled CPU kernel over the pixels ``rows`` of ``u (P, B, d)``
        in sequence order, normed and added into ``out`` at ``out_rows``."""
        W, bias, A, D = self._s6_params(k, u, rows.numel())
        proj = F.linear(u, self.x_proj_weight[k])  # (P, B, rank + 2): dt's low-rank input, then B, C
        norm = (self.out_norm.weight, self.out_norm.bias, self.out_norm.eps)
        return scan_d1(proj, u, W.contiguous(), bias, A[:, 0].contiguous(), D, rows, out_rows, out, norm)

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("SelectiveScan2d needs grid=(H, W) of the tokens")
        if _mamba_scan_fn is not None and x.is_cuda:
            return self.forward_routes(x, grid)
        (B, L, C), (H, W), d = x.shape, grid, self.d_inner
        if L != H * W:
            raise ValueError(f"{L} tokens do not fill grid {tuple(grid)}")
        # maps stored transposed with the batch inside, (W, H, B, .): rows cut into chunks are then step-major.
        # Inference (d_state 1, not traced): the compiled scan, else (large maps: the softplus shortcut looks at
        # values) step-by-step scans in cache
        infer = self.d_state == 1 and x.device.type != "meta" and not _records(x, *self.parameters())
        kernel = infer and use_kernel(x, *self.parameters())
        fused = infer and not kernel and B * L * d >= self._fused_min_numel and not torch.compiler.is_compiling()
        act = partial(F.silu, inplace=True) if (fused or kernel) and type(self.act) is nn.SiLU else self.act
        x = x.reshape(B, H, W, C).permute(2, 1, 0, 3).contiguous()
        xm = F.linear(x, self.in_proj.weight[:d])
        u, us = act(_conv_transposed(self.conv2d, xm)), act(_conv_transposed(self.conv2d_b1, xm))
        # half scale: the three routes as one gathered sequence of 3hw tokens in n1 chunks, step-major
        w, h = us.shape[:2]
        T1 = _divisor(3 * h * w, self._steps)
        n1 = 3 * h * w // T1
        idx = _route_index(h, w, 1 if kernel else T1, x.device)  # kernel: one chunk, the sequence itself
        us = us.reshape(w * h, B, d)
        ys = torch.zeros_like(us)  # the routes summed back onto their pixels
        if kernel:
            self._kernel_scan(1, us, idx, ys, idx)
        elif fused:
            for t, y in self._s6_routes(us, F.linear(us, self.x_proj_weight[1]), idx, T1):
                ys.index_add_(0, idx[t * n1 : (t + 1) * n1], y)
        else:
            x_dbl = F.linear(us, self.x_proj_weight[1])
            args = (t.index_select(0, idx).view(T1, n1, B, -1) for t in (us, x_dbl))
            ys.index_add_(0, idx, self._s6(*args, 1).flatten(0, 1))
        ys = F.interpolate(ys.view(1, w, h, B * d).permute(0, 3, 1, 2), (W, H), mode="bilinear", align_corners=False)
        ys = ys.permute(0, 2, 3, 1).reshape(W, H, B, d)
        # full scale, then (y + up) * SiLU(z), and the SE gate's mean of y + up
        if kernel:  # row-major sequence over the map stored (W, H): token (i, j) is pixel row j H + i
            rows = torch.arange(W * H).view(W, H).t().reshape(-1)
            y = self._kernel_scan(0, u.view(W * H, B, d), rows, ys.view(W * H, B, d), rows).view(W, H, B, d)
            mean = y.mean((0, 1))
            y = y.mul_(act(F.linear(x, self.in_proj.weight[d:])))
        elif fused:
            T0 = _divisor(W, self._steps)  # each row cut into m chunks of T0 steps
            split = lambda t: t.view(W // T0, T0, H, B, -1).transpose(0, 1)  # noqa: E731  (T0, m, H, B, .)
            y, total = torch.empty_like(u), None
            ys_, x_, y_ = (split(t).unbind(0) for t in (ys, x, y))
            w_z = self.in_proj.weight[d:].t().expand(W // T0, -1, -1)  # z projected step by step, never stored whole
            for t, y_t in self._s6_steps(split(u), split(F.linear(u, self.x_proj_weight[0])), 0):
                y_t += ys_[t]
                total = y_t.clone() if total is None else total.add_(y_t)
                z_t = torch.bmm(x_[t].flatten(1, 2), w_z).view_as(y_t)
                torch.mul(y_t, act(z_t), out=y_[t])
            mean = total.sum((0, 1)) / L
        else:
            y, z = self._s6(u, F.linear(u, self.x_proj_weight[0]), 0) + ys, F.linear(x, self.in_proj.weight[d:])
            y, mean = y * self.act(z), y.mean((0, 1))
        weight = self.out_proj.weight
        if isinstance(self.se, SEModule):  # the gate scales channels: fold it into out_proj, per image
            se = self.se
            gate = se.gate(se.fc2(se.act(se.bn(se.fc1(mean[:, :, None, None]))))).flatten(1)  # (B, d)
            weight = weight * gate[:, None, :]
        y = torch.matmul(y.reshape(W * H, B, d).transpose(0, 1), weight.transpose(-1, -2))  # (B, W H, C)
        return self.proj_drop(y.view(B, W, H, C).transpose(1, 2).reshape(B, L, C))
