"""Task models through the training engine on tiny generated scenes: a run is complete, resume is exact, the run
reloads as trained; ``--val-fraction`` chooses the best checkpoint on held-out images; bad combinations are refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitlab.engine import RunConfig, evaluate_run, load_trained, read_metadata, train
from vitlab.tasks import TaskModel, UnknownTaskError, create_task_model

BACKBONE = "vit_micro_patch4_28"


@pytest.fixture(scope="module", autouse=True)
def _scene_cache(tmp_path_factory):
    # generated scenes go to a temporary cache, never ~/.cache (the module's runs share it)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _seg_cfg(out: Path, name: str) -> RunConfig:
    cfg = RunConfig(out=str(out), name=name, log_every=1, device="cpu")
    cfg.task.task, cfg.task.backbone = "segmentation", BACKBONE
    cfg.data.dataset, cfg.model.img_size = "fmnist_scenes", 32
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 64, 32, 16  # 4 steps per epoch
    cfg.optim.epochs, cfg.optim.warmup_epochs = 2, 0.5
    return cfg


def _cls_cfg(out: Path, name: str) -> RunConfig:
    cfg = RunConfig(out=str(out), name=name, log_every=1, device="cpu")
    cfg.model.model = BACKBONE
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 64, 32, 16
    cfg.optim.epochs, cfg.optim.warmup_epochs = 2, 0.5
    return cfg


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r and "lr" in r}


def _evals(run: Path) -> list[dict]:
    return [r for r in _records(run) if "lr" not in r and "event" not in r]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    return train(_seg_cfg(tmp_path_factory.mktemp("runs"), "seg"))


def test_segmentation_run_is_complete(seg_run):
    summary = json.loads((seg_run / "summary.json").read_text())
    assert summary["task"] == "segmentation"
    assert summary["primary_metric"] == "miou"
    assert summary["best_selected_on"] == "test"
    assert summary["steps"] == 8
    assert 0 <= summary["test_miou"] <= 100
    for stem in ("final", "best", "last"):
        assert (seg_run / "checkpoints" / f"{stem}.safetensors").is_file(), stem
    evals = _evals(seg_run)
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0 <= r["test_miou"] <= 100 for r in evals)
    assert summary["best_miou"] == max(r["test_miou"] for r in evals)
    assert read_metadata(seg_run / "checkpoints" / "final.safetensors")["task"] == "segmentation"


def test_segmentation_resume_is_exact(seg_run, tmp_path):
    cut_cfg = _seg_cfg(tmp_path, "cut")
    cut_cfg.stop_after_steps = 5  # 4 batches per epoch: stops inside epoch 2
    cut = train(cut_cfg)
    assert not (cut / "summary.json").exists()
    train(resume=cut)
    a, b = _losses(seg_run), _losses(cut)
    assert len(a) == 8
    assert a.keys() == b.keys()
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert [r["test_miou"] for r in _evals(cut)] == [r["test_miou"] for r in _evals(seg_run)]


@torch.no_grad()
def test_load_trained_rebuilds_the_task_model(seg_run):
    model, meta, run = load_trained(seg_run)
    assert run == seg_run
    assert isinstance(model, TaskModel)
    assert not model.training
    assert (meta["task"], meta["model"], meta["img_size"], meta["in_chans"]) == ("segmentation", BACKBONE, 32, 1)
    # the same architecture built by hand takes the saved weights strictly and computes the same
    fresh = create_task_model(
        "segmentation", backbone=BACKBONE, num_classes=meta["num_classes"], in_chans=1, img_size=32
    )
    untrained = fresh.eval()(x := torch.randn(2, 1, 32, 32))
    fresh.load_state_dict(load_file(seg_run / "checkpoints" / "final.safetensors"), strict=True)
    out = model(x)
    torch.testing.assert_close(out, fresh(x), rtol=0, atol=0)
    assert (out - untrained).abs().max() > 1e-3  # the trained weights, not an initialisation


def test_evaluate_run_scores_the_best_checkpoint_as_training_did(seg_run):
    res = evaluate_run(seg_run, device="cpu", batch_size=16)
    assert isinstance(res, dict)
    assert 0 <= res["miou"] <= 100
    assert res["num_images"] == 32
    assert json.loads((seg_run / "eval" / "eval.json").read_text())["miou"] == pytest.approx(res["miou"])
    # the reloaded best checkpoint scores what the in-memory model scored at that epoch
    best = seg_run / "checkpoints" / "best.safetensors"
    logged = {r["step"]: r["test_miou"] for r in _evals(seg_run)}[read_metadata(best)["step"]]
    again = evaluate_run(best, device="cpu", batch_size=16, out=seg_run / "eval_best")
    assert again["miou"] == pytest.approx(logged, abs=1e-4)


def test_val_fraction_selects_on_held_out_images(tmp_path):
    cfg = _cls_cfg(tmp_path, "val")
    cfg.data.val_fraction = 0.25  # 48 train (3 steps per epoch), 16 held out
    run = train(cfg)
    evals = _evals(run)
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all("val_top1" in r and "test_top1" not in r for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["best_selected_on"] == "val"
    assert summary["best_top1"] == max(r["val_top1"] for r in evals)
    # the headline is the final model on the test split
    final = json.loads((run / "eval" / "eval.json").read_text())
    assert final["num_images"] == 32
    assert summary["test_top1"] == pytest.approx(final["top1"])


def test_without_val_fraction_selection_is_on_test(tmp_path):
    cfg = _cls_cfg(tmp_path, "noval")
    cfg.optim.epochs = 1
    run = train(cfg)
    assert all("test_top1" in r and "val_top1" not in r for r in _evals(run))
    assert json.loads((run / "summary.json").read_text())["best_selected_on"] == "test"


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_val_fraction_out_of_range_is_named(fraction):
    cfg = RunConfig()
    cfg.data.val_fraction = fraction
    with pytest.raises(ValueError, match="--val-fraction"):
        cfg.validate()


def test_task_with_a_classification_technique_is_refused():
    cfg = RunConfig()
    cfg.task.task = "segmentation"
    cfg.hcs.hcs = True
    with pytest.raises(ValueError, match="--task") as err:
        cfg.validate()
    assert "--hcs" in str(err.value)


def test_task_with_mixup_is_refused():
    cfg = RunConfig()
    cfg.task.task = "segmentation"
    cfg.optim.mixup = 0.2
    with pytest.raises(ValueError, match="--mixup"):
        cfg.validate()


def test_unknown_task_suggests_close_names(tmp_path):
    cfg = _seg_cfg(tmp_path, "typo")
    cfg.task.task = "segmentaton"
    with pytest.raises(UnknownTaskError, match="segmentaton") as err:
        train(cfg)
    assert "Did you mean: segmentation" in str(err.value)
    assert not (tmp_path / "typo").exists()  # refused before a run directory is made


def test_task_and_backbone_keywords_are_stored_and_reloaded(tmp_path):
    # --task-args / --backbone-args change the architecture: the run must reload with them
    cfg = _seg_cfg(tmp_path, "kw")
    cfg.data.train_subset, cfg.optim.epochs = 16, 1
    cfg.task.task_args = json.dumps({"width": 24})
    cfg.task.backbone_args = json.dumps({"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8})
    run = train(cfg)
    meta = read_metadata(run / "checkpoints" / "final.safetensors")
    assert meta["task_args"] == {"width": 24}
    assert meta["backbone_args"]["patch_size"] == 8
    model, _, _ = load_trained(run)
    assert model.pyramid.out_channels == 24
    assert model.pyramid.backbone.patch_embed.patch_size == (8, 8)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("task_args", "{width: 24}", "--task-args must be a JSON object"), ("backbone_args", "[8]", "--backbone-args")],
)
def test_bad_task_keywords_are_named(tmp_path, field, value, match):
    cfg = _seg_cfg(tmp_path, "bad")
    setattr(cfg.task, field, value)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    cfg = _cls_cfg(tmp_path, "cls")
    cfg.task.task_args = '{"width": 24}'
    with pytest.raises(ValueError, match="go with --task"):
        train(cfg)
