"""MonoDINO-DETR's own claims: LID bins, geometric depth, centre-distance AP, the masked depth-map loss, the cue
switches, the DPT head's shapes and clear errors for a missing or singular camera (the contract is in
test_task_registry.py)."""

import math

import pytest
import torch

from vitlab.layers.dpt import DPTHead, scale_shift_invariant_loss
from vitlab.tasks import create_task_model, get_task
from vitlab.tasks.detection.mono3d import (
    alpha_to_yaw,
    average_precision,
    geometric_depth,
    heading_decode,
    heading_encode,
    lid_bins,
    lid_focal_loss,
    lid_index,
    yaw_to_alpha,
)


def _model(**kw):
    tiny = {"embed_dim": 32, "depth": 3, "num_heads": 2}
    return create_task_model(
        "monodino_detr", "vit_micro_patch4_28", backbone_kwargs=tiny, **{**get_task("monodino_detr").test_kwargs, **kw}
    )


def test_lid_bins_increase_cover_the_range_and_round_trip():
    edges, values = lid_bins(40, 1.0, 30.0)
    assert edges[0] == pytest.approx(1.0)
    assert edges[-1] == pytest.approx(30.0)
    widths = edges.diff()
    assert bool((widths > 0).all())
    assert torch.allclose(widths.diff(), widths.diff()[0].expand(39), rtol=1e-3)
    assert bool((values[:-1].diff() > 0).all())
    assert values[-1] == 30.0
    assert bool(((values[:-1] > edges[:-1]) & (values[:-1] < edges[1:])).all())
    assert torch.equal(lid_index(values[:-1], 40, 1.0, 30.0), torch.arange(40))  # depth -> bin -> depth
    assert torch.equal(lid_index(edges[:-1] + 1e-4, 40, 1.0, 30.0), torch.arange(40))
    outside = lid_index(torch.tensor([0.5, 30.0, 80.0, 0.0, -1.0]), 40, 1.0, 30.0)
    assert outside.tolist() == [40, 40, 40, -1, -1]


def test_geometric_depth_is_exact_for_a_board_facing_the_camera():
    fy, cy, y, z, h = 90.0, 30.0, 0.4, 7.5, 1.6
    top, bottom = fy * (y - h / 2) / z + cy, fy * (y + h / 2) / z + cy  # projected top and bottom edges
    assert geometric_depth(torch.tensor(h), torch.tensor(bottom - top), fy).item() == pytest.approx(z, rel=1e-5)


def test_heading_and_observation_angle_round_trip():
    yaw = torch.tensor([-1.2, -0.3, 0.0, 0.7, 3.0])
    x, z = torch.tensor([-2.0, 1.0, 0.0, 3.0, -0.5]), torch.tensor([5.0, 8.0, 4.0, 10.0, 6.0])
    fx, cx = torch.tensor(96.0), torch.tensor(48.0)
    alpha = yaw_to_alpha(yaw, x, z)
    assert torch.allclose(alpha_to_yaw(alpha, fx * x / z + cx, cx, fx), yaw, atol=1e-5)
    index, residual = heading_encode(alpha, 12)
    logits = torch.nn.functional.one_hot(index, 12).float()
    residuals = residual[:, None].expand(-1, 12)
    assert torch.allclose(heading_decode(logits, residuals), alpha, atol=1e-5)
    assert bool((residual.abs() <= math.pi / 12 + 1e-6).all())


