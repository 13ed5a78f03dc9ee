"""The modular multi-task MoE ViT: the surgery, per-task forward and loss, extraction that keeps a task's outputs,
adaptation that trains only what it says, the heterogeneous data set's one-task batches, and a run through
``vitlab train``."""

import pytest
import torch

from vitlab.data.loader import BatchLoader
from vitlab.data.multitask import MultiTaskDataset, TaskPart, make_fmnist_multitask
from vitlab.layers.task_moe import MoEAttention, TaskMoEMlp, task_routed_modules
from vitlab.tasks import create_task_model

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TASKS = ["a:classify:3", "b:segment:4"]


def _model(**kw):
    kw = {"img_size": 16, "tasks": TASKS, "mlp_experts": 4, "mlp_k": 2, "attn_experts": 3, "attn_k": 2} | kw
    return create_task_model("modular_moe", "vit_micro_patch4_28", backbone_kwargs=TINY, **kw)


def _batch(task: str, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (n,), generator=g) if task == "a" else torch.randint(0, 4, (n, 16, 16), generator=g)
    return {"image": torch.randn(n, 1, 16, 16, generator=g), task: target}


def test_surgery_replaces_every_block_and_dense_keeps_them():
    moe, dense = _model(), _model(moe=False)
    blocks = moe.backbone.blocks
    assert all(isinstance(b.attn, MoEAttention) and isinstance(b.mlp, TaskMoEMlp) for b in blocks)
    assert [m.router.num_tasks for m in task_routed_modules(moe)] == [2] * 4
    assert not task_routed_modules(dense)
    # experts are hidden / k wide, so k active experts cost one dense MLP
    assert blocks[0].mlp.moe.experts[0].fc1.out_features * 2 == dense.backbone.blocks[0].mlp.fc1.out_features


def test_forward_runs_the_batch_tasks_and_loss_adds_routing_terms():
    model = _model(mi_weight=0.5).train()
    batch = _batch("b")
    out = model(batch)  # a batch dict: only its tasks run
    assert list(out) == ["b"]
    assert out["b"].shape == (4, 4, 16, 16)
    losses = model.loss(out, batch)
    assert set(losses) == {"loss", "loss_b", "balance", "mutual_info"}
    losses["loss"].backward()
    assert model.backbone.blocks[0].mlp.router.gates[1].weight.grad.abs().sum() > 0
    assert set(model(batch["image"])) == {"a", "b"}  # no task given: every head
    with pytest.raises(ValueError, match="no target of this model's tasks"):
        model.forward_kwargs({"image": batch["image"], "c": batch["b"]})
    with pytest.raises(ValueError, match=r"batch\['a'\] must be int64"):
        model.loss(model(batch["image"]), {"image": batch["image"], "a": torch.zeros(4)})


def test_tasks_are_validated():
    with pytest.raises(ValueError, match="name:kind:classes"):
        _model(tasks=["a:detect:3"])
    with pytest.raises(ValueError, match="unique"):
        _model(tasks=["a:classify:3", "a:segment:4"])
    with pytest.raises(ValueError, match="mlp_k 3 must divide"):
        _model(mlp_k=3)


def test_task_routing_differs_per_task():
    model = _model().eval()
    image = torch.randn(2, 1, 16, 16)
    out = model(image)
    with torch.no_grad():  # give task b's gates other weights: only task b's routing (and output) changes
        for m in task_routed_modules(model):
            m.router.gates[1].weight.mul_(-3.0)
    again = model(image)
    assert torch.allclose(out["a"], again["a"])
    assert not torch.allclose(model.heads["b"](torch.zeros(2, 32, 4, 4), (16, 16)), again["b"])


def test_extract_with_every_expert_keeps_the_tasks_output():
    model = _model().eval()
    batch = _batch("b")
    model.reset_routing_counts()
    with torch.no_grad():
        full = model(batch)["b"]
        sub = model.extract("b", threshold=0.0)
        assert sub.target_keys == ("b",)
        assert set(sub.heads) == {"b"}
        assert torch.allclose(sub(batch)["b"], full, atol=1e-5)
        smaller = model.extract("b", threshold=0.6)  # keeps only the k most used experts per layer
    assert all(m.router.num_experts == m.router.k for m in task_routed_modules(smaller))
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())
    model.reset_routing_counts()
    with pytest.raises(ValueError, match="needs routing counts"):
        model.extract("a")


