"""Multi-scale deformable attention: equal to HF transformers' pure-PyTorch op (values and gradients), analytic
sampling properties, the module's masking / box / ratio semantics, torch.export, and input errors."""

import pytest
import torch

from vitlab.layers import (
    MultiScaleDeformableAttention,
    flatten_levels,
    multi_scale_deformable_attention,
    reference_points_for,
)

SHAPES = [(6, 9), (3, 5), (2, 2)]  # three levels, non-square, fine to coarse


def _inputs(shapes=SHAPES, B=2, Q=7, H=2, D=4, P=3, dtype=torch.float64, spread=(-0.2, 1.2)):
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, H, D, dtype=dtype)
    lo, hi = spread
    locations = (torch.rand(B, Q, H, L, P, 2, dtype=dtype) * (hi - lo) + lo).clamp_(lo, hi)
    weights = torch.rand(B, Q, H, L * P, dtype=dtype).softmax(-1).view(B, Q, H, L, P)
    return value, locations, weights


def _hf_op(value, shapes, locations, weights):
    pytest.importorskip("transformers")
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention as HFOp

    shapes_t = torch.tensor(shapes)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    return HFOp()(value, shapes_t, list(shapes), starts, locations, weights, 64)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_hf_values_and_gradients(dtype, tol):
    inputs = _inputs(dtype=dtype)
    assert (inputs[1] < 0).any()
    assert (inputs[1] > 1).any()
    grad_out = torch.randn(2, 7, 8, dtype=dtype)
    results = []
    for op in (multi_scale_deformable_attention, _hf_op):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = op(leaves[0], SHAPES, leaves[1], leaves[2])
        (out * grad_out).sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


def test_gradcheck():
    value, locations, weights = (t.requires_grad_() for t in _inputs(B=1, Q=3, H=2, D=2, P=2))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, SHAPES, loc, w), (value, locations, weights)
    )


def test_pixel_centre_reads_that_pixel_and_one_hot_weights_pick_one_level():
    value, locations, _ = _inputs(B=1, Q=1, H=2, P=3)
    starts = [0, 54, 69]
    for level, (h, w) in enumerate(SHAPES):
        y, x = h - 1, w // 2
        locations[..., level, 1, :] = torch.tensor([(x + 0.5) / w, (y + 0.5) / h], dtype=value.dtype)
        weights = torch.zeros(1, 1, 2, 3, 3, dtype=value.dtype)
        weights[..., level, 1] = 1.0
        out = multi_scale_deformable_attention(value, SHAPES, locations, weights)
        torch.testing.assert_close(out.view(2, -1), value[0, starts[level] + y * w + x])


def test_zero_padding_outside_and_half_at_the_border():
    value = torch.randn(1, 4, 1, 3)  # one 2x2 level
    weights = torch.ones(1, 3, 1, 1, 1)
    # the left edge of pixel (0, 0) is half pixel (0, 0) and half zero padding; far outside reads zeros
    locations = torch.tensor([[0.25, 0.25], [0.0, 0.25], [-1.0, 0.5]]).view(1, 3, 1, 1, 1, 2)
    out = multi_scale_deformable_attention(value, [(2, 2)], locations, weights)
    torch.testing.assert_close(out[0], torch.stack([value[0, 0, 0], value[0, 0, 0] / 2, torch.zeros(3)]))


def test_tensor_shapes_and_bfloat16():
    value, locations, weights = _inputs(dtype=torch.float32)
    ref = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    torch.testing.assert_close(multi_scale_deformable_attention(value, torch.tensor(SHAPES), locations, weights), ref)
    low = multi_scale_deformable_attention(value.bfloat16(), SHAPES, locations, weights.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


def test_function_traces_with_fx():
    value, locations, weights = _inputs(dtype=torch.float32)
    traced = torch.fx.symbolic_trace(
        lambda v, loc, w: multi_scale_deformable_attention(v, SHAPES, loc, w),
    )
    expected = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    torch.testing.assert_close(traced(value, locations, weights), expected)


def test_reference_points_match_hf_and_flatten_levels():
    pytest.importorskip("transformers")
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrEncoder

    ratios = torch.rand(2, 3, 2) * 0.5 + 0.5
    ours = reference_points_for(SHAPES, ratios)
    torch.testing.assert_close(ours, DeformableDetrEncoder.get_reference_points(SHAPES, ratios, "cpu"))
    plain = reference_points_for(torch.tensor(SHAPES))
    torch.testing.assert_close(plain, DeformableDetrEncoder.get_reference_points(SHAPES, torch.ones(1, 3, 2), "cpu"))
    maps = [torch.randn(2, 5, h, w) for h, w in SHAPES]
    tokens, shapes = flatten_levels(maps)
    assert shapes == SHAPES
    assert tokens.shape == (2, 73, 5)
    torch.testing.assert_close(tokens[:, 54:69], maps[1].flatten(2).transpose(1, 2))


def _module(dim=16, heads=2, levels=3, points=2, ratio=1.0):
    m = MultiScaleDeformableAttention(dim, heads, levels, points, value_ratio=ratio)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.5)  # Deformable DETR zeroes these; spread the points
    torch.nn.init.normal_(m.attention_weights.weight)
    return m


