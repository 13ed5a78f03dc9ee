"""The fast-path dispatch (``layers/fast/``): every registered path against the readable forward of the class it
serves, the switch (function, context manager, environment), where the paths engage in whole models, and
mamba_ssm's self-check (with a fake kernel: no GPU here).

Tolerance: fast and readable outputs agree to ``rtol = atol = 2e-5`` in float32 (fused kernels and the compiled
scan round differently; the compiled scan's ``-ffast-math`` exp/log included).
"""

import importlib
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.bench import count_flops, count_flops_meta
from vitlab.layers import (
    FAST_PATHS,
    ConvFfn,
    PolylinePathAttention,
    SelectiveScan2d,
    StripAttention,
    fast_forward,
    fast_paths,
    fast_paths_enabled,
    fast_paths_taken,
    selective_scan,
    selective_scan_ref,
    set_fast_paths,
)
from vitlab.layers import fast as fast_dispatch
from vitlab.layers.fast import mamba, onednn
from vitlab.layers.fast import scan as fast_scan
from vitlab.layers.selective_scan import selective_scan_torch
from vitlab.models import get_variant
from vitlab.models.ppma import _CpeBlock, _LocalFfn, _Stem
from vitlab.models.s2aformer import HybridPerceptionBlock, _ConvStem

RTOL = ATOL = 2e-5


def _randomise_batchnorm(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a wrong BatchNorm fold cannot hide behind the init values."""
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
    return module.eval()


def _fake_mamba(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., torch.Tensor] | None = None) -> list[int]:
    """mamba_ssm's kernel faked by ``fn`` (default: the step-by-step reference), CPU tensors taken for CUDA ones;
    returns the list its calls append to."""
    calls: list[int] = []

    def kernel(*args: Any) -> torch.Tensor:
        calls.append(1)
        return (fn or selective_scan_ref)(*args)

    monkeypatch.setattr(mamba, "_mamba_scan_fn", kernel)
    monkeypatch.setattr(mamba, "_on_cuda", lambda t: True)
    monkeypatch.setattr(mamba, "_verdict", None)
    return calls


def _scan_inputs() -> tuple[Any, ...]:
    """``selective_scan``'s arguments: u, delta, A, B, C, D, z, delta_bias, delta_softplus."""
    u, delta, z = torch.randn(2, 6, 10), torch.rand(2, 6, 10), torch.randn(2, 6, 10)
    A, B, C = -torch.rand(6, 3) - 0.5, torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    return u, delta, A, B, C, torch.randn(6), z, torch.randn(6), True


@dataclass
class Case:
    """One example for a fast path: the module (or function) it serves, inputs on which it applies."""

    build: Callable[[], Any]
    inputs: Callable[[], tuple[Any, ...]]
    setup: Callable[[pytest.MonkeyPatch], object] = field(default=lambda mp: None)
    needs: Callable[[], bool] = field(default=onednn._fused_ops_work)


def _tokens(dim: int, grid: tuple[int, int], batch: int = 2, dtype: torch.dtype = torch.float32) -> Callable:
    return lambda: (torch.randn(batch, grid[0] * grid[1], dim, dtype=dtype), grid)


def _no_chunked_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_scan, "CHUNKED_MIN_NUMEL", 0)


_PPMA_BLOCK = partial(_CpeBlock, 16, mixer=partial(PolylinePathAttention, num_heads=2), mlp=_LocalFfn, mlp_ratio=2.0)
CASES: dict[str, dict[str, Case]] = {
    "s2aformer_stem": {"": Case(lambda: _randomise_batchnorm(_ConvStem(3, 8)), lambda: (torch.randn(2, 3, 20, 18),))},
    "s2aformer_block": {
        "odd_grid": Case(
            lambda: HybridPerceptionBlock(16, partial(StripAttention, num_heads=2, sr_ratio=2)).eval(),
            _tokens(16, (7, 6)),  # the K/V reduction pads
        )
    },
    "ppma_stem": {"": Case(lambda: _randomise_batchnorm(_Stem(3, 16)), lambda: (torch.randn(2, 3, 36, 28),))},
    "ppma_cpe_block": {"": Case(lambda: _PPMA_BLOCK().eval(), _tokens(16, (6, 5)))},
    "ppma_ffn": {"": Case(lambda: _LocalFfn(16, 32).eval(), _tokens(16, (6, 5)))},
    "conv_ffn": {
        "dw_residual": Case(lambda: ConvFfn(8, 16, kernel_size=5).eval(), _tokens(8, (7, 4))),
        "pvt": Case(lambda: ConvFfn(8, 16, dw_residual=False).eval(), _tokens(8, (7, 4))),
    },
    "msvmamba_scan_compiled": {
        "": Case(lambda: SelectiveScan2d(40).eval(), _tokens(40, (6, 5), batch=3), needs=fast_scan.kernel_available),
        "one_image_wide": Case(
            lambda: SelectiveScan2d(96).eval(), _tokens(96, (5, 4), batch=1), needs=fast_scan.kernel_available
        ),  # fewer images than threads: the norm runs after the scan
    },
    "msvmamba_scan_chunked": {
        "fp64": Case(lambda: SelectiveScan2d(8).double().eval(), _tokens(8, (6, 7), dtype=torch.float64)),
        "gelu": Case(
            lambda: SelectiveScan2d(8, act_layer=nn.GELU).double().eval(), _tokens(8, (4, 6), dtype=torch.float64)
        ),
    },
    "msvmamba_scan_mamba": {"": Case(lambda: SelectiveScan2d(8).eval(), _tokens(8, (4, 5)), setup=_fake_mamba)},
    "selective_scan_mamba": {"": Case(lambda: selective_scan, _scan_inputs, setup=_fake_mamba)},
}
for _case in CASES["msvmamba_scan_chunked"].values():
    _case.setup, _case.needs = _no_chunked_threshold, lambda: True