def test_add_task_trains_only_the_new_gates_head_and_chosen_experts():
    model = _model()
    model.add_task("c:classify:5")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".gates.2." in n or ".noises.2." in n or n.startswith("heads.c.") for n in trainable)
    with torch.no_grad():
        model.reset_routing_counts()
        model(torch.randn(2, 1, 16, 16), tasks=("c",))
    chosen = model.unfreeze_top_experts("c", 1)
    assert [len(c) for c in chosen] == [1] * 4
    e = chosen[1][0]  # block 0's MLP
    assert all(p.requires_grad for p in model.backbone.blocks[0].mlp.moe.experts[e].parameters())
    others = [x for i, x in enumerate(model.backbone.blocks[0].mlp.moe.experts) if i != e]
    assert not any(p.requires_grad for x in others for p in x.parameters())
    with pytest.raises(ValueError, match="exists already"):
        model.add_task("a:classify:3")


def _parts() -> MultiTaskDataset:
    parts = [
        TaskPart("a", "a:classify:3", torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.long)),
        TaskPart("b", "b:segment:4", torch.ones(7, 1, 8, 8, dtype=torch.uint8), torch.zeros(7, 8, 8, dtype=torch.long)),
    ]
    return MultiTaskDataset(parts, [0.5], [0.25])


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_hold_one_task_and_cover_the_epoch(drop_last):
    data = _parts()
    loader = BatchLoader(data, 4, shuffle=True, seed=3, drop_last=drop_last)
    batches = list(loader.iter_batches(0))
    assert len(batches) == len(loader) == (2 + 1 if drop_last else 3 + 2)
    assert all(len(set(b) - {"image"}) == 1 for b in batches)
    seen = sum(len(b["image"]) for b in batches)
    assert seen == (8 + 4 if drop_last else 17)
    assert {next(k for k in b if k != "image") for b in batches} == {"a", "b"}
    with pytest.raises(ValueError, match="one task"):
        data.collate([data[0], data[12]])


def test_bad_parts_are_named():
    image = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(Exception, match="share one image shape"):
        MultiTaskDataset([TaskPart("a", "a:classify:2", image, torch.zeros(2, dtype=torch.long)),
                          TaskPart("b", "b:classify:2", torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
                                   torch.zeros(2, dtype=torch.long))], [0.5], [0.2])  # fmt: skip
    with pytest.raises(Exception, match="one per image"):
        TaskPart("a", "a:classify:2", image, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tasks must name"):
        make_fmnist_multitask(tasks=("digits",))


def test_vitlab_train_runs_the_multitask_model(tmp_path, monkeypatch):
    from vitlab.engine import RunConfig, load_trained, train

    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(out=str(tmp_path), name="mm", log_every=1, device="cpu")
    cfg.task.task, cfg.task.backbone_args = "modular_moe", '{"embed_dim": 32, "depth": 2, "num_heads": 2}'
    cfg.task.task_args = '{"mlp_experts": 4, "attn_experts": 3, "attn_k": 2, "mi_weight": 0.1}'
    cfg.data.dataset, cfg.model.img_size = "fmnist_multitask", 32
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 16, 8, 8
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1, 0.5
    run = train(cfg)
    summary = (run / "summary.json").read_text()
    for key in ("fashion", "scenes", "count", "mean_score"):
        assert f'"{key}"' in summary or f'"test_{key}"' in summary
    model = load_trained(run)[0]
    assert isinstance(model.backbone.blocks[1].mlp, TaskMoEMlp)
    from PIL import Image

    from vitlab.engine.task_inference import predict_dense

    Image.fromarray(torch.randint(0, 255, (32, 32), dtype=torch.uint8).numpy()).save(tmp_path / "x.png")
    (drawn,) = predict_dense([tmp_path / "x.png"], run, out=tmp_path / "pred")
    assert Image.open(drawn).size[1] == 32 + 12  # the scenes overlay, the class answers below