def test_module_init():
    m = MultiScaleDeformableAttention(8, num_heads=4, num_levels=2, num_points=3)
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = directions[:, None, None] * torch.tensor([1.0, 2.0, 3.0])[:, None]  # (heads, 1, points, 2)
    torch.testing.assert_close(bias, expected.expand(4, 2, 3, 2), atol=1e-6, rtol=0)
    assert not m.sampling_offsets.weight.any()
    assert not m.attention_weights.weight.any()


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_module_shape_and_padding_mask(ratio):
    m = _module(ratio=ratio)
    assert m.value_proj.out_features == int(16 * ratio)
    assert m.head_dim == int(16 * ratio) // 2
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 73, 16)
    ref = torch.rand(2, 5, 3, 2)
    mask = torch.zeros(2, 73, dtype=torch.bool)
    mask[0, 10:40], mask[1, 60:] = True, True
    out = m(query, ref, memory, SHAPES, padding_mask=mask)
    assert out.shape == (2, 5, 16)
    changed = memory.masked_fill(mask[..., None], 100.0)
    torch.testing.assert_close(m(query, ref, changed, SHAPES, padding_mask=mask), out)
    assert not torch.allclose(m(query, ref, changed, SHAPES), out)


def test_module_box_reference_points():
    m = _module(levels=1, points=3)
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 40, 16)
    centres = torch.rand(2, 5, 1, 2)
    # a box of 2P pixels scales offsets exactly as the point form does: offset / (W, H)
    boxes = torch.cat([centres, torch.tensor([6 / 8, 6 / 5]).expand(2, 5, 1, 2)], -1)
    torch.testing.assert_close(m(query, boxes, memory, [(5, 8)]), m(query, centres, memory, [(5, 8)]))
    # a box of zero size puts every point at its centre, whatever the offsets
    empty = torch.cat([centres, torch.zeros(2, 5, 1, 2)], -1)
    out = m(query, empty, memory, [(5, 8)])
    with torch.no_grad():
        m.sampling_offsets.weight.normal_()
    torch.testing.assert_close(m(query, empty, memory, [(5, 8)]), out)


def test_module_gradients_reach_every_parameter():
    m = _module()
    m(torch.randn(2, 5, 16), torch.rand(1, 5, 3, 2), torch.randn(2, 73, 16), SHAPES).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.export
def test_module_exports():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _module()

        def forward(self, query, ref, memory, mask):
            return self.attn(query, ref, memory, SHAPES, padding_mask=mask)

    model = Wrapper().eval()
    args = (torch.randn(2, 5, 16), torch.rand(2, 5, 3, 2), torch.randn(2, 73, 16), torch.rand(2, 73) > 0.8)
    exported = torch.export.export(model, args)
    torch.testing.assert_close(exported.module()(*args), model(*args))


def _call(value=None, shapes=SHAPES, locations=None, weights=None):
    v, loc, w = _inputs(dtype=torch.float32)
    return multi_scale_deformable_attention(
        v if value is None else value,
        shapes,
        loc if locations is None else locations,
        w if weights is None else weights,
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: _call(value=torch.randn(2, 73, 8)), "value must be"),
        (lambda: _call(value=torch.randn(2, 70, 2, 4)), "S=70"),
        (lambda: _call(shapes=[(6, 9), (3, 5)]), "sampling_locations must be"),
        (lambda: _call(shapes=[(6, 9, 1)]), "spatial_shapes must be"),
        (lambda: _call(shapes=torch.tensor([6, 9])), r"spatial_shapes must be \(L, 2\)"),
        (lambda: _call(locations=torch.rand(2, 7, 2, 3, 3)), "sampling_locations must be"),
        (lambda: _call(weights=torch.rand(2, 7, 2, 3, 2)), "attention_weights must be"),
        (lambda: MultiScaleDeformableAttention(10, num_heads=4), "num_heads=4 must divide"),
        (lambda: MultiScaleDeformableAttention(16, num_heads=4, value_ratio=0.375), "num_heads=4 must divide"),
        (
            lambda: _module()(torch.randn(2, 5, 16), torch.rand(2, 5, 3, 3), torch.randn(2, 73, 16), SHAPES),
            r"2 \(x, y\) or 4",
        ),
        (lambda: _module()(torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), torch.randn(2, 73, 16), SHAPES), "L=3"),
        (lambda: _module()(torch.randn(2, 5, 16), torch.rand(2, 5, 3, 2), torch.randn(2, 73, 16), SHAPES[:2]), "3"),
        (lambda: _module()(torch.randn(2, 5, 16), torch.rand(2, 5, 3, 2), torch.randn(2, 60, 16), SHAPES), "S=60"),
        (lambda: _module()(torch.randn(2, 5, 12), torch.rand(2, 5, 3, 2), torch.randn(2, 73, 16), SHAPES), "query"),
        (
            lambda: _module()(
                torch.randn(2, 5, 16), torch.rand(2, 5, 3, 2), torch.randn(2, 73, 16), SHAPES, torch.ones(2, 73)
            ),
            "padding_mask",
        ),
        (lambda: reference_points_for(SHAPES, torch.ones(2, 2, 2)), "valid_ratios"),
        (lambda: flatten_levels([torch.randn(2, 3, 4)]), "maps"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
