"""MSVMamba's scan fast paths (``layers/fast/scan.py``): the compiled op ``vitlab::scan_d1`` against a step-by-step
reference, when it runs, how it fails, what tracers and the FLOP counter see; the chunked eager path against the
routes written out. Both are compared with the readable forward, like every fast path, in test_fast_paths.py."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vitlab.bench.memory import peak_forward_bytes
from vitlab.layers import SelectiveScan2d, fast_paths, fast_paths_taken, selective_scan_macs
from vitlab.layers.fast import scan as fast_scan
from vitlab.layers.fast.scan import kernel_available, scan_d1

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="the compiled scan did not build here")


@pytest.fixture
def two_threads():
    """Two threads, so that batch 1 at width >= 128 has fewer images than threads (the normed scan then splits
    channels and normalises in PyTorch)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _inputs(P=9, B=3, d=70, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(P, B, rank + 2, generator=g)
    proj[0, 0, :rank] = 8.0  # a dt pre-activation past softplus' threshold 20
    u, W = torch.randn(P, B, d, generator=g), torch.randn(rank, d, generator=g)
    bias, A, D = torch.randn(d, generator=g) - 1, -torch.rand(d, generator=g) * 2, torch.randn(d, generator=g)
    norm = (torch.randn(d, generator=g), torch.randn(d, generator=g), 1e-5)
    return proj, u, W, bias, A, D, norm


def _reference(proj, u, W, bias, A, D, in_rows, out_rows, out, norm):
    """The same scan step by step in float64."""
    proj, u, W, bias, A, D, out = (t.double() for t in (proj, u, W, bias, A, D, out))
    rank, h = W.shape[0], torch.zeros_like(u[0])
    for r, o in zip(in_rows.tolist(), out_rows.tolist(), strict=True):
        dt = F.softplus(bias + proj[r, :, :rank] @ W)
        h = torch.exp(dt * A) * h + dt * proj[r, :, rank, None] * u[r]
        y = proj[r, :, rank + 1, None] * h + D * u[r]
        out[o] += y if norm is None else F.layer_norm(y, y.shape[-1:], norm[0].double(), norm[1].double(), norm[2])
    return out


@needs_kernel
@pytest.mark.parametrize(("batch", "dim"), [(1, 70), (3, 70), (1, 130)])  # 1 x 130: more threads than images
@pytest.mark.parametrize("with_norm", [False, True])
def test_scan_equals_stepwise_reference(batch, dim, with_norm, two_threads):
    proj, u, W, bias, A, D, norm = _inputs(B=batch, d=dim)
    norm = norm if with_norm else None
    in_rows = torch.tensor([3, 0, 8, 8, 1, 5, 2, 7, 4, 6, 0])  # a pixel may come back, as the half-scale routes
    out_rows = torch.tensor([0, 1, 2, 3, 0, 1, 4, 4, 5, 0, 2])  # and outputs add up on repeated rows
    out = torch.randn(6, batch, u.shape[-1])
    expected = _reference(proj, u, W, bias, A, D, in_rows, out_rows, out, norm)
    got = scan_d1(proj, u, W, bias, A, D, in_rows, out_rows, out.clone(), norm)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5)


@needs_kernel
def test_softplus_is_accurate_across_its_range():
    # one step with W = 0, A = 0, D = 0, u = B = C = 1: out = dt = softplus(bias), down to where it underflows
    d = 4096
    bias = torch.linspace(-40, 40, d)
    proj, u = torch.ones(1, 1, 3), torch.ones(1, 1, d)
    zeros, row = torch.zeros(d), torch.arange(1)
    out = scan_d1(proj, u, torch.zeros(1, d), bias, zeros, zeros, row, row, torch.zeros(1, 1, d))
    torch.testing.assert_close(out[0, 0].double(), F.softplus(bias.double()), rtol=1e-6, atol=0)


