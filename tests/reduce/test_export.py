"""A reduced model with a fixed schedule exports with torch.export and ONNX; onnxruntime agrees to 1e-5."""

import pytest
import timm
import torch

from vitlab import reduce

pytestmark = pytest.mark.export

SETTINGS = {
    "tome": {"r": 3},
    "evit": {"keep": 0.5, "layers": [1, 2]},
    "ats": {"keep": 0.5, "layers": [1, 2, 3], "pad_to_budget": True},  # static shapes: pad to the budget
    "mctf": {"r": 4},
}


def _reduced(method):
    model = timm.create_model("vit_tiny_patch16_224", depth=4, embed_dim=32, num_heads=2, img_size=64, num_classes=5)
    return reduce.apply(model.eval(), method, **SETTINGS[method]), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_torch_export(method):
    model, x = _reduced(method)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_onnx_runtime_matches(method, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = _reduced(method)
    path = tmp_path / f"{method}.onnx"
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), model(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_torch_compile_fullgraph(method):
    model, x = _reduced(method)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
