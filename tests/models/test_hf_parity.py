"""Parity with HF transformers where it implements the same model: the same weights, mapped by our
``checkpoint_filter_fn``, give the same logits (max abs diff <= 1e-5), loaded from memory or from a
local file as ``create_model(pretrained=True, pretrained_cfg_overlay={"file": ...})`` does."""

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.models.cvt import checkpoint_filter_fn

transformers = pytest.importorskip("transformers")

# a small CvT with every part of the paper's design; HF's CvT needs depth[i] > i
CVT_SMALL = {"embed_dims": (16, 32, 48), "depths": (1, 2, 3), "num_heads": (1, 2, 3)}
NUM_CLASSES = 7


def _cvt_ours(**kw) -> torch.nn.Module:
    return vitlab.create_model("cvt_13_224", num_classes=NUM_CLASSES, **CVT_SMALL, **kw).eval()


def _cvt_hf():
    """A randomly initialised small HF CvT whose norms and BatchNorm statistics are random too."""
    config = transformers.CvtConfig(
        embed_dim=list(CVT_SMALL["embed_dims"]),
        depth=list(CVT_SMALL["depths"]),
        num_heads=list(CVT_SMALL["num_heads"]),
        cls_token=[False, False, True],
        drop_path_rate=[0.0, 0.0, 0.0],
        num_labels=NUM_CLASSES,
    )
    torch.manual_seed(0)
    model = transformers.CvtForImageClassification(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0.0, 0.1).add_(1.0 if name.endswith(("norm.weight", "normalization.weight")) else 0.0)
    return model


def test_cvt_same_logits_as_hf_transformers():
    # NOTE: only with the CLS token, as all CvT checkpoints have it: HF's CvT fails without one
    hf = _cvt_hf()
    ours = _cvt_ours()
    ours.load_state_dict(checkpoint_filter_fn(hf.state_dict(), ours))  # strict: every key mapped
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = ours(x)
    assert ref.abs().mean() > 0.1  # logits large enough for the tolerance to mean something
    assert (out - ref).abs().max() <= 1e-5


def test_cvt_loads_hf_weights_from_a_local_file(tmp_path):
    hf = _cvt_hf()
    path = tmp_path / "cvt_hf.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    ours = vitlab.create_model(
        "cvt_13_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": NUM_CLASSES},
        num_classes=NUM_CLASSES,
        **CVT_SMALL,
    ).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).logits).abs().max() <= 1e-5
