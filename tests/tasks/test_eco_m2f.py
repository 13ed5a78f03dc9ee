"""ECO-M2F and its Mask2Former-lite: what the registry-wide contract test cannot see.

Masked attention masks (and falls back when a mask is empty), the mask matcher is optimal, exit k runs exactly k
encoder layers and costs more the later it is, step A's draw and its exact expectation agree, step B's labels follow
``argmax_k (q_k - beta k)``, step C changes only the gate, inference and metrics are right on hand-made predictions,
and bad input is refused with a clear error.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from vitlab.data.synthetic import SceneDataset
from vitlab.models import get_variant
from vitlab.tasks import create_task_model, get_task
from vitlab.tasks.segmentation.eco_m2f import EcoM2F, encoder_flops, exit_qualities, label_exits, train_gate
from vitlab.tasks.segmentation.mask2former import _Attention, attention_mask
from vitlab.tasks.segmentation.mask_classification import MaskMatcher, panoptic_inference, semantic_inference


def _model(backbone: str = "vit_micro_patch4_28", **kw) -> EcoM2F:
    tiny = {k: v for k, v in get_variant(backbone).test_kwargs.items() if k != "img_size"}
    return create_task_model("eco_m2f", backbone, backbone_kwargs=tiny, **{**get_task("eco_m2f").test_kwargs, **kw})


def _batch(model: EcoM2F, n: int = 2) -> dict:
    return model.example_batch(batch_size=n, generator=torch.Generator().manual_seed(0))


def _scenes(model: EcoM2F, n: int = 4) -> SceneDataset:
    """The example batch as a scene data set (uint8 images), as steps B and C take it."""
    batch = _batch(model, n)
    image = batch["image"]
    image = ((image - image.min()) / (image.max() - image.min()) * 255).round().to(torch.uint8)
    counts = torch.tensor([len(lab) for lab in batch["labels"]])
    return SceneDataset(
        images=image,
        panoptic=batch["panoptic"].to(torch.uint8),
        labels=torch.cat(batch["labels"]),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        thing_classes=[f"c{k}" for k in range(model.num_classes - 1)],
        mean=(0.5,),
        std=(0.25,),
    )


def test_masked_attention_ignores_keys_outside_the_mask():
    attn = _Attention(16, 2).eval()
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # query 0 may look at the top-left 2 x 2 only
    logits[0, 1] = 5.0  # query 1 everywhere
    mask = attention_mask(logits, (4, 4))
    assert mask.shape == (1, 1, 3, 16)
    assert mask.dtype == torch.bool
    q, memory = torch.randn(1, 3, 16), torch.randn(1, 16, 16)
    inside = (logits[0, 0] > 0).flatten()
    changed = torch.where(inside[None, :, None], memory, torch.randn(1, 16, 16))
    with torch.no_grad():
        a, b = attn(q, memory, memory, mask), attn(q, changed, changed, mask)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_all_masked_query_falls_back_to_attending_everywhere():
    attn = _Attention(16, 2).eval()
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 1, 0, 0] = 5.0
    mask = attention_mask(logits, (4, 4))
    assert bool(mask[0, 0, 0].all())  # query 0's mask is empty: it may look everywhere
    assert int(mask[0, 0, 1].sum()) == 1
    q, memory = torch.randn(1, 2, 16), torch.randn(1, 16, 16)
    with torch.no_grad():
        masked, free = attn(q, memory, memory, mask), attn(q, memory, memory)
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked[:, 0], free[:, 0])
    # resampling to a coarser level keeps the fallback: a tiny mask can vanish there
    assert bool(attention_mask(logits, (1, 1))[0, 0].all())


@pytest.mark.parametrize("seed", range(4))
def test_mask_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, M, K = 5, 3, 4
    logits, masks = torch.randn(1, Q, K + 1, generator=g), torch.randn(1, Q, 4, 4, generator=g)
    target = {"labels": torch.randint(0, K, (M,), generator=g), "masks": torch.rand(M, 8, 8, generator=g) > 0.5}
    matcher = MaskMatcher()
    ((rows, cols),) = matcher(logits, masks, [target])
    up = F.interpolate(masks, size=(8, 8), mode="bilinear", align_corners=False)[0]
    cost = matcher.cost_matrix(logits[0], up, target["labels"], target["masks"])
    # each entry is the weighted class / BCE / dice cost of that pair, computed directly
    q, m = 1, 2
    p, t = up[q].flatten(), target["masks"][m].flatten().float()
    dice = 1 - (2 * (p.sigmoid() * t).sum() + 1) / (p.sigmoid().sum() + t.sum() + 1)
    bce = F.binary_cross_entropy_with_logits(p, t)
    direct = -2 * logits[0, q].softmax(-1)[target["labels"][m]] + 5 * bce + 5 * dice
    torch.testing.assert_close(cost[q, m], direct)
    best = min(sum(cost[perm[j], j] for j in range(M)) for perm in itertools.permutations(range(Q), M))
    assert sorted(cols.tolist()) == list(range(M))
    torch.testing.assert_close(cost[rows, cols].sum(), torch.as_tensor(best))
    # no targets: nothing matched
    ((rows, cols),) = matcher(logits, masks, [{"labels": target["labels"][:0], "masks": target["masks"][:0]}])
    assert len(rows) == len(cols) == 0


def test_exit_k_runs_k_encoder_layers_and_costs_more_later():
    model = _model().eval()
    calls: list[int] = []
    for layer in model.pixel_decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    image = _batch(model)["image"]
    with torch.no_grad():
        for k in model.exits:
            calls.clear()
            assert model.forward_at(image, k)["exit"].tolist() == [k, k]
            assert len(calls) == k
        # per-image exits: an image leaves the batch at its exit, and gets what it gets alone at that exit
        calls.clear()
        out = model.forward_at(image, torch.tensor([5, 2]))
        assert calls == [2, 2, 1, 1, 1]
        for i, k in enumerate((5, 2)):
            alone = model.forward_at(image[i : i + 1], k)
            torch.testing.assert_close(out["pred_masks"][i : i + 1], alone["pred_masks"], atol=1e-5, rtol=1e-4)
        assert model.exits == (2, 3, 4, 5, 6)
        assert model(image)["exit"].tolist() == [6, 6]  # eval, exit None: the deepest
    flops = encoder_flops(model)
    costs = [flops[k] for k in model.exits]
    assert all(a < b for a, b in itertools.pairwise(costs))
    assert costs[0] == pytest.approx(2 * costs[-1] / 6, rel=1e-6)  # identical layers: linear in depth
    assert 0 < flops["gate"] < costs[0]


def test_step_a_draw_and_its_expectation():
    model = _model().train()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([model.sample_exit(g) for _ in range(4000)])
    freq = torch.stack([(draws == k).float().mean() for k in model.exits])
    torch.testing.assert_close(freq, model.exit_weights, atol=0.03, rtol=0)
    torch.testing.assert_close(model.exit_weights, torch.tensor([2.0, 3, 4, 5, 6]) / 20)
    batch = _batch(model)
    model.exit = None
    assert model(batch["image"])["exit"].unique().numel() == 1  # one exit per step
    # exit="all" is the exact expectation: the alpha-weighted sum of the fixed-exit losses
    fixed = [model.loss(model.forward_at(batch["image"], k), batch)["loss"] for k in model.exits]
    expected = sum(w * loss for w, loss in zip(model.exit_weights, fixed, strict=True))
    torch.testing.assert_close(model.loss(model.forward_at(batch["image"], "all"), batch)["loss"], expected)


def test_step_b_labels_follow_the_utility():
    model = _model().eval()
    scenes = _scenes(model)
    q = exit_qualities(model, scenes, batch_size=3)
    assert q.shape == (4, 5)
    assert bool(((q >= 0) & (q <= 1)).all())
    assert torch.equal(label_exits(model, scenes, 0.0, qualities=q), model.exit_tensor()[q.argmax(1)])
    assert label_exits(model, scenes, 1e6, qualities=q).tolist() == [2, 2, 2, 2]
    assert torch.equal(label_exits(model, scenes, 0.01, batch_size=3), label_exits(model, scenes, 0.01, qualities=q))
    hand = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.9], [0.4, 0.4, 0.4, 0.4, 0.4], [0.0, 0.0, 0.3, 0.31, 0.32]])
    assert label_exits(model, scenes, 0.0, qualities=hand).tolist() == [6, 2, 6]  # ties: the cheaper exit
    assert label_exits(model, scenes, 0.05, qualities=hand).tolist() == [6, 2, 4]
    assert exit_qualities(model, scenes, metric="miou").shape == (4, 5)


def test_step_c_changes_only_the_gate():
    model = _model(backbone="tiny_vit_1m_28").eval()  # BatchNorm in the backbone: its statistics must not move
    scenes = _scenes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_gate(model, scenes, torch.tensor([2, 6, 6, 3]), epochs=5, lr=0.1, batch_size=2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"gate.weight", "gate.bias"}
    assert len(history) == 5
    assert history[-1] < history[0]
    assert not any(p.requires_grad for p in model.gate.parameters())
    # exit="gate": each image runs to its gate's arg-max exit, reported in the summary's histogram
    batch = _batch(model, 4)
    with torch.no_grad():
        chosen = model.gate(model.gate_features(batch["image"])).argmax(-1) + 2
        model.exit = "gate"
        out = model(batch["image"])
    assert torch.equal(out["exit"], chosen)
    metrics = model.build_metrics()
    model.update_metrics(metrics, out, batch)
    summary = model.summarize_metrics(metrics)
    assert summary["exit_histogram"] == [int((chosen == k).sum()) for k in model.exits]
    assert summary["mean_exit"] == pytest.approx(chosen.float().mean().item())


def test_semantic_and_panoptic_inference():
    model = _model().eval()
    with torch.no_grad():
        out = model(_batch(model)["image"])
    scores = semantic_inference(out["pred_logits"], out["pred_masks"])
    assert scores.shape == (2, model.num_classes, *out["pred_masks"].shape[-2:])
    manual = (out["pred_logits"].softmax(-1)[0, :, 3, None, None] * out["pred_masks"][0].sigmoid()).sum(0)
    torch.testing.assert_close(scores[0, 3], manual)
    semantic = model.postprocess(out)["semantic"]
    assert semantic.shape == (2, 32, 32)
    assert semantic.dtype == torch.int64
    assert int(semantic.min()) >= 0
    assert int(semantic.max()) < model.num_classes
    # hand-made queries: two things (class 3), the background (stuff 0), a no-object and an unsure one
    logits = torch.full((1, 5, 5), -10.0)
    logits[0, [0, 1], 3] = logits[0, 2, 0] = logits[0, 3, 4] = 10.0
    logits[0, 4, 1] = 0.0  # top score well below 0.8
    masks = torch.full((1, 5, 8, 8), -10.0)
    masks[0, 0, :4, :4] = masks[0, 1, 4:, 4:] = masks[0, 3] = masks[0, 4] = 10.0
    masks[0, 2, :4, 4:] = 10.0  # background only in the top-right; the bottom-left stays unclaimed
    category, instance = panoptic_inference(logits, masks, things=[1, 2, 3])
    assert (category[0, 0, 0], category[0, 7, 7], category[0, 0, 7]) == (3, 3, 0)
    assert (instance[0, 0, 0], instance[0, 7, 7], instance[0, 0, 7]) == (1, 2, 0)
    assert (category[0, 7, 0], instance[0, 7, 0]) == (0, 0)  # unclaimed: background, not void


def test_perfect_predictions_score_100():
    model = _model().eval()
    model.mask_stride = 1  # predictions at full resolution, so they can be exact
    batch = _batch(model)
    Q, K = model.decoder.query_feat.num_embeddings, model.num_classes
    logits = torch.full((2, Q, K + 1), -20.0)
    logits[..., K] = 20.0  # unused queries: no object
    masks = torch.full((2, Q, 32, 32), -20.0)
    for b, target in enumerate(model.targets(batch)):
        for j, (label, mask) in enumerate(zip(target["labels"], target["masks"], strict=True)):
            logits[b, j] = -20.0
            logits[b, j, label] = 20.0
            masks[b, j][mask] = 20.0
    out = {"pred_logits": logits, "pred_masks": masks, "exit": torch.tensor([6, 6])}
    metrics = model.build_metrics()
    model.update_metrics(metrics, out, batch)
    summary = model.summarize_metrics(metrics)
    assert summary["pq"] == pytest.approx(100.0)
    assert summary["miou"] == pytest.approx(100.0)
    preds = model.postprocess(out)
    assert torch.equal(preds["semantic"], batch["semantic"])
    for got, want in zip(preds["labels"], batch["labels"], strict=True):
        assert sorted(got.tolist()) == sorted(want.tolist())


def test_a_scene_without_objects_trains():
    model = _model().train()
    batch = _batch(model)
    batch["masks"][1] = batch["masks"][1][:0]
    batch["labels"][1] = batch["labels"][1][:0]
    loss = model.loss(model.forward_at(batch["image"], 3), batch)
    assert torch.isfinite(loss["loss"])
    assert loss["exit"] == 3


def test_bad_input_is_refused():
    model = _model()
    for bad in (7, 1, "first", True, 2.0):
        with pytest.raises(ValueError, match="exit must be one of"):
            model.exit = bad
    with pytest.raises(ValueError, match="exit must be one of"):
        _model(exit=9)
    with pytest.raises(ValueError, match="per-image exits"):
        model.forward_at(_batch(model)["image"], torch.tensor([2, 3, 4]))
    with pytest.raises(ValueError, match="per-image exits"):
        model.forward_at(_batch(model)["image"], torch.tensor([2, 8]))
    with pytest.raises(ValueError, match="min_exit"):
        _model(min_exit=7)
    scenes = _scenes(model)
    for beta in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="beta must be"):
            label_exits(model, scenes, beta)
    with pytest.raises(ValueError, match="qualities must be"):
        label_exits(model, scenes, 0.0, qualities=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="metric must be"):
        exit_qualities(model, scenes, metric="ap")
    with pytest.raises(ValueError, match="empty"):
        label_exits(model, scenes.subset([]), 0.0)
    with pytest.raises(ValueError, match="empty"):
        train_gate(model, scenes.subset([]), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        train_gate(model, scenes, torch.tensor([2, 3, 9, 4]), epochs=1)
    batch = _batch(model)
    out = model(batch["image"])
    with pytest.raises(ValueError, match=r"batch\['labels'\]\[0\]"):
        model.loss(out, {**batch, "labels": [batch["labels"][0] + 20, batch["labels"][1]]})
    with pytest.raises(ValueError, match=r"batch\['masks'\]"):
        model.loss(out, {**batch, "masks": batch["masks"][:1]})