def test_center_distance_ap_is_100_when_perfect_and_drops_beyond_the_threshold():
    from vitlab.tasks.detection.metrics3d import Mono3DMetrics

    centers = torch.tensor([[0.0, 1.0, 5.0], [2.0, 1.0, 9.0], [-1.0, 1.0, 14.0]])
    labels = torch.tensor([0, 1, 0])
    gt = [{"centers": centers, "labels": labels}, {"centers": torch.zeros(0, 3), "labels": torch.zeros(0).long()}]

    def run(shift: float) -> dict:
        metric = Mono3DMetrics()
        moved = centers + torch.tensor([0.0, 0.0, shift])
        preds = [
            {"centers": moved, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": labels},
            gt[1] | {"scores": torch.zeros(0)},
        ]
        metric.update(preds, gt, (moved, centers))
        return metric.compute()

    perfect = run(0.0)
    assert perfect["ap_center"] == pytest.approx(100.0)
    assert perfect["depth_abs_rel"] == pytest.approx(0.0)
    assert perfect["center_error"] == pytest.approx(0.0)
    moved = run(0.8)  # beyond 0.5 m, within 1 and 2 m
    assert moved["ap_center_0.5"] == 0.0
    assert moved["ap_center_1"] == pytest.approx(100.0)
    assert moved["ap_center_2"] == pytest.approx(100.0)
    assert run(5.0)["ap_center"] == 0.0
    assert moved["center_error"] == pytest.approx(0.8)


def test_average_precision_ranks_by_score():
    # a false positive ranked above the only true one halves the precision at full recall
    assert average_precision(torch.tensor([0.9, 0.5]), torch.tensor([False, True]), 1) == pytest.approx(0.5)
    assert average_precision(torch.tensor([0.5, 0.9]), torch.tensor([False, True]), 1) == pytest.approx(1.0)
    assert average_precision(torch.tensor([0.9]), torch.tensor([True]), 2) == pytest.approx(0.5)


def test_depth_map_loss_ignores_invalid_pixels():
    logits = torch.randn(1, 9, 4, 4, requires_grad=True)
    depth = torch.full((1, 8, 8), 5.0)
    depth[:, :4] = 0.0  # the top half has no depth
    base = lid_focal_loss(logits, depth, 8, 1.0, 20.0)
    other = logits.detach().clone()
    other[:, :, :2] = torch.randn(1, 9, 2, 4)  # the cells over the invalid rows
    assert lid_focal_loss(other, depth, 8, 1.0, 20.0).item() == pytest.approx(base.item())
    base.backward()
    assert bool((logits.grad[:, :, :2] == 0).all())
    assert bool((logits.grad[:, :, 2:] != 0).any())
    empty = lid_focal_loss(logits, torch.zeros(1, 8, 8), 8, 1.0, 20.0)
    assert empty.item() == 0.0
    assert empty.requires_grad


def test_switching_cues_off_removes_their_parts():
    full = _model()
    names = {n for n, _ in full.named_parameters()}
    assert any(n.startswith("dpt.") for n in names)
    assert any("depth_attn" in n for n in names)
    no_attention = {n for n, _ in _model(depth_attention=False).named_parameters()}
    assert not any("depth_attn" in n or n.startswith(("depth_encoder", "depth_embed")) for n in no_attention)
    assert any(n.startswith("dpt.") for n in no_attention)
    baseline = {n for n, _ in _model(depth_head=False, depth_attention=False).named_parameters()}
    assert not any(n.startswith(("dpt.", "depth_cnn", "depth_classifier")) for n in baseline)
    batch = _model().example_batch(2)
    out = _model(depth_head=False, depth_attention=False, geometric_depth=False)(batch["image"])
    assert "geo_ratio" not in out
    assert "depth_map_at" not in out
    assert "depth_logits" not in out
    with pytest.raises(ValueError, match="needs depth_head"):
        _model(depth_head=False)


def test_frozen_backbone_trains_only_the_detector():
    model = _model(freeze_backbone=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("backbone.", "dpt."))}


def test_missing_or_singular_intrinsics_are_named():
    model = _model()
    batch = model.example_batch(2)
    output = model(batch["image"])
    with pytest.raises(ValueError, match="no 'intrinsics'"):
        model.loss(output, {k: v for k, v in batch.items() if k != "intrinsics"})
    singular = batch["intrinsics"].clone()
    singular[1, 1, 1] = 0.0
    with pytest.raises(ValueError, match=r"intrinsics'\]\[1\] is singular"):
        model.loss(output, {**batch, "intrinsics": singular})
    with pytest.raises(ValueError, match="boxes3d"):
        model.loss(output, {k: v for k, v in batch.items() if k != "boxes3d"})


def test_example_batch_targets_are_consistent():
    model = _model()
    batch = model.example_batch(3)
    K = batch["intrinsics"][0]
    for boxes, box3d, centers in zip(batch["boxes"], batch["boxes3d"], batch["centers2d"], strict=True):
        projected = (box3d[:, :3] @ K.T)[:, :2] / box3d[:, 2:3]
        assert torch.allclose(projected, centers, atol=1e-4)
        # the projected centre lies in its 2-D box
        assert bool(((centers >= boxes[:, :2] - 1e-3) & (centers <= boxes[:, 2:] + 1e-3)).all())
    assert len(batch["labels"][-1]) == 0


def test_dpt_head_shapes_and_scale_shift_invariance():
    head = DPTHead(16, (4, 2, 1), features=8)
    maps = [torch.randn(2, 16, 5, 5) for _ in range(3)]
    depth, fused = head(maps, (20, 20))
    assert depth.shape == (2, 1, 20, 20)
    assert bool((depth >= 0).all())
    assert fused.shape[:2] == (2, 8)
    target = torch.rand(2, 6, 6) + 0.5
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    assert scale_shift_invariant_loss(3.0 * target - 1.0, target, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert scale_shift_invariant_loss(torch.rand(2, 6, 6), target, mask).item() > 0
