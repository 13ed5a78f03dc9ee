"""Selective scan (S6): the chunked linear recurrence and the vectorised scan against step-by-step references,
FLOP counting, the MS2D mixer (readable forward, autograd, and its chunked inference fast path) against its routes
written out. The compiled scan: test_fast_scan.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vitlab.layers import (
    MIXERS,
    SelectiveScan2d,
    fast_paths,
    fast_paths_taken,
    selective_scan,
    selective_scan_macs,
    selective_scan_ref,
)
from vitlab.layers.fast import scan as fast_scan
from vitlab.layers.linear_recurrence import chunked_recurrence, linear_recurrence
from vitlab.layers.selective_scan import selective_scan_torch


def _loop_recurrence(a, b):
    h, hs = torch.zeros_like(b[0]), []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        hs.append(h)
    return torch.stack(hs)


@pytest.mark.parametrize(
    ("length", "chunk_size"),
    [(1, None), (32, None), (33, None), (1100, None), (37, 4), (150, 4), (64, 8)],  # 1100, 150: carries recurse
)
def test_linear_recurrence_equals_loop(length, chunk_size):
    a, b = torch.rand(length, 2, 3, dtype=torch.float64), torch.randn(length, 2, 3, dtype=torch.float64)
    expected = _loop_recurrence(a, b)
    with torch.no_grad():  # in place on its inputs (copies here)
        torch.testing.assert_close(linear_recurrence(a.clone(), b.clone(), chunk_size), expected, rtol=1e-12, atol=0)
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = linear_recurrence(a, b, chunk_size)  # autograd records: on copies, backward by the reversed scan
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    grad = lambda h: torch.autograd.grad(h.square().sum(), (a, b), allow_unused=True, materialize_grads=True)  # noqa: E731
    for g, g_ref in zip(grad(out), grad(_loop_recurrence(a, b)), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_chunked_recurrence_runs_chunks_in_order_and_checks_shapes():
    a, b = torch.rand(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 3, dtype=torch.float64)  # 4 chunks of 5
    expected = _loop_recurrence(a.transpose(0, 1).flatten(0, 1), b.transpose(0, 1).flatten(0, 1))
    out = chunked_recurrence(a.clone(), b.clone()).transpose(0, 1).flatten(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="a and b"):
        chunked_recurrence(a, b[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_recurrence(a, b, chunk_size=1)


def _inputs(batch=2, dim=6, length=37, d_state=3, groups=None, dtype=torch.float64, requires_grad=False):
    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    t = {
        "u": torch.randn(batch, dim, length, dtype=dtype),
        "delta": torch.randn(batch, dim, length, dtype=dtype),
        "A": -torch.rand(dim, d_state, dtype=dtype) * 8,
        "B": torch.randn(bc_shape, dtype=dtype),
        "C": torch.randn(bc_shape, dtype=dtype),
        "D": torch.randn(dim, dtype=dtype),
        "z": torch.randn(batch, dim, length, dtype=dtype),
        "delta_bias": torch.randn(dim, dtype=dtype),
    }
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


@pytest.mark.parametrize(
    ("length", "groups", "chunk_size", "optional"),
    [
        (37, None, 4, True),  # two levels of chunk carries, padded last chunk
        (5, None, 16, False),  # shorter than one chunk, no D / z / delta_bias
        (64, 2, 8, True),  # grouped B and C, exact multiple of the chunk
        (150, 2, 4, True),  # 38 chunks: the chunk carries are chunked again
        (90, None, None, True),  # default chunking
        (1, 3, 16, True),
    ],
)
def test_vectorised_scan_equals_reference(length, groups, chunk_size, optional):
    t = _inputs(length=length, groups=groups)
    if not optional:
        t.update(D=None, z=None, delta_bias=None)
    ref = selective_scan_ref(**t, delta_softplus=optional)
    out = selective_scan_torch(**t, delta_softplus=optional, chunk_size=chunk_size)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_reference_equals_closed_form_without_decay():
    # A = 0: no decay, so h_t = sum_{s<=t} dt_s B_s u_s and y_t = C_t h_t + D u_t
    t = _inputs(dim=4, d_state=2, length=9, groups=None)
    t.update(A=torch.zeros(4, 2, dtype=torch.float64), z=None, delta_bias=None)
    h = torch.cumsum(t["delta"][:, :, None] * t["u"][:, :, None] * t["B"][:, None], dim=-1)  # (b, dim, N, L)
    expected = (h * t["C"][:, None]).sum(2) + t["u"] * t["D"][:, None]
    torch.testing.assert_close(selective_scan_ref(**t), expected)


def test_gradients_equal_reference():
    t = _inputs(dim=3, d_state=2, length=21, groups=None, requires_grad=True)
    grads = []
    for fn in (selective_scan_ref, lambda **kw: selective_scan_torch(**kw, chunk_size=4)):
        out = fn(**t, delta_softplus=True)
        grads.append(torch.autograd.grad(out.square().sum(), list(t.values())))
    for name, g_ref, g in zip(t, *grads, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=name)


def test_long_fp32_scan_is_stable_and_accurate():
    # strong decays (dt * A down to about -80 per step) over 4096 tokens: no overflow, fp32 close to fp64
    t = _inputs(batch=1, dim=2, d_state=1, length=4096, groups=None, dtype=torch.float64)
    t["delta"] = t["delta"] * 3
    t["A"] = torch.tensor([[-16.0], [-0.01]], dtype=torch.float64)
    ref = selective_scan_ref(**t, delta_softplus=True)
    out = selective_scan_torch(**{k: v.float() for k, v in t.items()}, delta_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


def test_dispatch_equals_torch_scan_and_counts_vmamba_flops():
    t = _inputs(batch=2, dim=6, length=10, d_state=3, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = selective_scan(**t, delta_softplus=True)
    torch.testing.assert_close(out, selective_scan_torch(**t, delta_softplus=True))
    # 9 BLDN + BDL (D) + BDL (z) multiply-accumulates, 2 FLOPs each; nothing else in the scan is a matmul
    assert counter.get_total_flops() == 2 * (9 * 2 * 10 * 6 * 3 + 2 * 2 * 6 * 10)
    assert selective_scan_macs(2, 10, 6, 3, with_d=False) == 9 * 2 * 10 * 6 * 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"u": torch.randn(2, 6)}, "u must be"),
        ({"delta": torch.randn(2, 6, 9)}, "delta must"),
        ({"A": torch.randn(5, 3)}, "A must be"),
        ({"B": torch.randn(2, 4, 10)}, "B must be"),
        ({"C": torch.randn(2, 4, 3, 10)}, "B and C need the same number of groups"),
        ({"D": torch.randn(5)}, "D must be"),
        ({"delta_bias": torch.randn(6, 1)}, "delta_bias must be"),
        ({"z": torch.randn(2, 6, 11)}, "z must have"),
    ],
)
def test_bad_inputs_are_named(change, match):
    t = {**_inputs(batch=2, dim=6, length=10, d_state=3, dtype=torch.float32), **change}
    with pytest.raises(ValueError, match=match):
        selective_scan(**t)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_torch(**_inputs(dtype=torch.float32), chunk_size=1)


def _naive_ms2d(m: SelectiveScan2d, x: torch.Tensor, grid) -> torch.Tensor:
    """MS2D written out with explicit route index lists and the step-by-step scan."""
    H, W = grid
    x, z = m.in_proj(x).chunk(2, dim=-1)
    x = x.transpose(1, 2).reshape(x.shape[0], -1, H, W)

    def ssm(u, k):
        d, r, n = m.d_inner, m.dt_rank, m.d_state
        dbl = torch.einsum("bdl,cd->bcl", u, m.x_proj_weight[k])
        dt = torch.einsum("brl,dr->bdl", dbl[:, :r], m.dt_projs_weight[k])
        A = -torch.exp(m.A_logs[k * d : (k + 1) * d])
        args = (dbl[:, r : r + n], dbl[:, r + n :], m.Ds[k * d : (k + 1) * d])
        y = selective_scan_ref(u, dt, A, *args, delta_bias=m.dt_projs_bias[k], delta_softplus=True)
        return m.out_norm(y.transpose(1, 2))  # (B, L, d)

    y = ssm(F.silu(m.conv2d(x)).flatten(2), 0).reshape(x.shape[0], H, W, -1)
    xs = F.silu(m.conv2d_b1(x))
    h, w = xs.shape[-2:]
    rows = [(i, j) for i in range(h) for j in range(w)]
    cols = [(i, j) for j in range(w) for i in range(h)]
    routes = [rows[::-1], cols, cols[::-1]]
    seq = torch.stack([xs[:, :, i, j] for route in routes for i, j in route], dim=-1)
    ys = ssm(seq, 1)
    merged = x.new_zeros(x.shape[0], h, w, m.d_inner)
    for pos, (i, j) in enumerate(p for route in routes for p in route):
        merged[:, i, j] += ys[:, pos]
    up = F.interpolate(merged.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
    y = m.se(y.permute(0, 3, 1, 2) + up).flatten(2).transpose(1, 2) * F.silu(z)
    return m.out_proj(y)


@pytest.mark.parametrize(
    ("grid", "d_state"), [((4, 6), 1), ((5, 3), 1), ((2, 7), 1), ((1, 1), 1), ((4, 6), 2), ((5, 3), 2)]
)
def test_ms2d_mixer_equals_naive_routes(grid, d_state, monkeypatch):
    # fp64 throughout: every path must compute the official function, not just come close in fp32
    m = SelectiveScan2d(8, d_state=d_state).double().eval()
    m._steps = 2  # several chunks per row and per route
    monkeypatch.setattr(fast_scan, "CHUNKED_MIN_NUMEL", 0)  # the chunked fast path however small the map
    x = torch.randn(2, grid[0] * grid[1], 8, dtype=torch.float64)
    with torch.no_grad():
        expected = _naive_ms2d(m, x, grid)
        torch.testing.assert_close(m.forward_routes(x, grid), expected, rtol=1e-10, atol=1e-10)
        with fast_paths(False):
            torch.testing.assert_close(m(x, grid), expected, rtol=1e-10, atol=1e-10)
        with fast_paths(True), fast_paths_taken() as taken, monkeypatch.context() as patch:
            patch.setattr(m, "_s6", _forbidden)  # d_state 1: the step-by-step scans, never the vectorised one
            if d_state == 1:
                torch.testing.assert_close(m(x, grid), expected, rtol=1e-10, atol=1e-10)
        assert taken == ({"msvmamba_scan_chunked": 1} if d_state == 1 else {})
    # autograd records: the vectorised path, whose scan has its own backward; values and gradients
    x.requires_grad_(True)
    params = [x, *m.parameters()]
    out = m(x, grid)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), params)
    for g, g_ref in zip(grads, torch.autograd.grad(_naive_ms2d(m, x, grid).square().sum(), params), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def _forbidden(*args, **kwargs):
    raise AssertionError("the inference forward took the vectorised scan")


def test_ms2d_chunked_path_gates_with_the_configured_activation(monkeypatch):
    # the step-by-step path projects z step by step and gates it; with GELU it must match the routes written out
    m = SelectiveScan2d(8, act_layer=nn.GELU).double().eval()
    m._steps, m._s6 = 2, _forbidden
    monkeypatch.setattr(fast_scan, "CHUNKED_MIN_NUMEL", 0)
    x = torch.randn(2, 4 * 6, 8, dtype=torch.float64)
    with torch.no_grad(), fast_paths(True):
        torch.testing.assert_close(m(x, (4, 6)), m.forward_routes(x, (4, 6)), rtol=1e-10, atol=1e-10)


def test_ms2d_chunked_path_on_a_larger_map_and_past_the_softplus_threshold(monkeypatch):
    m = SelectiveScan2d(8).eval()
    monkeypatch.setattr(fast_scan, "CHUNKED_MIN_NUMEL", 0)
    monkeypatch.setattr(fast_scan, "_built", False)  # float32 on CPU: the compiled scan would run first
    with torch.no_grad():
        m.dt_projs_bias[:, :3] = 30.0  # some dt pre-activations past softplus' threshold 20 (there dt = x)
    x = torch.randn(2, 12 * 10, 8)
    with torch.no_grad(), fast_paths(True):
        expected = _naive_ms2d(m.double(), x.double(), (12, 10)).float()
        m.float()
        m._s6 = _forbidden  # the step-by-step scans only
        torch.testing.assert_close(m(x, (12, 10)), expected, rtol=1e-4, atol=1e-5)
        with FlopCounterMode(display=False) as counter:
            m(x, (12, 10))
    # the inference path counts the same scans: 120 tokens at full scale, 3 routes x 6x5 at half scale
    scan = counter.get_flop_counts()["Global"][torch.ops.vitlab.selective_scan_flops]
    assert scan == 2 * (selective_scan_macs(2, 120, 16, 1) + selective_scan_macs(2, 90, 16, 1))


def test_ms2d_mixer_grads_flops_meta_and_errors():
    m = SelectiveScan2d(16)
    assert MIXERS["selective_scan_2d"] is SelectiveScan2d
    x = torch.randn(2, 7 * 5, 16)
    with FlopCounterMode(display=False) as counter:
        out = m(x, (7, 5))
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # both branches' scans are counted: 35 tokens at full scale, 3 routes x 4x3 tokens at half scale
    scan = counter.get_flop_counts()["Global"][torch.ops.vitlab.selective_scan_flops]
    assert scan == 2 * (selective_scan_macs(2, 35, 32, 1) + selective_scan_macs(2, 36, 32, 1))
    with torch.device("meta"):
        assert SelectiveScan2d(16)(torch.empty(1, 12, 16), (3, 4)).shape == (1, 12, 16)
    with pytest.raises(ValueError, match="grid"):
        m(x)
    with pytest.raises(ValueError, match="do not fill grid"):
        m(x, (4, 4))
    with pytest.raises(ValueError, match="dt_rank"):
        SelectiveScan2d(16, dt_rank=0)
    with pytest.raises(ValueError, match="d_state"):
        SelectiveScan2d(16, d_state=0)