@needs_kernel
def test_long_sequence_equals_reference():
    proj, u, W, bias, A, D, norm = _inputs(P=3000, B=2, d=24, seed=1)
    rows = torch.arange(3000)
    expected = _reference(proj, u, W, bias, A, D, rows, rows, torch.zeros(3000, 2, 24), norm)
    got = scan_d1(proj, u, W, bias, A, D, rows, rows, torch.zeros(3000, 2, 24), norm)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_loading_leaves_the_floating_point_mode_alone():
    # linked without -ffast-math, whose start-up code would set flush-to-zero for the whole process
    assert kernel_available()
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0


@needs_kernel
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's per-op fallbacks, not ours
def test_autocast_and_vmap_take_the_pytorch_scan():
    m = SelectiveScan2d(16).eval()  # (3 x 3 maps: too small for the chunked path)
    x = torch.randn(3, 2, 9, 16)
    with torch.no_grad():
        expected = torch.stack([m(t, (3, 3)) for t in x])
        torch.testing.assert_close(torch.func.vmap(lambda t: m(t, (3, 3)))(x), expected, rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16), fast_paths_taken() as taken:
            out = m(x[0], (3, 3))
        assert not taken
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected[0], rtol=0.1, atol=0.1)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "W": a["W"][:, :5]}, r"W \(rank, d\)"),
        (lambda a: {**a, "proj": a["proj"][..., :3]}, r"proj \(P, B, rank \+ 2\)"),
        (lambda a: {**a, "out": a["out"][:, :2]}, r"out \(Q, 3, 70\)"),
        (lambda a: {**a, "out_rows": a["out_rows"][:2]}, "one length"),
        (lambda a: {**a, "in_rows": a["in_rows"] + 9}, r"in_rows must lie in \[0, 9\)"),
        (lambda a: {**a, "out_rows": a["out_rows"] - 1}, r"out_rows must lie in \[0, 4\)"),
        (lambda a: {**a, "u": a["u"].double()}, "contiguous CPU float32"),
        (lambda a: {**a, "u": a["u"].transpose(0, 1).contiguous().transpose(0, 1)}, "contiguous CPU float32"),
        (lambda a: {**a, "norm": (a["norm"][0][:3], a["norm"][1], 1e-5)}, r"norm weight and bias must be \(70,\)"),
        (lambda a: {**a, "in_rows": a["in_rows"].float()}, "integer CPU tensors"),
        (lambda a: {**a, "out": a["u"][:4]}, "must not share memory"),
        (lambda a: {**a, "out": a["out"].transpose(1, 2).contiguous().transpose(1, 2)}, "contiguous CPU float32"),
    ],
)
def test_bad_inputs_are_named(change, match):
    proj, u, W, bias, A, D, norm = _inputs()
    rows = torch.arange(4)
    args = dict(proj=proj, u=u, W=W, bias=bias, A=A, D=D, in_rows=rows, out_rows=rows, out=torch.zeros(4, 3, 70))
    with pytest.raises(ValueError, match=match):
        scan_d1(**change({**args, "norm": norm}))


def _naive(m, x, grid):
    """The mixer's function through its autograd path in float64 (itself tested against the routes written out)."""
    m64 = SelectiveScan2d(m.out_proj.out_features, act_layer=type(m.act)).double().eval()
    m64.load_state_dict(m.state_dict())
    return m64(x.double().requires_grad_(), grid).detach()


