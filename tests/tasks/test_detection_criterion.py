"""The DETR set criterion, the Hungarian matcher and the detection metrics (tasks/detection/).

The matcher is checked against a brute-force minimum over every assignment of the same cost matrix, and the
cost matrix against a per-pair computation written out in plain Python; the criterion by properties the maths
guarantees (zero box loss at the targets, query-permutation invariance, aux == main for equal outputs).
"""

import itertools
import math

import pytest
import torch
from torchvision.ops import box_convert

from vitlab.tasks.detection import DEFAULT_WEIGHTS, HungarianMatcher, SetCriterion, targets_from_batch
from vitlab.tasks.detection.metrics import DetectionMetrics, postprocess_detections


def _random_case(seed, B=2, Q=6, K=3, max_targets=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, K, generator=g) * 2
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(B, Q, 2, generator=g) * 0.3 + 0.05], -1)
    targets = []
    for _ in range(B):
        M = int(torch.randint(0, max_targets + 1, (1,), generator=g))
        cxcy = torch.rand(M, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(M, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, K, (M,), generator=g), "boxes": torch.cat([cxcy, wh], -1)})
    return logits, boxes, targets


def _pair_cost(logit_row, box, label, tbox, alpha=0.25, gamma=2.0, w=(2.0, 5.0, 2.0)):
    """The matching cost of one (query, target) pair, in plain Python floats."""
    x = float(logit_row[label])
    p = 1 / (1 + math.exp(-x))
    focal = alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p**gamma * -math.log(1 - p)
    l1 = sum(abs(float(a) - float(b)) for a, b in zip(box, tbox, strict=True))

    def xyxy(b):
        cx, cy, bw, bh = (float(v) for v in b)
        return cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2

    (a1, b1, a2, b2), (c1, d1, c2, d2) = xyxy(box), xyxy(tbox)
    inter = max(0.0, min(a2, c2) - max(a1, c1)) * max(0.0, min(b2, d2) - max(b1, d1))
    union = (a2 - a1) * (b2 - b1) + (c2 - c1) * (d2 - d1) - inter
    hull = (max(a2, c2) - min(a1, c1)) * (max(b2, d2) - min(b1, d1))
    giou = inter / union - (hull - union) / hull
    return w[0] * focal + w[1] * l1 - w[2] * giou


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed):
    Q = 3 + seed % 4  # 3..6 queries
    logits, boxes, targets = _random_case(seed, Q=Q, max_targets=min(4, Q))
    matcher = HungarianMatcher()
    costs = matcher.cost_matrix(logits, boxes, targets)
    indices = matcher(logits, boxes, targets)
    for b, (cost, (qi, ti)) in enumerate(zip(costs, indices, strict=True)):
        M = len(targets[b]["labels"])
        assert cost.shape == (Q, M)
        labels, tboxes = targets[b]["labels"].tolist(), targets[b]["boxes"]
        direct = torch.tensor(
            [[_pair_cost(logits[b, q], boxes[b, q], labels[m], tboxes[m]) for m in range(M)] for q in range(Q)]
        ).view(Q, M)
        torch.testing.assert_close(cost, direct.float(), rtol=1e-5, atol=1e-5)
        assert qi.dtype == ti.dtype == torch.long
        assert len(qi) == len(ti) == M
        assert sorted(ti.tolist()) == list(range(M))
        assert len(set(qi.tolist())) == M
        # brute force: target m goes to query perm[m]
        c = cost.tolist()
        best = min(itertools.permutations(range(Q), M), key=lambda perm: sum(c[q][m] for m, q in enumerate(perm)))
        found = dict(zip(ti.tolist(), qi.tolist(), strict=True))
        assert [found[m] for m in range(M)] == list(best)


def test_matcher_empty_images_and_errors():
    logits, boxes, _ = _random_case(0, B=2, Q=3)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    indices = HungarianMatcher()(logits, boxes, [empty, one])
    assert [len(q) for q, _ in indices] == [0, 1]
    many = {"labels": torch.zeros(4, dtype=torch.long), "boxes": torch.full((4, 4), 0.3)}
    with pytest.raises(ValueError, match="4 targets but the model makes only 3 queries"):
        HungarianMatcher()(logits, boxes, [empty, many])
    bad = boxes.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image 1 is NaN.*bbox"):
        HungarianMatcher()(logits, bad, [empty, one])
    with pytest.raises(ValueError, match=r"label 7; expected 0\.\.2 for K=3"):
        HungarianMatcher()(logits, boxes, [empty, {"labels": torch.tensor([7]), "boxes": one["boxes"]}])
    with pytest.raises(ValueError, match="list of 2 dicts"):
        HungarianMatcher()(logits, boxes, [one])


