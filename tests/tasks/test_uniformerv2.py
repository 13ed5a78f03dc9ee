"""UniFormerV2 (paper 34): parameter parity with UniFormerV2-B/16, what each part adds, order (in)sensitivity.

The registry-wide contract (tests/tasks/test_task_registry.py) covers the generic methods.
"""

import pytest
import torch

from vitlab.layers.temporal import TemporalConvBlock
from vitlab.tasks import create_task_model, get_task
from vitlab.tasks.video import UniFormerV2

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def _model(**kw) -> UniFormerV2:
    torch.manual_seed(0)
    kw = {"img_size": 16, "num_frames": 4, **kw}
    return create_task_model("uniformerv2", kw.pop("backbone", "vit_micro_patch4_28"), backbone_kwargs=TINY, **kw)


def _clips(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_uniformerv2_b16_matches_the_official_parameter_count():
    # mmaction2 uniformerv2-base-p16-res224_clip_u8_kinetics400-rgb (CLIP ViT-B/16, 8 frames, no local MHRA, global
    # blocks on layers 8-11, 400 classes): 115M in its README. Counting the official modules by hand: ViT-B/16
    # without final norm, 4 extractors (attention, MLP, 3 norms), 4 depthwise 3x3x3 DPE convs, query, balance,
    # the head's norm and linear. Ours adds timm's final norm (2 x 768).
    with torch.device("meta"):
        model = create_task_model(
            "uniformerv2", "vit_base_patch16_clip_224", num_classes=400, in_chans=3, img_size=224, num_frames=8
        )
    assert model.global_indices == (8, 9, 10, 11)
    assert model.local_mhra == "none"
    w = 768
    block = 4 * w * w + 4 * w + 8 * w * w + 5 * w + 4 * w  # attention, MLP (4x), two norms
    embed = 3 * w * 16 * 16 + w + 197 * w + 2 * w  # patch conv without bias, CLS, positions, pre-norm
    official = embed + 12 * block + 4 * (block + 2 * w) + 4 * 28 * w + 2 * w + 2 * w + (w * 400 + 400)
    assert _params(model) == official + 2 * w
    assert _params(model) / 1e6 == pytest.approx(get_task("uniformerv2").ref_params_m, rel=0.01)


def test_parts_and_their_parameters():
    none = _model(global_layers=0)
    assert none.query is None
    assert len(none.global_blocks) == 0
    single, double = _model(local_mhra="single", global_layers=0), _model(local_mhra="double", global_layers=0)
    blocks = double.frames.backbone.blocks
    assert all(isinstance(b, TemporalConvBlock) and b.temporal2 is not None for b in blocks)
    conv = sum(_params(m) for m in blocks[0].temporal1.modules() if m is not blocks[0].temporal1)
    assert _params(double) - _params(none) == 2 * (_params(single) - _params(none)) == 2 * 4 * conv
    glob = _model(global_layers=[1, 3])
    assert glob.global_indices == (1, 3)
    assert all(d.groups == 32 and d.kernel_size == (3, 3, 3) for d in glob.dpe)
    assert _model(global_layers=3).global_indices == (1, 2, 3)


def test_zero_initialised_parts_keep_the_frame_averaging_model_at_start():
    base = _model(global_layers=0).eval()
    armed = _model(local_mhra="double", global_layers=2).eval()
    # same backbone weights (the wrappers keep the host blocks' parameters under block.)
    state = {k.replace(".block.", "."): v for k, v in armed.frames.backbone.state_dict().items() if "temporal" not in k}
    base.frames.backbone.load_state_dict(state)
    clips = _clips()
    with torch.no_grad():
        # the query starts at zero and its blocks pass it through, the mix halves the CLS mean, and the layer norm
        # is (nearly) scale-free: the same embedding as frame averaging
        a, b = armed.forward_clip_embedding(clips), base.forward_clip_embedding(clips)
    assert torch.allclose(a, b, atol=1e-3)


def _randomise_zero_inits(model: UniFormerV2) -> None:
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if any(k in name for k in ("expand", "proj", "fc2", "query", "balance")):
            torch.nn.init.normal_(p, std=0.2)


@pytest.mark.parametrize(
    "kw", [{"global_layers": 0}, {"global_layers": 0, "frame_pool": "avg"}]
)  # fmt: skip
def test_frame_averaging_is_blind_to_frame_order(kw):
    model = _model(**kw).eval()
    clips = _clips()
    with torch.no_grad():
        assert torch.allclose(model(clips), model(clips.flip(1)), atol=1e-5)
        assert not torch.allclose(model(clips), model(clips.roll(1, dims=0)), atol=1e-3)  # but not to content


@pytest.mark.parametrize(
    "kw", [{"local_mhra": "single", "global_layers": 0}, {"global_layers": 2}, {"local_mhra": "double"}]
)  # fmt: skip
def test_local_or_global_parts_see_frame_order(kw):
    model = _model(**kw).eval()
    _randomise_zero_inits(model)
    clips = _clips()
    with torch.no_grad():
        assert not torch.allclose(model(clips), model(clips.flip(1)), atol=1e-4)


@pytest.mark.parametrize("backbone", ["vit_micro_patch4_28", "channelvit_nano_patch4_28"])
def test_shapes_and_identity_label(backbone):
    model = _model(backbone=backbone, label="identity", local_mhra="single", global_layers=2)
    assert model.num_classes == 10
    assert model.target_keys == ("identity",)
    out = model(_clips(2))
    assert out.shape == (2, 10)
    assert model.postprocess(out)["identity"].shape == (2,)


def test_training_moves_the_temporal_and_global_parts():
    model = _model(local_mhra="double", global_layers=2).train()
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.loss(model(_clips()), {"motion": torch.tensor([0, 1, 2])})["loss"].backward()
    optimizer.step()
    for key in ("temporal1.expand.weight", "temporal2.expand.weight", "global_blocks.0.proj.weight", "balance"):
        name = next(n for n in before if n.endswith(key))
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"local_mhra": "triple"}, "local_mhra must be one of"),
        ({"global_layers": 9}, "global_layers must be in 0..4"),
        ({"global_layers": [0, 4]}, r"indices must be in 0..3"),
        ({"global_heads": 3}, "must divide"),
        ({"label": "camera"}, "label must be one of"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        _model(**kw)


def test_inflated_patch_embedding_starts_as_the_image_embedding():
    plain = _model(global_layers=2).eval()
    inflated = _model(global_layers=2, temporal_patch_kernel=3).eval()
    proj = inflated.frames.backbone.patch_embed.proj
    assert proj.weight.shape[2] == 3
    state = {k: v for k, v in inflated.state_dict().items() if "patch_embed.proj" not in k}
    plain.load_state_dict(state, strict=False)
    plain.frames.backbone.patch_embed.proj.weight.data.copy_(proj.weight[:, :, 1])
    plain.frames.backbone.patch_embed.proj.bias.data.copy_(proj.bias)
    clips = _clips()
    with torch.no_grad():
        assert torch.allclose(inflated(clips), plain(clips), atol=1e-5)
