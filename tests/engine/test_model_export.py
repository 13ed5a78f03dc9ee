"""engine/export.py: models and trained runs export to ONNX / torch.export, the exported graph is run and
compared with the eager model, and failures are one-line errors. (Named apart from tests/reduce/test_export.py:
test modules here share one namespace.)"""

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab import reduce
from vitlab.engine import inference, save_weights, surgery
from vitlab.engine.export import ExportResult, export_model, export_target, format_result
from vitlab.errors import ExportError

VIT = "vit_micro_patch4_28"


@pytest.mark.export
@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
def test_model_name_exports_and_matches_eager(tmp_path, fmt):
    res = export_target(VIT, fmt, tmp_path)
    assert res.path == tmp_path / f"{VIT}{'.onnx' if fmt == 'onnx' else '.pt2'}"
    assert res.path.is_file()
    assert res.ok
    assert res.max_abs_diff < 1e-4
    assert res.format == fmt


@pytest.mark.export
@torch.no_grad()
def test_reduced_run_exports_reduced(tmp_path, monkeypatch):
    tiny = vitlab.get_variant(VIT).test_kwargs  # load_trained builds the same through the patched factory
    monkeypatch.setattr(inference, "create_model", lambda name, **kw: vitlab.create_model(name, **{**tiny, **kw}))
    model = surgery.apply(vitlab.create_model(VIT, **tiny).eval(), "reduce", "tome", r=4)
    meta = {"model": VIT, "num_classes": 10, "in_chans": 1, "img_size": 28, "surgery": surgery.surgery_of(model)}
    ckpt = save_weights(model, tmp_path / "best.safetensors", meta)
    res = export_target(ckpt, "torch.export", tmp_path / "reduced.pt2")
    assert res.ok
    exported = torch.export.load(str(res.path)).module()
    x = torch.randn(3, 1, 28, 28)[:1]
    out = exported(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)  # the reduced model...
    unreduced = reduce.remove(model)(x)
    assert (out - unreduced).abs().max() > 1e-3  # ...not the plain one


@pytest.mark.export
def test_structured_outputs_are_compared(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(x)
            return {"logits": y, "extra": (y.sin(), x * 2)}

    res = export_model(TwoHeads(), (torch.randn(2, 4),), "torch.export", tmp_path / "two.pt2")
    assert res.ok
    assert res.max_abs_diff == 0


@pytest.mark.export
@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
def test_export_failure_is_one_line(tmp_path, fmt):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.nonzero() if x.sum() > 0 else x

    with pytest.raises(ExportError, match=f"cannot export DataDependent to {fmt}: ") as info:
        export_model(DataDependent(), (torch.randn(2, 3),), fmt, tmp_path / "m")
    assert "\n" not in str(info.value)
    assert "data-dependent" in str(info.value)


def test_unknown_model_name_suggests_close_ones(tmp_path):
    with pytest.raises(ExportError, match=r"'vit_mikro_patch4_28' is neither .*Did you mean: vit_micro_patch4_28"):
        export_target("vit_mikro_patch4_28", "onnx", tmp_path)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; expected one of onnx, torch\.export"):
        export_target(VIT, "tflite", tmp_path)


def test_declared_unexportable_variant_says_why(tmp_path, monkeypatch):
    from dataclasses import replace

    from vitlab.models import VARIANTS

    monkeypatch.setitem(VARIANTS, VIT, replace(VARIANTS[VIT], exportable=False, export_reason="uses a custom op"))
    model = vitlab.create_model(VIT, **VARIANTS[VIT].test_kwargs)
    with pytest.raises(ExportError, match=f"{VIT} cannot be exported: uses a custom op"):
        export_model(model, (torch.randn(1, 1, 28, 28),), "onnx", tmp_path)


def test_format_result_is_one_line(tmp_path):
    res = ExportResult(tmp_path / "m.onnx", "onnx", 3.1e-7, 1e-4, True)
    assert (
        format_result(res)
        == f"exported to {tmp_path / 'm.onnx'} (onnx); max |diff| 3.1e-07 vs PyTorch (tolerance 1e-04): ok"
    )
    assert format_result(ExportResult(tmp_path / "m.pt2", "torch.export", 0.5, 1e-4, False)).endswith("MISMATCH")
