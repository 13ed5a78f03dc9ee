"""ViDT: the official ViDT-nano size, RAM's guarantees (timm's Swin untouched, [DET] tokens see the image only
through the cross-attention stages, the code's [DET] merging), the decoder, bad input and `vitlab predict` boxes."""

import json

import pytest
import timm
import torch
from PIL import Image

from vitlab.cli import run
from vitlab.engine.task_inference import _palette, draw_detections
from vitlab.tasks import create_task_model
from vitlab.tasks.detection import DeformableDecoder
from vitlab.tasks.detection.vidt import RamSwin, _global_attention

SWIN = "swin_tiny_patch4_window7_224"
SWINV2 = "swinv2_tiny_window8_256"
# four stages at 64 px (token grids 16, 8, 4, 2): shifted and padded windows, merging, the last-stage cross-attention
FOUR_STAGES = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4), "window_size": 4}
TINY = {"img_size": 64, "num_det_tokens": 6, "dim": 32, "decoder_layers": 2, "decoder_heads": 2, "dropout": 0.0}


def _tiny(backbone=SWIN, **kw):
    torch.manual_seed(0)
    return create_task_model("vidt", backbone, backbone_kwargs=FOUR_STAGES, **{**TINY, **kw})


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vidt_nano_matches_the_official_parameter_count():
    # ViDT-nano (Swin-nano: Swin-T's configuration at embed 48), 100 [DET] tokens, decoder 256 wide, 6 layers, FFN
    # 1024, box refinement, COCO's 91 sigmoid scores (here num_classes counts the background: 92). The official
    # code (naver-ai/vidt, methods/vidt + swin_w_ram.py) builds 15,728,677 parameters, of which 197,856 are never
    # used and not built here: each patch merging's `expansion` linear and `norm2` (4,704 + 18,624 + 74,112 +
    # 99,072) and the per-stage output norms of 96, 192, 384 channels (1,344). The README's "15M" truncates.
    # At 224 px every stage's grid holds whole 7 x 7 windows (timm shrinks the window, and its bias table, on
    # smaller grids).
    nano = {"backbone_kwargs": {"embed_dim": 48}, "num_classes": 92, "in_chans": 3, "img_size": 224}
    with torch.device("meta"):
        neck = create_task_model("vidt", SWIN, **nano)
        ram_only = create_task_model("vidt", SWIN, **nano, neck=False)
    assert _params(neck) == 15_728_677 - 197_856
    assert 15.0 <= _params(neck) / 1e6 < 16.0
    # "+RAM" alone (methods/vidt_wo_neck): 7,997,418 in the code, 98,784 of them unused (no last merging); its
    # softmax classifier has a 92nd "no object" output (257 parameters) that the sigmoid one here does not
    assert _params(ram_only) == 7_997_418 - 98_784 - 257
    assert 7.0 <= _params(ram_only) / 1e6 < 8.0  # the README's "7M"


