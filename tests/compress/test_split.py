"""ED-ViT class-wise split (``compress/split.py`` + the build in ``engine/split_run.py``): the partition covers
every class once, an unpruned untrained split is the host itself (N=1 included), greedy placement respects the
budgets, class-wise pruning shrinks a part and is recorded, a saved split reloads with the same outputs, and bad
input (N, hosts, fractions) is a one-line error."""

import random

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.compress import surgery_of
from vitlab.compress.split import (
    FusionHead,
    SplitModel,
    check_partition,
    greedy_placement,
    make_submodel,
    param_count,
    partition_classes,
    prune_part,
    remap_labels,
)
from vitlab.engine.split_run import build_split, evaluate_split, load_split, save_split

TINY = vitlab.get_variant("vit_micro_patch4_28").test_kwargs  # 32 wide, 2 blocks, 2 heads


def _host(name: str = "vit_micro_patch4_28", **kw) -> nn.Module:
    return vitlab.create_model(name, num_classes=10, in_chans=1, **kw).eval()


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 28, 28), torch.arange(n) % 10


@pytest.mark.parametrize(("classes", "parts"), [(10, 1), (10, 2), (10, 3), (10, 5), (10, 10), (7, 3), (1000, 7)])
def test_partition_covers_every_class_exactly_once(classes, parts):
    split = partition_classes(classes, parts)
    assert len(split) == parts
    assert sorted(c for part in split for c in part) == list(range(classes))
    assert max(map(len, split)) - min(map(len, split)) <= 1
    check_partition(split, classes)


@pytest.mark.parametrize("parts", [0, -1, 11, 2.0, True])
def test_bad_number_of_parts_is_a_one_line_error(parts):
    with pytest.raises(ValueError, match="--parts") as e:
        partition_classes(10, parts)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [[[0, 1], [1, 2]], [[0], [2]], [[0, 1, 2], []]])
def test_partition_check_rejects_overlaps_gaps_and_empty_parts(bad):
    with pytest.raises(ValueError, match=r"exactly once|empty"):
        check_partition(bad, 3)


def test_remap_labels_indexes_the_parts_logits():
    assert remap_labels(torch.tensor([7, 3, 9, 0]), [3, 7, 9]).tolist() == [1, 0, 2, -1]


def test_submodel_outputs_the_hosts_logits_of_its_classes():
    host, x = _host(**TINY), torch.randn(3, 1, 28, 28)
    sub = make_submodel(host, [8, 2, 5])
    torch.testing.assert_close(sub(x), host(x)[:, [8, 2, 5]])
    assert host.head.out_features == 10  # the host is untouched


@pytest.mark.parametrize("parts", [1, 3, 10])
def test_unpruned_untrained_split_is_the_host(parts):
    """The paper's losslessness when nothing is removed: N parts without pruning give the host's logits, so N=1
    (and any N) predicts exactly what the original model predicts."""
    host = _host(**TINY)
    x, y = _data()
    split, reports = build_split(host, x, y, parts, heads=0.0, mlp=0.0, distill_epochs=0, fusion_epochs=0)
    ref = host(x)
    for mode in ("mlp", "argmax"):
        torch.testing.assert_close(split(x, mode=mode), ref, atol=1e-6, rtol=0)
        assert torch.equal(split(x, mode=mode).argmax(1), ref.argmax(1))
    assert [r["prune"] for r in reports] == [None] * parts