for _case in (*CASES["msvmamba_scan_mamba"].values(), *CASES["selective_scan_mamba"].values()):
    _case.needs = lambda: True
CASE_IDS = [f"{name}-{variant}" if variant else name for name, cases in CASES.items() for variant in cases]


def _case(case_id: str) -> tuple[str, Case]:
    name, _, variant = case_id.partition("-")
    case = CASES[name][variant]
    if not case.needs():
        pytest.skip(f"{name} cannot run on this machine")
    return name, case


def test_every_fast_path_has_an_example():
    assert set(CASES) == set(FAST_PATHS)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_fast_path_equals_the_readable_forward(case_id, monkeypatch):
    name, case = _case(case_id)
    case.setup(monkeypatch)
    owner, inputs = case.build(), case.inputs()
    kind = owner if not isinstance(owner, nn.Module) else type(owner)
    assert f"{kind.__module__}.{kind.__qualname__}" == FAST_PATHS[name].serves  # the example builds what it serves
    with torch.no_grad():
        with fast_paths(False), fast_paths_taken() as taken:
            expected = owner(*inputs)
        assert not taken
        with fast_paths(True), fast_paths_taken() as taken:
            got = owner(*inputs)
    assert taken[name] == 1
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_switched_off_no_fast_path_runs(case_id, monkeypatch):
    name, case = _case(case_id)
    case.setup(monkeypatch)
    runs: Counter[str] = Counter()
    for path in FAST_PATHS.values():
        monkeypatch.setattr(path, "run", lambda *a, _run=path.run, _name=path.name: runs.update([_name]) or _run(*a))
    owner, inputs, before = case.build(), case.inputs(), fast_paths_enabled()
    with torch.no_grad():
        set_fast_paths(False)
        try:
            assert not fast_paths_enabled()
            owner(*inputs)
            assert fast_forward(owner, *inputs) is None
        finally:
            set_fast_paths(before)
        assert not runs
        with fast_paths(True):
            owner(*inputs)
    assert runs[name] == 1


def test_paths_decline_what_they_do_not_compute():
    x, grid = _tokens(8, (4, 4))()
    with torch.no_grad(), fast_paths(True), fast_paths_taken() as taken:
        ConvFfn(8, 16, act_layer=nn.ReLU).eval()(x, grid)  # the kernels fuse exact GELU only
        ConvFfn(8, 16, act_layer=partial(nn.GELU, approximate="tanh")).eval()(x, grid)
        ConvFfn(8, 16).train()(x, grid)  # training: dropouts
        SelectiveScan2d(8, d_state=2).eval()(x, grid)  # the fast scans are for d_state = 1
        assert not taken
        HybridPerceptionBlock(8, partial(PolylinePathAttention, num_heads=2)).eval()(x, grid)  # not a strip mixer
        assert taken == {"conv_ffn": 1}  # its LIM alone
    with fast_paths(True), fast_paths_taken() as taken:
        ConvFfn(8, 16).eval()(x, grid)  # autograd records
    assert not taken


def _switched_off_then_raise() -> None:
    with fast_paths(False):
        assert not fast_paths_enabled()
        raise KeyError("inside")


def test_switch_and_context_manager_restore_the_setting():
    before = fast_paths_enabled()
    try:
        set_fast_paths(True)
        with pytest.raises(KeyError):
            _switched_off_then_raise()
        assert fast_paths_enabled()
    finally:
        set_fast_paths(before)


