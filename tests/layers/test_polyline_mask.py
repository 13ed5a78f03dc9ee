"""Polyline path masks against a path-walking construction; masked attention against explicit softmax."""

import copy

import pytest
import torch
from timm.layers import apply_rot_embed
from torch.utils.flop_counter import FlopCounterMode

from vitlab.layers import MIXERS, polyline_mask
from vitlab.layers.polyline_mask import (
    AxialPolylinePathAttention,
    PolylinePathAttention,
    _rope_sin_cos,
    _rotate_pairs,
    polyline_path_mask,
    segment_sum,
)


def _walk(alpha, beta, start, end, horizontal_first):
    """Sum of the log-decays of every token stepped onto along the L-shaped path from start to end."""
    (i, j), (k, m) = start, end
    total = 0.0
    if horizontal_first:  # along row i from column j to m, then down column m from row i to k
        for c in range(min(j, m) + 1, max(j, m) + 1):
            total += alpha[i, c]
        for r in range(min(i, k) + 1, max(i, k) + 1):
            total += beta[r, m]
    else:  # along column j from row i to k, then row k from column j to m
        for r in range(min(i, k) + 1, max(i, k) + 1):
            total += beta[r, j]
        for c in range(min(j, m) + 1, max(j, m) + 1):
            total += alpha[k, c]
    return total


def _naive_mask(alpha, beta, horizontal_first=True):
    H, W = alpha.shape
    cells = [(i, j) for i in range(H) for j in range(W)]
    return torch.tensor([[_walk(alpha, beta, a, b, horizontal_first) for b in cells] for a in cells])


def test_segment_sum_matches_loops():
    x = torch.randn(3, 6, dtype=torch.float64)
    ref = torch.tensor(
        [[[x[b, min(i, j) + 1 : max(i, j) + 1].sum() for j in range(6)] for i in range(6)] for b in range(3)]
    )
    torch.testing.assert_close(segment_sum(x), ref.double())


@pytest.mark.parametrize("grid", [(3, 4), (4, 2), (1, 5)])
def test_mask_equals_path_walk_and_transpose_is_the_other_path(grid):
    torch.manual_seed(0)
    alpha, beta = -torch.rand(*grid, dtype=torch.float64), -torch.rand(*grid, dtype=torch.float64)
    mask = polyline_path_mask(alpha, beta)
    torch.testing.assert_close(mask, _naive_mask(alpha, beta, True).double())
    torch.testing.assert_close(mask.T, _naive_mask(alpha, beta, False).double())
    assert torch.all(mask.diagonal() == 0)
    transposed = polyline_path_mask(alpha[None, None], beta[None, None], transposed=True)  # built, not a view
    assert transposed.is_contiguous()
    torch.testing.assert_close(transposed[0, 0], _naive_mask(alpha, beta, False).double())


def test_mask_batched_and_manhattan_for_constant_decays():
    # constant decays a, b: both polylines cost a * |dj| + b * |di|, a symmetric Manhattan mask
    alpha, beta = torch.full((2, 3, 4, 5), -0.3), torch.full((2, 3, 4, 5), -0.7)
    mask = polyline_path_mask(alpha, beta)
    assert mask.shape == (2, 3, 20, 20)
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    ii, jj = ii.flatten(), jj.flatten()
    ref = -0.3 * (jj[:, None] - jj[None]).abs() - 0.7 * (ii[:, None] - ii[None]).abs()
    torch.testing.assert_close(mask, ref.expand(2, 3, 20, 20).float())
    with pytest.raises(ValueError, match="alpha and beta"):
        polyline_path_mask(alpha, beta[..., :4])


def _softmax_attn(q, k, v, bias):
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


def _qkv_lepe(m, x, grid):
    B, N, C = x.shape
    q, k, v = m.qkv(x).view(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    sin, cos = _rope_sin_cos(N, m.head_dim, x.device)
    vmap = v.transpose(1, 2).reshape(B, N, C).transpose(1, 2).reshape(B, C, *grid)
    lepe = m.lepe(vmap).flatten(2).transpose(1, 2)
    return apply_rot_embed(q, sin, cos), apply_rot_embed(k, sin, cos), v, lepe


@pytest.mark.parametrize("chunk", [1 << 22, 3 * 144], ids=["one_chunk", "three_slices_per_chunk"])
def test_full_attention_equals_explicit_softmax_of_both_paths(chunk, monkeypatch):
    monkeypatch.setattr(polyline_mask, "_CHUNK", chunk)  # 2 images x 2 heads: one chunk, or 3 + 1 slices
    torch.manual_seed(0)
    m = PolylinePathAttention(16, num_heads=2).eval()
    grid = (3, 4)
    x = torch.randn(2, 12, 16)
    alpha, beta = m.log_decays(x, grid)
    assert (alpha <= 0).all()
    assert (beta <= 0).all()
    q, k, v, lepe = _qkv_lepe(m, x, grid)
    mask = polyline_path_mask(alpha, beta)
    out = 0.5 * (_softmax_attn(q, k, v, mask) + _softmax_attn(q, k, v, mask.transpose(-1, -2)))
    ref = m.proj(out.transpose(1, 2).reshape(2, 12, 16) + lepe)
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid), ref, atol=1e-5, rtol=1e-4)