def _exact_outputs(targets, Q, K, seed=0):
    """Outputs whose first M queries sit exactly on the targets (in a shuffled order), confident of their class."""
    g = torch.Generator().manual_seed(seed)
    B = len(targets)
    logits = torch.full((B, Q, K), -8.0)
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.2 + 0.05, torch.full((B, Q, 2), 0.05)], -1)
    for b, t in enumerate(targets):
        order = torch.randperm(len(t["labels"]), generator=g)
        boxes[b, : len(order)] = t["boxes"][order]
        logits[b, torch.arange(len(order)), t["labels"][order]] = 8.0
    return logits, boxes


def _scene_targets():
    return [
        {
            "labels": torch.tensor([0, 2, 1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.7, 0.3, 0.1, 0.1], [0.3, 0.7, 0.2, 0.2]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.2]])},
    ]


def test_criterion_zero_box_loss_at_the_targets():
    targets = _scene_targets()
    logits, boxes = _exact_outputs(targets, Q=5, K=3)
    out = SetCriterion(3)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert float(out["loss_bbox"]) == 0.0
    assert float(out["loss_giou"]) < 1e-4  # torchvision adds eps = 1e-7 to the union (boxes of area ~0.01)
    assert float(out["loss_class"]) < 1e-3  # confident and right: only the focal loss's tiny residue
    assert set(out) == {"loss", "loss_class", "loss_bbox", "loss_giou"}
    weighted = sum(DEFAULT_WEIGHTS[k] * out[k] for k in SetCriterion.TERMS)
    torch.testing.assert_close(out["loss"], weighted)


def test_criterion_normalises_by_the_number_of_target_boxes():
    targets = _scene_targets()
    logits, boxes = _exact_outputs(targets, Q=5, K=3)
    boxes[..., 0] += 0.01  # every box moved right by 0.01: L1 per matched box = 0.01
    criterion = SetCriterion(3)
    out = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    torch.testing.assert_close(out["loss_bbox"], torch.tensor(0.01))
    # the batch repeated: twice the boxes, twice the summed loss, the same normalised loss
    doubled = criterion({"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}, targets * 2)
    for key in out:
        torch.testing.assert_close(doubled[key], out[key])


def test_criterion_is_invariant_to_query_order():
    logits, boxes, targets = _random_case(3, B=2, Q=6, K=3)
    criterion = SetCriterion(3)
    base = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    shuffled = criterion({"pred_logits": logits[:, perm], "pred_boxes": boxes[:, perm]}, targets)
    for key in base:
        torch.testing.assert_close(shuffled[key], base[key])


def test_aux_losses_are_named_per_layer_and_equal_the_main_loss_for_equal_outputs():
    logits, boxes, targets = _random_case(4, B=2, Q=6, K=3)
    main = {"pred_logits": logits, "pred_boxes": boxes}
    out = SetCriterion(3)({**main, "aux_outputs": [dict(main), dict(main)]}, targets)
    expected = {f"{t}{s}" for t in SetCriterion.TERMS for s in ("", "_0", "_1")} | {"loss"}
    assert set(out) == expected
    for term in SetCriterion.TERMS:
        torch.testing.assert_close(out[f"{term}_0"], out[term])
        torch.testing.assert_close(out[f"{term}_1"], out[term])
    alone = SetCriterion(3)(main, targets)["loss"]
    torch.testing.assert_close(out["loss"], 3 * alone)


def test_gradients_reach_logits_and_boxes():
    logits, boxes, targets = _random_case(5, B=2, Q=6, K=3)
    targets[0] = _scene_targets()[0]  # at least one target
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    aux_boxes = boxes.detach().clone().requires_grad_(True)
    out = SetCriterion(3)(
        {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits, "pred_boxes": aux_boxes}]},
        targets,
    )
    out["loss"].backward()
    for t in (logits, boxes, aux_boxes):
        assert t.grad is not None
        assert bool(torch.isfinite(t.grad).all())
        assert float(t.grad.abs().sum()) > 0
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")  # logs are detached


def test_all_empty_batch_has_a_finite_loss_and_a_graph():
    B, Q, K = 2, 4, 3
    logits = torch.randn(B, Q, K, requires_grad=True)
    boxes = torch.rand(B, Q, 4).mul(0.3).add(0.2).requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(B)]
    out = SetCriterion(K)({"pred_logits": logits, "pred_boxes": boxes}, empty)
    assert bool(torch.isfinite(out["loss"]))
    assert float(out["loss_class"]) > 0
    assert float(out["loss_bbox"]) == float(out["loss_giou"]) == 0.0
    out["loss"].backward()
    assert bool((logits.grad > 0).all())  # every score is pushed towards background
    assert boxes.grad is not None
    assert float(boxes.grad.abs().sum()) == 0.0