@needs_kernel
@pytest.mark.parametrize(
    ("batch", "grid", "dim"), [(3, (6, 5), 40), (1, (4, 7), 40), (2, (1, 1), 40), (2, (9, 2), 40), (1, (5, 4), 96)]
)
def test_mixer_takes_the_op_and_equals_the_reference(batch, grid, dim, two_threads):
    m = SelectiveScan2d(dim).eval()
    with torch.no_grad():
        m.dt_projs_bias[:, :3] = 30.0  # past softplus' threshold
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(batch, grid[0] * grid[1], dim)
    with torch.no_grad(), fast_paths(True), fast_paths_taken() as taken:
        got = m(x, grid)
    assert taken == {"msvmamba_scan_compiled": 1}
    torch.testing.assert_close(got.double(), _naive(m, x, grid), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_op_only_without_autograd_on_cpu_float32():
    m, x = SelectiveScan2d(16).eval(), torch.randn(2, 9, 16)

    def taken_by(run) -> bool:
        with fast_paths(True), fast_paths_taken() as taken:
            run()
        return taken["msvmamba_scan_compiled"] == 1

    assert not taken_by(lambda: m(x, (3, 3)))  # autograd records: the readable forward has the backward
    with torch.no_grad():
        assert taken_by(lambda: m(x, (3, 3)))
        assert not taken_by(lambda: m.double()(x.double(), (3, 3)))
        m.float()
        watched = []
        peak_forward_bytes(lambda: watched.append(taken_by(lambda: m(x, (3, 3)))))  # the memory meter watches
        assert watched == [True]
    for p in m.parameters():  # nothing records: the op may run with autograd on
        p.requires_grad_(False)
    assert taken_by(lambda: m(x, (3, 3)))
    with pytest.raises(RuntimeError, match="inference only"):
        scan_d1(*_inputs()[:6], torch.arange(2), torch.arange(2), torch.zeros(2, 3, 70, requires_grad=True))


@needs_kernel
def test_flop_counter_counts_the_op_as_the_readable_forward():
    m, x = SelectiveScan2d(32).eval(), torch.randn(2, 7 * 5, 32)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fast, fast_paths(True), fast_paths_taken() as taken:
            m(x, (7, 5))
        with FlopCounterMode(display=False) as readable, fast_paths(False):
            m(x, (7, 5))
    assert taken == {"msvmamba_scan_compiled": 1}
    assert fast.get_total_flops() == readable.get_total_flops()
    # the op's own formula: the scan (VMamba's count, with D) and the dt product, over 35 + 3 x 4 x 3 steps
    rank, d = m.dt_rank, m.d_inner
    expected = sum(2 * (selective_scan_macs(2, n, d, 1) + n * 2 * rank * d) for n in (35, 36))
    assert fast.get_flop_counts()["Global"][torch.ops.vitlab.scan_d1] == expected


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mixer = SelectiveScan2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(x, (6, 5))


@needs_kernel
@pytest.mark.export
def test_export_and_compile_see_the_op():
    model, x = _Mixer().eval(), torch.randn(2, 30, 16)
    with torch.no_grad(), fast_paths(True):
        program = torch.export.export(model, (x,))
        graphs = []
        compiled = torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)
        out = compiled(x)
        with fast_paths(False):
            expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    op = torch.ops.vitlab.scan_d1.default
    exported = [n for n in program.graph.nodes if n.target is op or op in n.args]  # or auto_functionalized(op)
    assert len(exported) == 2  # the half-scale routes and the full scale
    assert sum(str(n.target) == "vitlab.scan_d1" for g in graphs for n in g.graph.nodes) == 2


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fast_scan, "_NAME", "vitlab_scan_d1_failing")  # its own entry in torch's build versions
    monkeypatch.setattr(fast_scan, "_CFLAGS", [*fast_scan._CFLAGS, "-fno-such-flag"])
    monkeypatch.setattr(fast_scan, "_built", None)
    with pytest.warns(UserWarning, match="did not build"):
        assert not kernel_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernel_available()  # remembered: no second warning
    m = SelectiveScan2d(16).eval()
    x = torch.randn(2, 6 * 6, 16)
    with torch.no_grad(), fast_paths_taken() as taken:  # the mixer still runs, on the PyTorch scan
        torch.testing.assert_close(m(x, (6, 6)).double(), _naive(m, x, (6, 6)), rtol=1e-4, atol=1e-5)
    assert "msvmamba_scan_compiled" not in taken
    assert not list(tmp_path.rglob("*.so"))  # no library left behind
    with pytest.raises(RuntimeError, match="not available"):
        scan_d1(*_inputs()[:6], torch.arange(2), torch.arange(2), torch.zeros(2, 3, 70))