def test_axial_attention_equals_explicit_criss_cross():
    torch.manual_seed(0)
    m = AxialPolylinePathAttention(16, num_heads=2).eval()
    H, W = 3, 4
    x = torch.randn(2, 12, 16)
    alpha, beta = m.log_decays(x, (H, W))
    q, k, v, lepe = (t.detach() for t in _qkv_lepe(m, x, (H, W)))
    q, k, v = (t.reshape(2, 2, H, W, 8) for t in (q, k, v))
    row_bias = segment_sum(alpha)[..., None, :, :]  # (B, h, H, 1, W, W)
    col_bias = segment_sum(beta.transpose(-1, -2))  # (B, h, W, H, H)
    # explicit per-row / per-column attention matrices
    a_row = (torch.einsum("bhiwd,bhivd->bhiwv", q, k) * 8**-0.5 + row_bias[..., 0, :, :]).softmax(-1)
    a_col = (torch.einsum("bhiwd,bhkwd->bhwik", q, k) * 8**-0.5 + col_bias).softmax(-1)

    def by_rows(t):
        return torch.einsum("bhiwv,bhivd->bhiwd", a_row, t)

    def by_cols(t):
        return torch.einsum("bhwik,bhkwd->bhiwd", a_col, t)

    out = 0.5 * (by_cols(by_rows(v)) + by_rows(by_cols(v)))
    ref = m.proj(out.reshape(2, 2, 12, 8).transpose(1, 2).reshape(2, 12, 16) + lepe)
    with torch.no_grad():
        torch.testing.assert_close(m(x, (H, W)), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [PolylinePathAttention, AxialPolylinePathAttention])
def test_mixers_any_grid_grad_and_errors(cls):
    assert MIXERS["polyline_attention"] is PolylinePathAttention
    m = cls(16, num_heads=4)
    for grid in [(2, 2), (3, 5)]:
        x = torch.randn(2, grid[0] * grid[1], 16, requires_grad=True)
        y = m(x, grid)
        assert y.shape == x.shape
        y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 5, 16), (2, 2))
    with pytest.raises(ValueError, match="num_heads"):
        cls(18, num_heads=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotate_pairs_equals_timm_rope(dtype):
    # the complex-multiply RoPE (float32/64) equals timm's interleaved rotation, on a strided q/k slice of qkv
    torch.manual_seed(0)
    sin, cos = _rope_sin_cos(12, 8, torch.device("cpu"))
    sin, cos = sin[:, None, None] * torch.tensor([0.5, 1.0])[:, None, None], cos[:, None, None]  # (N, 2, 1, d)
    qk = torch.randn(2, 12, 3, 4, 8, dtype=dtype)[:, :, :2]  # (B, N, q/k, heads, d) view, as in forward
    out = _rotate_pairs(qk, sin, cos)
    assert out.dtype == dtype
    torch.testing.assert_close(out, apply_rot_embed(qk, sin, cos))


@pytest.mark.parametrize("cls", [PolylinePathAttention, AxialPolylinePathAttention])
def test_score_matrices_computed_once_as_official(cls):
    # attention MACs of the official code: full, q kᵀ once for both paths and one product with v;
    # criss-cross, q kᵀ once per axis and four products with v (two per polyline)
    B, C, (H, W) = 2, 16, (3, 5)
    m = cls(C, num_heads=2).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(B, H * W, C), (H, W))
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if op in (torch.ops.aten.bmm, torch.ops.aten.baddbmm))
    full = cls is PolylinePathAttention
    macs = 2 * B * (H * W) ** 2 * C if full else 3 * B * C * (H * W * W + W * H * H)
    assert matmuls == 2 * macs


@pytest.mark.parametrize("cls", [PolylinePathAttention, AxialPolylinePathAttention])
def test_bfloat16_module_close_to_float32(cls):
    torch.manual_seed(0)
    m = cls(16, num_heads=2).eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        ref = m(x, (3, 4))
        out = copy.deepcopy(m).to(torch.bfloat16)(x.bfloat16(), (3, 4))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