def test_criterion_rejects_bad_inputs():
    logits, boxes, targets = _random_case(6, B=2, Q=6, K=3)
    criterion = SetCriterion(3)
    with pytest.raises(ValueError, match="num_classes=3"):
        criterion({"pred_logits": logits[..., :2], "pred_boxes": boxes}, targets)
    with pytest.raises(ValueError, match=r"pred_boxes must be \(B, Q, 4\)"):
        criterion({"pred_logits": logits, "pred_boxes": boxes[..., :3]}, targets)
    with pytest.raises(ValueError, match=r"aux_outputs'\]\[0\] must be a dict"):
        criterion({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits}]}, targets)
    with pytest.raises(ValueError, match="unknown terms"):
        SetCriterion(3, weight_dict={"loss_ce": 1.0})


def test_targets_from_batch_normalises_clips_and_validates():
    batch = {
        "image": torch.zeros(2, 1, 40, 80),
        "boxes": [torch.tensor([[0.0, 0.0, 80.0, 40.0], [-10.0, 20.0, 20.0, 50.0]]), torch.zeros(0, 4)],
        "labels": [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)],
    }
    targets = targets_from_batch(batch, (40, 80), num_classes=3)
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.125, 0.75, 0.25, 0.5]]))
    assert targets[1]["boxes"].shape == (0, 4)
    assert targets[0]["labels"].tolist() == [0, 2]

    def bad(boxes, labels, match):
        with pytest.raises(ValueError, match=match):
            targets_from_batch({"boxes": [boxes], "labels": [labels]}, 64, num_classes=3)

    bad(torch.tensor([[70.0, 10.0, 90.0, 20.0]]), torch.tensor([0]), r"image 0, box 0 .* lies outside 64x64")
    bad(torch.tensor([[10.0, 10.0, 10.0, 20.0]]), torch.tensor([0]), r"box 0 .* x2 <= x1")
    bad(torch.tensor([[10.0, 10.0, 20.0, 20.0]]), torch.tensor([3]), r"label 3; expected 0\.\.2 for K=3")
    bad(torch.tensor([[10.0, 10.0, 20.0, 20.0]]), torch.tensor([0, 1]), r"must be float \(2, 4\)")


def _pixel_targets():
    return [
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 5.0, 60.0, 25.0]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[5.0, 30.0, 25.0, 60.0]]), "labels": torch.tensor([2])},
    ]


def test_metrics_perfect_and_shifted_predictions():
    targets = _pixel_targets()
    perfect = [{**t, "scores": torch.full((len(t["labels"]),), 0.9)} for t in targets]
    metric = DetectionMetrics()
    metric.update(perfect, targets)
    result = metric.compute()
    assert result["map_50"] == pytest.approx(100.0)
    assert result["map"] == pytest.approx(100.0)
    assert isinstance(result["map"], float)
    assert result["map_large"] is None
    # every box 20 wide, shifted right by 16: IoU = 80 / 720 < 0.5
    metric = DetectionMetrics()
    metric.update([{**p, "boxes": p["boxes"] + torch.tensor([16.0, 0.0, 16.0, 0.0])} for p in perfect], targets)
    assert metric.compute()["map_50"] == 0.0


def test_metrics_empty_scene_does_not_crash():
    metric = DetectionMetrics()
    empty_pred = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    metric.update([empty_pred], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert metric.compute()["map"] is None


def test_postprocess_top_k_and_round_trip():
    targets = _scene_targets()
    logits, boxes = _exact_outputs(targets, Q=5, K=3)
    dets = postprocess_detections(logits, boxes, image_size=64, top_k=4)
    assert len(dets) == 2
    assert all(d["boxes"].shape == (4, 4) and d["scores"].shape == (4,) for d in dets)
    assert all(bool((d["scores"][:-1] >= d["scores"][1:]).all()) for d in dets)
    # the confident queries come first, with their class and their box in pixels
    pixel = [{"boxes": box_convert(t["boxes"] * 64, "cxcywh", "xyxy"), "labels": t["labels"]} for t in targets]
    assert dets[0]["scores"][2] > 0.99 > dets[0]["scores"][3]
    assert sorted(dets[0]["labels"][:3].tolist()) == [0, 1, 2]
    torch.testing.assert_close(dets[0]["boxes"][dets[0]["labels"] == 0][:1], pixel[0]["boxes"][:1])
    assert postprocess_detections(logits, boxes, 64, top_k=1000)[0]["boxes"].shape == (5 * 3, 4)  # k <= Q * K
    clipped = postprocess_detections(logits, torch.full_like(boxes, 0.9), (32, 64), top_k=2)[0]["boxes"]
    assert float(clipped[:, 2].max()) == 64.0
    assert float(clipped[:, 3].max()) == 32.0
    # the round trip: decoded detections of the exact outputs score 100 mAP against the pixel targets
    metric = DetectionMetrics()
    metric.update(postprocess_detections(logits, boxes, 64), pixel)
    assert metric.compute()["map"] == pytest.approx(100.0)