def test_untrained_fusion_is_argmax_over_parts_and_training_changes_it():
    host = _host(**TINY)
    x, y = _data()
    split, _ = build_split(host, x, y, 2, distill_epochs=0, fusion_epochs=3)
    assert split.fusion.mlp[-1].weight.abs().sum() > 0  # the MLP learned a correction
    scores = evaluate_split(split, x, y)
    assert set(scores) == {"top1", "top1_argmax"}
    z = torch.cat(split.part_outputs(x), 1)
    torch.testing.assert_close(split.fusion(z, mode="argmax"), host(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="fusion mode"):
        split.fusion(z, mode="vote")


def test_greedy_placement_respects_budgets():
    rng, placed = random.Random(0), 0
    for _ in range(200):
        sizes = [rng.uniform(1, 10) for _ in range(rng.randint(1, 6))]
        budgets = [rng.uniform(5, 25) for _ in range(rng.randint(1, 4))]
        if sum(sizes) > max(budgets):  # may not fit; everything fitting on one device must always be placed
            continue
        devices = greedy_placement(sizes, budgets)
        placed += 1
        assert len(devices) == len(sizes)
        for d, budget in enumerate(budgets):
            assert sum(s for s, on in zip(sizes, devices, strict=True) if on == d) <= budget + 1e-9
    assert placed > 20
    # largest first, onto the device with most room: 3 -> d0 (tie), 2 -> d1, 1 -> d1 (1 left vs 0)
    assert greedy_placement([1, 2, 3], [3, 3]) == [1, 1, 0]


@pytest.mark.parametrize(("sizes", "budgets"), [([5], [4]), ([3, 3, 3], [4, 4]), ([2, 2], [])])
def test_greedy_placement_errors_when_impossible(sizes, budgets):
    with pytest.raises(ValueError, match=r"needs|budgets") as e:
        greedy_placement(sizes, budgets)
    assert "\n" not in str(e.value)


def test_classwise_pruning_shrinks_the_part_and_records_it():
    host = _host(**TINY)
    x, y = _data()
    classes = [0, 1, 2, 3]
    part = make_submodel(host, classes)
    own = torch.isin(y, torch.tensor(classes))
    batches = [{"image": x[own], "label": remap_labels(y[own], classes)}]
    before = param_count(part)
    report = prune_part(part, heads=0.5, mlp=0.5, batches=batches)
    assert report["heads_kept"] == [1, 1]
    assert param_count(part) < before
    assert surgery_of(part)[-1]["method"] == "structured"
    assert part(x).shape == (len(x), len(classes))
    with pytest.raises(ValueError, match="--heads"):
        prune_part(make_submodel(host, classes), heads=1.0, batches=batches)


def test_hosts_that_cannot_be_split_or_pruned_are_one_line_errors():
    with pytest.raises(ValueError, match=r"not nn\.Linear"):
        make_submodel(_headless(), [0])

    class Plain(nn.Module):  # a linear head but no ViT blocks: structured pruning cannot handle it
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            return self.head(x.flatten(1)[:, :4])

    part = make_submodel(Plain(), [0, 1])
    with pytest.raises(ValueError, match="structured pruning supports"):
        prune_part(part, heads=0.5, batches=[{"image": torch.randn(2, 4), "label": torch.tensor([0, 1])}])
    with pytest.raises(ValueError, match="classes"):
        make_submodel(Plain(), [3, 10])


def _headless() -> nn.Module:
    model = _host(**TINY)
    model.reset_classifier(0)
    return model


def test_saved_split_reloads_with_the_same_outputs(tmp_path):
    host = _host("vit_nano_patch4_28")
    meta = {"model": "vit_nano_patch4_28", "num_classes": 10, "in_chans": 1, "img_size": 28}
    meta |= {"classes": [f"c{i}" for i in range(10)], "mean": [0.5], "std": [0.5]}
    x, y = _data(20)
    split, reports = build_split(host, x, y, 3, heads=0.5, mlp=0.5, distill_epochs=0, fusion_epochs=1)
    placement = greedy_placement([r["bytes"] for r in reports], [4e6, 2e6])
    save_split(split, tmp_path / "split", meta, placement=placement, budgets=[4e6, 2e6])
    loaded, manifest = load_split(tmp_path / "split")
    torch.testing.assert_close(loaded(x), split(x))
    assert [p["classes"] for p in manifest["parts"]] == split.part_classes
    assert [p["device"] for p in manifest["parts"]] == placement
    assert manifest["parts"][1]["class_names"] == [f"c{c}" for c in split.part_classes[1]]
    assert isinstance(loaded, SplitModel)
    assert isinstance(loaded.fusion, FusionHead)
    with pytest.raises(ValueError, match="not a split directory"):
        save_split(split, tmp_path, meta)  # a non-empty directory without a manifest is never overwritten