def test_environment_switch(monkeypatch):
    monkeypatch.delenv("VITLAB_NO_CPU_KERNELS", raising=False)
    for value, expected in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("VITLAB_FAST_PATHS", value)
        assert fast_dispatch._env_enabled() is expected, value
    monkeypatch.delenv("VITLAB_FAST_PATHS")
    assert fast_dispatch._env_enabled()
    monkeypatch.setenv("VITLAB_NO_CPU_KERNELS", "1")  # the deprecated alias
    with pytest.warns(FutureWarning, match="VITLAB_FAST_PATHS=0"):
        assert not fast_dispatch._env_enabled()


def test_environment_is_read_at_import():
    code = "import vitlab.layers as L; assert not L.fast_paths_enabled()"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "VITLAB_FAST_PATHS": "0"})


def test_registry_refuses_a_second_entry_of_one_name():
    path = next(iter(FAST_PATHS.values()))
    with pytest.raises(ValueError, match="already registered"):
        fast_dispatch.register_fast_path(path)


# whole models: the fast paths that run in eval-mode, no-grad float32 CPU inference (the speed the benchmarks
# measure), and the FLOP counter, which sees the readable ops (or the compiled scan's own formula)
ENGAGED = {
    "s2aformer_tiny": ((2, 3, 40, 36), {"s2aformer_stem": 1, "s2aformer_block": 4}),
    "ppma_tiny": ((2, 3, 72, 56), {"ppma_stem": 1, "ppma_cpe_block": 4, "ppma_ffn": 4}),
    "msvmamba_tiny": ((2, 3, 40, 40), {"msvmamba_scan_compiled": 4, "conv_ffn": 4}),
    "svt_h_s": ((2, 3, 32, 32), {"conv_ffn": 4}),
}


@pytest.mark.parametrize("name", sorted(ENGAGED))
def test_fast_paths_engage_in_cpu_inference(name):
    if not onednn._fused_ops_work() or not fast_scan.kernel_available():
        pytest.skip("the oneDNN ops or the compiled scan are missing here")
    shape, engaged = ENGAGED[name]
    kwargs = {**get_variant(name).test_kwargs, "num_classes": 5}
    model = _randomise_batchnorm(vitlab.create_model(name, **kwargs))
    x = torch.randn(shape)
    with fast_paths(True), fast_paths_taken() as taken:
        expected = model(x)  # autograd records: the readable forwards
        assert not taken
        with torch.no_grad():
            out = model(x)
            assert taken == engaged
            taken.clear()
            model.train()(x)  # training (batch statistics, drop paths): no fused oneDNN path
            assert set(taken) <= {"msvmamba_scan_compiled"}  # the scan has no training-only parts
        model.eval()
        torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
        size = kwargs.get("img_size", 32)
        assert count_flops(model, (3, size, size)) == count_flops_meta(name, **kwargs)


def test_mamba_kernel_that_disagrees_is_dropped_after_one_warning(monkeypatch):
    calls = _fake_mamba(monkeypatch, lambda *args: selective_scan_torch(*args) + 1e-2)
    args = _scan_inputs()
    with fast_paths(True):
        with pytest.warns(RuntimeWarning, match=r"disagrees .* rtol=0.0006, atol=0.002"):
            out = selective_scan(*args)
        torch.testing.assert_close(out, selective_scan_torch(*args))
        assert len(calls) == 1  # the check only
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            selective_scan(*args)
            SelectiveScan2d(8)(torch.randn(1, 12, 8), (3, 4))  # the mixer's CUDA route is off too
    assert len(calls) == 1


def test_mamba_kernel_that_raises_is_dropped(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    calls, args = _fake_mamba(monkeypatch, broken), _scan_inputs()
    with fast_paths(True), pytest.warns(RuntimeWarning, match="it raised RuntimeError"):
        torch.testing.assert_close(selective_scan(*args), selective_scan_torch(*args))
    assert len(calls) == 1


def test_mamba_kernel_that_agrees_is_used_after_the_check(monkeypatch):
    calls, args = _fake_mamba(monkeypatch), _scan_inputs()
    with fast_paths(True), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(selective_scan(*args), selective_scan_torch(*args))
    assert len(calls) == 2  # the check, then the scan
    monkeypatch.setattr(mamba, "_on_cuda", lambda t: False)  # CPU tensors: never the kernel
    with fast_paths(True):
        selective_scan(*_scan_inputs())
    assert len(calls) == 2


def test_fast_path_modules_are_importable_by_their_serves_path():
    for path in FAST_PATHS.values():
        module, _, name = path.serves.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path.serves