@pytest.mark.parametrize("backbone", [SWIN, SWINV2])
def test_timm_weights_load_and_the_patch_path_is_timm_swin(backbone):
    # RAM leaves the patch tokens to Swin's own window attention: with a timm model's weights loaded, the patch maps
    # are that model's stage outputs exactly, whatever the [DET] tokens do
    model = _tiny(backbone).eval()
    reference = timm.create_model(backbone, num_classes=0, in_chans=1, img_size=64, **FOUR_STAGES).eval()
    result = model.body.body.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) <= {"norm.weight", "norm.bias"}  # the classifier's norm, pruned
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        maps, det, _ = model.body(image)
        expected = reference.forward_intermediates(image, indices=[1, 2, 3], intermediates_only=True)
    assert [m.shape[-1] for m in maps] == [8, 4, 2, 1]  # stages 2-4 and the extra merged level
    for got, want in zip(maps[:3], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert det.shape == (2, 6, 128)


def test_det_tokens_reach_patches_only_under_full_attention():
    image = torch.randn(1, 1, 64, 64)
    for attention, patches_move in (("ram", False), ("full", True)):
        model = _tiny(attention=attention).eval()
        with torch.no_grad():
            maps, det, _ = model.body(image)
            model.body.det_token.add_(1.0)
            maps2, det2, _ = model.body(image)
        assert not torch.allclose(det, det2)
        assert any(not torch.allclose(a, b) for a, b in zip(maps, maps2, strict=True)) == patches_move


@pytest.mark.parametrize("backbone", [SWIN, SWINV2])
def test_det_tokens_see_the_image_only_in_cross_attention_stages(backbone):
    images = torch.randn(2, 1, 64, 64)
    for cross, sees in (((), False), ((-1,), True), ((1,), True)):
        torch.manual_seed(0)
        body = RamSwin(backbone, in_chans=1, img_size=64, num_det_tokens=4, pos_dim=8, cross_stages=cross,
                       backbone_kwargs=FOUR_STAGES).eval()  # fmt: skip
        with torch.no_grad():
            for m in body.modules():  # timm starts SwinV2's residual post-norms at 0: every block an identity
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.fill_(1.0)
            det = body(images)[1]
        assert torch.allclose(det[0], det[1], atol=1e-6) != sees


def test_det_merging_is_the_codes_fourfold_repeat():
    body = _tiny().body
    merge = body.body.layers[1].downsample  # timm's PatchMerging: norm(4C) then reduction
    det = torch.randn(2, 5, merge.dim)
    expected = merge.reduction(merge.norm(det.repeat(1, 1, 4)))
    torch.testing.assert_close(body._merge_det(merge, det), expected)


@pytest.mark.parametrize("backbone", [SWIN, SWINV2])
def test_det_attention_is_the_blocks_attention_without_position_bias(backbone):
    # [DET] self-attention reuses the block's qkv, scale (SwinV2: cosine x learned scale) and projection: on one
    # window's worth of tokens it equals timm's window attention once the position bias is a constant
    block = _tiny(backbone).body.body.layers[0].blocks[0]
    attn = block.attn.eval()
    with torch.no_grad():
        if backbone == SWIN:
            attn.relative_position_bias_table.zero_()
        else:
            attn.cpb_mlp[-1].weight.zero_()  # 16 * sigmoid(0) everywhere: softmax ignores it
            attn.logit_scale.fill_(1.5)
        x = torch.randn(3, 16, 16)  # (windows, 4 x 4 tokens, C)
        torch.testing.assert_close(_global_attention(attn, x, 16, backbone == SWINV2), attn(x), atol=1e-5, rtol=1e-5)


def test_outputs_with_and_without_neck():
    image = torch.randn(2, 1, 64, 64)
    neck, ram_only = _tiny(), _tiny(neck=False)
    out = neck(image)
    assert out["pred_logits"].shape == (2, 6, 10)
    assert len(out["aux_outputs"]) == 2  # the [DET] tokens' own prediction, then one per decoder layer but the last
    assert all(((o["pred_boxes"] > 0) & (o["pred_boxes"] < 1)).all() for o in [out, *out["aux_outputs"]])
    out = ram_only(image)
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_boxes"].shape == (2, 6, 4)
    assert _params(ram_only) < _params(neck)
    # without neck the last block's patch path feeds nothing: skipped, its position bias frozen, all else trained
    ram_only.loss(out, ram_only.example_batch(2))["loss"].backward()
    frozen = [n for n, p in ram_only.named_parameters() if not p.requires_grad]
    assert frozen == ["body.body.layers.3.blocks.0.attn.relative_position_bias_table"]
    assert all(p.grad is not None for p in ram_only.parameters() if p.requires_grad)


def test_full_attention_trains_every_parameter_but_the_window_bias():
    model = _tiny(attention="full")
    model.loss(model(model.example_batch(2)["image"]), model.example_batch(2))["loss"].backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    assert all(n.endswith("relative_position_bias_table") for n in frozen)
    assert len(frozen) == sum(FOUR_STAGES["depths"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_decoder_heads_and_box_refinement():
    maps = [torch.randn(2, 16, s, s) for s in (8, 4)]
    tgt, pos = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    refine = DeformableDecoder(16, 3, num_layers=3, num_heads=2, num_levels=2, score_queries=True)
    shared = DeformableDecoder(16, 3, num_layers=3, num_heads=2, num_levels=2, box_refine=False)
    assert len(refine.class_heads) == len(refine.box_heads) == 4  # one per prediction
    assert len(shared.class_heads) == len(shared.box_heads) == 1
    for decoder, preds in ((refine, 4), (shared, 3)):
        out = decoder(tgt, pos, maps)
        assert len(out["aux_outputs"]) == preds - 1
        assert out["pred_boxes"].shape == (2, 5, 4)
    with pytest.raises(ValueError, match="2 levels, got 1"):
        refine(tgt, pos, maps[:1])
    # the first prediction (zero-initialised box deltas) sits at the reference point, 0.12 of the image wide
    first = refine(tgt, pos, maps)["aux_outputs"][0]["pred_boxes"]
    torch.testing.assert_close(first[..., :2], refine.reference_points(pos).sigmoid().expand(2, -1, -1))
    torch.testing.assert_close(first[..., 2:], torch.full_like(first[..., 2:], torch.sigmoid(torch.tensor(-2.0))))


def test_empty_scenes_train_without_nan():
    model = _tiny()
    batch = model.example_batch(3, torch.Generator().manual_seed(1))
    batch = {**batch, "boxes": [torch.zeros(0, 4)] * 3, "labels": [torch.zeros(0, dtype=torch.long)] * 3}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        losses = model.loss(model(batch["image"]), batch)
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()


def test_bad_targets_and_configurations_are_named():
    model = _tiny()
    batch = model.example_batch(2)
    output = model(batch["image"])
    outside = {**batch, "boxes": [torch.tensor([[70.0, 70.0, 80.0, 80.0]]), batch["boxes"][1]], "labels": [
        torch.tensor([1]), batch["labels"][1]]}  # fmt: skip
    with pytest.raises(ValueError, match="lies outside 64x64"):
        model.loss(output, outside)
    unknown = {**batch, "labels": [torch.full_like(batch["labels"][0], 10), batch["labels"][1]]}
    with pytest.raises(ValueError, match=r"label 10; expected 0\.\.9"):
        model.loss(output, unknown)
    crowded = {**batch, "boxes": [torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 7), batch["boxes"][1]], "labels": [
        torch.zeros(7, dtype=torch.long), batch["labels"][1]]}  # fmt: skip
    with pytest.raises(ValueError, match="7 targets but the model makes only 6 queries"):
        model.loss(output, crowded)
    with pytest.raises(ValueError, match="attention must be one of"):
        _tiny(attention="global")
    with pytest.raises(ValueError, match="not a Swin"):
        create_task_model("vidt", "tiny_vit_1m_28", img_size=64)
    with pytest.raises(ValueError, match="num_classes must count the background"):
        _tiny(num_classes=1)
    with pytest.raises(ValueError, match="cross_stages"):
        RamSwin(SWIN, in_chans=1, img_size=64, cross_stages=(4,), backbone_kwargs=FOUR_STAGES)


def test_draw_detections_draws_only_confident_boxes():
    image = torch.full((1, 32, 32), 100, dtype=torch.uint8)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 12.0], [0.0, 0.0, 30.0, 30.0]])
    picture = draw_detections(image, boxes, torch.tensor([2, 5]), torch.tensor([0.9, 0.1]), num_classes=11)
    assert picture.size == (64, 32)
    pixels = picture.load()
    assert pixels[10, 10] == pixels[32 + 0, 0] == (100, 100, 100)  # the input, and the unconfident box not drawn
    assert pixels[32 + 4, 9] == pixels[32 + 19, 9] == tuple(int(c) for c in _palette(11)[3])  # class 2's colour
    assert pixels[32 + 12, 9] == (100, 100, 100)  # inside the box


def test_predict_draws_boxes_for_a_detection_run(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    backbone = json.dumps({"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 4})
    task = json.dumps({"num_det_tokens": 8, "dim": 32, "decoder_layers": 1, "decoder_heads": 2})
    args = ["train", "--task", "vidt", "--backbone", SWIN, "--backbone-args", backbone, "--task-args", task]
    args += ["--dataset", "fmnist_scenes", "--img-size", "32", "--train-subset", "16", "--test-subset", "8"]
    assert (
        run([*args, "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path), "--name", "det"])
        == 0
    )
    summary = json.loads((tmp_path / "det" / "summary.json").read_text())
    assert summary["primary_metric"] == "map_50"
    assert 0 <= summary["test_map_50"] <= 100
    img = tmp_path / "some.png"
    Image.fromarray((torch.rand(40, 40) * 255).byte().numpy()).save(img)
    assert run(["predict", str(img), "--checkpoint", str(tmp_path / "det"), "--out", str(tmp_path / "pred")]) == 0
    with Image.open(tmp_path / "pred" / "some.png") as picture:
        assert picture.size == (64, 32)  # the input beside its boxes, at the run's 32 px
        assert picture.mode == "RGB"
