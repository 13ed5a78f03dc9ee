"""FX tracing and TorchScript: every registered model does what its ``VariantSpec`` declares.

``fx_traceable`` models trace into a graph that equals eager mode, also at another input size (nothing of the
traced size is baked in): vitlab's own classes with plain ``torch.fx.symbolic_trace``, timm's classes with timm's
tracer settings (its leaf modules and wrapped functions, as its FX feature path uses). ``scriptable`` ones script
with ``torch.jit.script``.
Declared-unsupported ones really fail, so the declarations stay honest.
"""

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_notrace_functions, get_notrace_modules

import vitlab
from vitlab.models import get_variant

NAMES = vitlab.list_models()
NUM_CLASSES = 5
FX_NAMES = [n for n in NAMES if get_variant(n).fx_traceable]
SCRIPT_NAMES = [n for n in NAMES if get_variant(n).scriptable]


def _size(name: str) -> int:
    spec = get_variant(name)
    return spec.test_kwargs.get("img_size", spec.img_size)


def _build(name: str) -> torch.nn.Module:
    spec = get_variant(name)
    return vitlab.create_model(name, **{**spec.test_kwargs, "num_classes": NUM_CLASSES}).eval()


def _input(name: str, size: int | None = None) -> torch.Tensor:
    s = size or _size(name)
    return torch.randn(2, get_variant(name).in_chans, s, s)


class _TimmTracer(torch.fx.Tracer):
    """The tracer settings of timm's (and, through it, torchvision's) FX feature extraction."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, tuple(get_notrace_modules())) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    if type(model).__module__.startswith("vitlab."):
        return torch.fx.symbolic_trace(model)
    return torch.fx.GraphModule(model, _TimmTracer().trace(model))


def _one_per_module(names: list[str]) -> list[str]:
    """The first name of each family module: a failure to trace or script is the class's, not the size's."""
    first: dict[str, str] = {}
    for name in names:
        first.setdefault(timm.models.model_entrypoint(name).__module__, name)
    return sorted(first.values())


@pytest.mark.parametrize("name", FX_NAMES)
def test_fx_trace_matches_eager_at_two_sizes(name):
    model = _build(name)
    graph = _trace(model)
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), atol=1e-5, rtol=1e-4)
        if get_variant(name).dynamic_size:
            other = _input(name, size=int(_size(name) * 1.5) // 8 * 8)
            torch.testing.assert_close(graph(other), model(other), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", _one_per_module([n for n in NAMES if not get_variant(n).fx_traceable]))
def test_fx_declared_unsupported_fails(name):
    assert get_variant(name).fx_reason
    with pytest.raises((torch.fx.proxy.TraceError, TypeError, RuntimeError, ValueError)):
        _trace(_build(name))


@pytest.mark.parametrize(
    "name",
    [
        next(n for n in FX_NAMES if not get_variant(n).timm_native and get_variant(n).isotropic),
        next(n for n in FX_NAMES if not get_variant(n).timm_native and not get_variant(n).isotropic),
    ],
)
def test_timm_fx_feature_extractor_returns_the_final_norm(name):
    # timm's FX path (torchvision's create_feature_extractor with timm's leaf modules and wrapped functions)
    model = _build(name)
    extractor = create_feature_extractor(model, {"norm": "norm"})
    x = _input(name)
    with torch.no_grad():
        out = extractor(x)["norm"]
        ref = model.forward_features(x)
    if ref.ndim == 4:  # a hierarchical model's map (B, C, H, W); the norm sees its tokens (B, H*W, C)
        ref = ref.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_torchscript_matches_eager(name):
    model = _build(name)
    # issue 20's decision: vitlab promises torch.export; only timm's own classes are declared scriptable
    assert type(model).__module__.startswith("timm.")
    scripted = torch.jit.script(model)
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", _one_per_module([n for n in NAMES if not get_variant(n).scriptable]))
def test_torchscript_declared_unsupported_fails(name):
    assert get_variant(name).script_reason
    # vitlab's classes stop at their first annotation or Python-only construct; which one varies by class
    with pytest.raises((RuntimeError, ValueError, torch.jit.frontend.NotSupportedError)):
        torch.jit.script(_build(name))
