"""MSVMamba's multi-scale 2-D selective-scan mixer (MS2D), ``SelectiveScan2d``.

"Multi-Scale VMamba: Hierarchy in Hierarchy Visual State Space Model" (arXiv:2405.14174,
github.com/YuHengsss/MSVMamba), Sec. 3.2; the S6 scan itself is ``selective_scan.py``.

Layout: maps are stored transposed with the batch inside, ``(W, H, B, C)``, so that the row-major scan cut
into row chunks is already step-major (``(steps, chunks, B, C)``, ``chunked_recurrence`` with its own
backward) and each scan step reads one contiguous slice; the three half-scale routes are one index into the
half-size map (no flipped or concatenated copies); the SE gate scales channels, so it is folded into
``out_proj``. ``forward_routes`` writes the routes out as sequences for ``selective_scan``. Inference fast
paths (the compiled scan ``vitlab::scan_d1``, step-by-step chunked scans, mamba_ssm's CUDA kernel) live in
``layers/fast/`` behind ``fast_forward``.

Deviations: none in the function (it is the official one; tests compare the paths with the routes written
out, in fp64). Rounding differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SEModule
from torch import Tensor

from .block import Grid, tokens_to_map
from .fast import fast_forward
from .linear_recurrence import chunked_recurrence
from .selective_scan import _acc, selective_scan

__all__ = ["SelectiveScan2d"]


def _scan_flops(batch: int, dim: int, length: int, d_state: int, like: Tensor) -> None:
    """Emit the FLOP marker of one scan with ``D`` and no ``z`` (shapes only; expanded scalars, no memory)."""
    e = like.new_empty(())
    torch.ops.vitlab.selective_scan_flops(e.expand(batch, dim, length), e.expand(batch, d_state, length), True, False)


def _divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``max(cap, 1)``."""
    return next(t for t in range(max(min(cap, n), 1), 0, -1) if n % t == 0)


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

    _steps = 32  # at most this many steps per chunk of the half-scale scan (fewer, larger steps)

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

    def _s6_params(self, k: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Branch ``k``'s ``(dt_proj weight (rank, d), dt bias, A (d, N), D)`` in ``u``'s accumulation dtype."""
        d = self.d_inner
        A = -torch.exp(_acc(self.A_logs[k * d : (k + 1) * d], u))
        W, bias, D = self.dt_projs_weight[k].t(), self.dt_projs_bias[k], self.Ds[k * d : (k + 1) * d]
        return _acc(W, u), _acc(bias, u), A, _acc(D, u)

    def _count_scan(self, u: Tensor, length: int | None = None) -> None:
        """Count a scan of ``length`` tokens (default: all of ``u (..., B, d)``) for the FLOP counter."""
        batch = u.shape[-2]
        _scan_flops(batch, self.d_inner, length or u.numel() // (batch * self.d_inner), self.d_state, like=u)

    def _s6(self, u: Tensor, x_dbl: Tensor, k: int) -> Tensor:
        """Branch ``k``'s S6 on chunks stored step-major, ``u (T, n, B, d)``, ``x_dbl = x_proj(u)`` -> normed y."""
        self._count_scan(u)
        W, bias, A, D = self._s6_params(k, u)
        rank, N, dtype, u, x_dbl = self.dt_rank, self.d_state, u.dtype, _acc(u, u), _acc(x_dbl, u)
        dt = F.softplus(torch.matmul(x_dbl[..., :rank], W) + bias)  # (T, n, B, d)
        a = torch.exp(dt.unsqueeze(-1) * A)  # (T, n, B, d, N)
        h = chunked_recurrence(a, (dt * u).unsqueeze(-1) * x_dbl[..., None, rank : rank + N])
        y = (h * x_dbl[..., None, rank + N :]).sum(-1)
        return self.out_norm(torch.addcmul(y, u, D).to(dtype))

    def _maps(self, x: Tensor, grid: Grid, act: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens ``(B, H W, C)`` -> the input and both branches' activated conv maps, stored transposed:
        ``x (W, H, B, C)``, ``u (W, H, B, d)`` at full scale, ``us (w, h, B, d)`` at half scale."""
        (B, _, C), (H, W), d = x.shape, grid, self.d_inner
        x = x.reshape(B, H, W, C).permute(2, 1, 0, 3).contiguous()
        xm = F.linear(x, self.in_proj.weight[:d])
        return x, act(_conv_transposed(self.conv2d, xm)), act(_conv_transposed(self.conv2d_b1, xm))

    def _half_scale_chunks(self, us: Tensor, chunked: bool = True) -> tuple[Tensor, Tensor, int]:
        """The half-scale routes as one gathered sequence: ``(pixels (w h, B, d), idx, T)``, ``idx`` listing for
        each of the 3 h w tokens its pixel: in ``T``-step chunks listed step-major, or in sequence order."""
        w, h, B, d = us.shape
        T = _divisor(3 * h * w, self._steps)
        return us.reshape(w * h, B, d), _route_index(h, w, T if chunked else 1, us.device), T

    def _upsample(self, ys: Tensor, half: tuple[int, int], grid: Grid) -> Tensor:
        """The half-scale pixels ``(w h, B, d)`` bilinearly upsampled to the full map, ``(W, H, B, d)``."""
        (w, h), (H, W), (_, B, d) = half, grid, ys.shape
        ys = F.interpolate(ys.view(1, w, h, B * d).permute(0, 3, 1, 2), (W, H), mode="bilinear", align_corners=False)
        return ys.permute(0, 2, 3, 1).reshape(W, H, B, d)

    def _project(self, y: Tensor, mean: Tensor) -> Tensor:
        """``out_proj(se(y))`` of the gated map ``y (W, H, B, d)``, the SE gate (from the mean ``(B, d)`` of
        ``y + up`` before gating) folded into ``out_proj`` per image -> tokens ``(B, H W, C)``."""
        (W, H, B, d), C = y.shape, self.out_proj.out_features
        weight = self.out_proj.weight
        if isinstance(self.se, SEModule):  # the gate scales channels: fold it into out_proj, per image
            se = self.se
            gate = se.gate(se.fc2(se.act(se.bn(se.fc1(mean[:, :, None, None]))))).flatten(1)  # (B, d)
            weight = weight * gate[:, None, :]
        y = torch.matmul(y.reshape(W * H, B, d).transpose(0, 1), weight.transpose(-1, -2))  # (B, W H, C)
        return self.proj_drop(y.view(B, W, H, C).transpose(1, 2).reshape(B, W * H, C))

    def forward(self, x: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        if grid is None:
            raise ValueError("SelectiveScan2d needs grid=(H, W) of the tokens")
        if x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{x.shape[1]} tokens do not fill grid {tuple(grid)}")
        if (out := fast_forward(self, x, grid)) is not None:
            return out
        B, d = x.shape[0], self.d_inner
        x, u, us = self._maps(x, grid, self.act)
        # half scale: the three routes gathered as one sequence in chunks, scanned, summed back onto their pixels
        half = us.shape[:2]
        us, idx, T = self._half_scale_chunks(us)
        args = (t.index_select(0, idx).view(T, -1, B, t.shape[-1]) for t in (us, F.linear(us, self.x_proj_weight[1])))
        ys = torch.zeros_like(us).index_add_(0, idx, self._s6(*args, 1).flatten(0, 1))
        # full scale (row-major: rows are the chunks), plus the upsampled branch, gated by act(z)
        y = self._s6(u, F.linear(u, self.x_proj_weight[0]), 0) + self._upsample(ys, half, grid)
        z = F.linear(x, self.in_proj.weight[d:])
        return self._project(y * self.act(z), y.mean((0, 1)))
