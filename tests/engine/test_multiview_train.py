"""``vitlab train --task dust3r / vggt / ucpe_nvs --dataset render3d`` (and ``--task multihmr --dataset
stick_humans``): the engine reads the multi-view set through the task's ``TaskSpec.data_adapter`` (engine/setup.py
``TaskBatches``), trains, reloads, evaluates and predicts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from vitlab.engine import RunConfig, load_trained, train
from vitlab.engine.inference import evaluate_run
from vitlab.engine.setup import build_datasets, build_loader
from vitlab.engine.task_inference import predict_dense
from vitlab.tasks import get_task
from vitlab.tasks.driving.letfuser import LeTFuser
from vitlab.tasks.generative.mv_adapter import MVAdapter
from vitlab.tasks.multiview import VGGT, Dust3R, UCPENovelView, frames_from_render3d, pairs_from_render3d
from vitlab.tasks.pose3d import MultiHMR, MvP

TINY_BACKBONE = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'
GRID_5 = (4 * (5 * 17 + 1), 4 * (4 * 17 + 1))  # mv_adapter: reference | 2 generated | 2 true views, 1 px gaps
CASES = {  # task: (task args, model class, primary metric, picture size: 4 scenes of 16 px tiles, enlarged 4x;
    # dust3r / vggt: view 1, depth, confidence, true depth, predicted and true clouds)
    "dust3r": ('{"dec_dim": 32, "dec_depth": 1}', Dust3R, "pointmap_err", (6 * 16 * 4, 4 * 16 * 4)),
    "vggt": ('{"num_frames": 3, "dim": 32, "depth": 1}', VGGT, "pointmap_err", (6 * 16 * 4, 4 * 16 * 4)),
    "ucpe_nvs": ('{"compress": 1}', UCPENovelView, "psnr", (3 * 16 * 4, 4 * 16 * 4)),
    "multihmr": ('{"head_dim": 32, "hph_depth": 1, "hph_heads": 2}', MultiHMR, "mpjpe", (2 * 16 * 4, 4 * 16 * 4)),
    "mv_adapter": ('{"num_views": 2}', MVAdapter, "flow_loss", GRID_5),
    "letfuser": ('{"channels": 16, "hidden": 16, "sdc_grid": 8}', LeTFuser, "ade", None),
    "mvp": ('{"num_views": 2, "dim": 16, "heads": 2, "depth": 1, "ffn": 32, "num_people": 2}', MvP, "mpjpe", None),
}


def _cfg(tmp_path, task: str, dataset: str | None = None) -> RunConfig:
    cfg = RunConfig(out=str(tmp_path / "runs"), name=task, log_every=1, device="cpu")
    cfg.task.task, cfg.task.task_args, cfg.task.backbone_args = task, CASES[task][0], TINY_BACKBONE
    cfg.task.backbone = "vit_micro_patch4_28"  # letfuser defaults to a CvT; the tiny args are a plain ViT's
    cfg.data.dataset, cfg.model.img_size = dataset or get_task(task).dataset, 16
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 16, 8, 8
    cfg.optim.steps = 2
    return cfg


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("task", list(CASES))
def test_train_reload_evaluate_predict(tmp_path, task):
    args, cls, primary, size = CASES[task]
    run = train(_cfg(tmp_path, task))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["primary_metric"] == primary
    assert summary["steps"] == 2
    model, meta, _ = load_trained(run)
    assert isinstance(model, cls)
    assert meta["task_args"] == json.loads(args)
    # the reloaded final checkpoint scores what training reported on the same test scenes
    scores = evaluate_run(run, device="cpu")
    assert scores["num_images"] == 8
    assert scores[primary] == pytest.approx(summary[f"test_{primary}"], rel=1e-5)
    (picture,) = predict_dense([], run)
    assert picture.name == "views.png"
    if size is not None:
        assert Image.open(picture).size == size  # a row per scene


@pytest.mark.parametrize(
    ("task", "convert", "views"), [("dust3r", pairs_from_render3d, 2), ("vggt", frames_from_render3d, 3)]
)
def test_loader_normalises_views_once(tmp_path, task, convert, views):
    cfg = _cfg(tmp_path, task)
    ds = build_datasets(cfg, splits=("test",))["test"]
    assert ds.data.num_views == views  # the set is generated with the views the task takes
    batch = next(build_loader(ds, cfg, train=False, in_chans=3).iter_batches(0))
    raw = ds.data.collate([ds.data[i] for i in range(8)])
    ref = convert(raw, ds.mean, ds.std)  # the converter's own normalisation, for the benchmarks
    assert batch["image"].dtype == torch.float32
    assert batch["image"].shape == (8, views, 3, 16, 16)
    torch.testing.assert_close(batch["image"], ref["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["pointmap"], ref["pointmap"])


def test_flow_dit_trains_on_render3d_views_as_the_mv_adapter_base(tmp_path):
    """``--task flow_dit --dataset render3d`` (the first view of each scene, in [-1, 1]) makes the frozen base that
    ``--task mv_adapter`` then adapts; both loaders scale pixels alike, the reference image as the views."""
    base_cfg = RunConfig(out=str(tmp_path / "runs"), name="base", log_every=1, device="cpu")
    base_cfg.task.task, base_cfg.task.backbone_args = "flow_dit", TINY_BACKBONE
    base_cfg.data.dataset, base_cfg.model.img_size, base_cfg.model.in_chans = "render3d", 16, 3
    base_cfg.data.train_subset, base_cfg.data.test_subset, base_cfg.data.batch_size = 16, 8, 8
    base_cfg.optim.steps = 2
    ds = build_datasets(base_cfg, splits=("test",))["test"]
    batch = next(build_loader(ds, base_cfg, train=False, in_chans=3).iter_batches(0))
    raw = ds.data.collate([ds.data[i] for i in range(8)])
    torch.testing.assert_close(batch["image"], raw["views"][:, 0].float() / 127.5 - 1)
    base_run = train(base_cfg)
    (picture,) = predict_dense([], base_run)
    assert picture.name == "samples.png"  # a grid of samples, not the multi-view tasks' scene rows
    cfg = _cfg(tmp_path, "mv_adapter")
    cfg.task.task_args = json.dumps({"num_views": 2, "base_checkpoint": str(base_run)})
    mv = build_datasets(cfg, splits=("test",))["test"]
    mv_batch = next(build_loader(mv, cfg, train=False, in_chans=3).iter_batches(0))
    torch.testing.assert_close(mv_batch["image"], mv_batch["views"][:, 0])
    model, _, _ = load_trained(train(cfg))
    base, _, _ = load_trained(base_run)
    for (name, a), b in zip(model.base.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_pairings_fail_clearly(tmp_path):
    with pytest.raises(
        ValueError, match=r"--task dust3r trains on calibrated multi-view scenes: use --dataset render3d"
    ):
        train(_cfg(tmp_path, "dust3r", dataset="fashion_mnist"))
    cfg = _cfg(tmp_path, "dust3r")
    cfg.task.task, cfg.task.task_args, cfg.task.backbone_args = "segmentation", "", ""
    with pytest.raises(ValueError, match=r"multi-view scenes train the task models that read them.*dust3r"):
        build_datasets(cfg, splits=("test",))
    run = train(_cfg(tmp_path, "dust3r"))
    with pytest.raises(ValueError, match="not image files"):
        predict_dense(["view.png"], run)
    lone = tmp_path / "lone.safetensors"  # a checkpoint outside its run: no config names the data set
    shutil.copy(run / "checkpoints" / "final.safetensors", lone)
    with pytest.raises(ValueError, match="give the run directory"):
        predict_dense([], lone)


def test_mv_adapter_trains_on_a_base_checkpoint_and_reloads_without_it(tmp_path):
    from vitlab.engine.checkpoint import save_weights
    from vitlab.tasks.generative.flow import FlowDiT

    tiny = json.loads(TINY_BACKBONE)
    base = FlowDiT("vit_micro_patch4_28", num_classes=10, in_chans=3, img_size=16, backbone_kwargs=tiny)
    meta = {"task": "flow_dit", "model": "vit_micro_patch4_28", "backbone_args": tiny, "task_args": {},
            "num_classes": 10, "in_chans": 3, "img_size": 16}  # fmt: skip
    path = save_weights(base, tmp_path / "base.safetensors", meta)
    cfg = _cfg(tmp_path, "mv_adapter")
    cfg.task.task_args = json.dumps({"num_views": 2, "base_checkpoint": str(path)})
    run = train(cfg)  # a 10-class base under the engine's unlabelled scenes (its null class)
    path.unlink()
    model, _, _ = load_trained(run)
    assert model.num_classes == 10
    assert isinstance(model, MVAdapter)
    for (name, a), b in zip(model.base.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the frozen base, restored from the run's own weights
