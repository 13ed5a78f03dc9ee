"""compress/: the plug-in surface (same as reduce/): method table, errors that name the input, the record."""

import pytest
import torch

import vitlab
from vitlab import compress

TINY_VIT = vitlab.get_variant("vit_micro_patch4_28").test_kwargs


def _vit():
    return vitlab.create_model("vit_micro_patch4_28", **TINY_VIT).eval()


def test_methods_are_listed():
    names = compress.list_methods()
    assert names == sorted(compress.METHODS)
    expected = {"reparam", "magnitude", "structured", "attn_sparsity", "path_ensemble", "shiftadd"}
    assert expected <= set(names)


def test_unknown_method_suggests_close_names():
    known = ", ".join(compress.list_methods())
    with pytest.raises(ValueError, match=rf"'magnitud'.*Did you mean: magnitude.*Known: {known}"):
        compress.apply(_vit(), "magnitud")


def test_unknown_keyword_names_the_accepted_ones():
    with pytest.raises(TypeError, match=r"magnitude takes \['amount', 'include_head', 'keep_mask'\]"):
        compress.apply(_vit(), "magnitude", amont=0.5)


def test_apply_records_keywords_with_defaults_and_report():
    model = _vit()
    assert compress.apply(model, "magnitude", amount=0.25) is model
    (entry,) = compress.surgery_of(model)
    assert (entry["kind"], entry["method"]) == ("compress", "magnitude")
    assert entry["kwargs"] == {"amount": 0.25, "include_head": False, "keep_mask": False}
    assert entry["report"]["sparsity"] == pytest.approx(0.25, abs=1e-3)


def test_surgery_of_is_a_copy():
    model = compress.apply(_vit(), "magnitude")
    compress.surgery_of(model)[0]["kwargs"]["amount"] = 0.9
    assert compress.surgery_of(model)[0]["kwargs"]["amount"] == 0.5


def test_remove_without_compression_is_a_noop():
    model = _vit()
    assert compress.remove(model) is model


@pytest.mark.parametrize("method", ["magnitude", "reparam"])
def test_remove_of_a_permanent_method_says_why(method):
    model = _vit() if method == "magnitude" else vitlab.create_model("fmvit_small", **_fmvit_tiny())
    compress.apply(model, method)
    with pytest.raises(ValueError, match=rf"'{method}' cannot be undone: .*rebuild the model"):
        compress.remove(model)
    assert len(compress.surgery_of(model)) == 1


def test_record_refuses_what_json_cannot_hold():
    with pytest.raises(TypeError, match=r"\['w'\] is a Tensor"):
        compress.record_surgery(_vit(), "compress", "magnitude", {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="kind must be one of"):
        compress.record_surgery(_vit(), "quantize", "int8", {})


def test_record_stores_tuples_as_lists():
    model = _vit()
    compress.record_surgery(model, "reduce", "tome", {"r": (1, 2)})
    assert compress.surgery_of(model)[0]["kwargs"] == {"r": [1, 2]}


def _fmvit_tiny():
    return {k: v for k, v in vitlab.get_variant("fmvit_small").test_kwargs.items() if k != "img_size"}
