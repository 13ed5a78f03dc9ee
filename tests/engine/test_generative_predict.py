"""``vitlab train`` then ``vitlab predict --checkpoint RUN`` (no images) for the generators: flow_dit writes its grid
of samples (a row per class); modular_cam a sheet of clips (a row per camera-motion LoRA, frames across)."""

from __future__ import annotations

import pytest
from PIL import Image

from vitlab.engine import RunConfig, train
from vitlab.engine.task_inference import predict_dense

TINY_BACKBONE = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, task: str, dataset: str, args: str):
    cfg = RunConfig(out=str(tmp_path / "runs"), name=task, log_every=1, device="cpu")
    cfg.task.task, cfg.task.task_args, cfg.task.backbone_args = task, args, TINY_BACKBONE
    cfg.data.dataset, cfg.model.img_size = dataset, 16
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 8, 4, 4
    cfg.optim.steps = 1
    return train(cfg)


def test_modular_cam_predict_draws_a_row_per_motion(tmp_path):
    args = '{"num_frames": 8, "motions": ["pan_left", "zoom_in"], "motion_layers": 1, "motion_heads": 2}'
    run = _run(tmp_path, "modular_cam", "camera_motion_videos", args)
    (picture,) = predict_dense([], run)
    assert picture.name == "samples.png"
    # 3 rows (no LoRA, pan_left, zoom_in) x 2 clips; 8 frames of 16 px with 1 px gaps, enlarged 4 times
    assert Image.open(picture).size == (4 * (8 * 17 + 1), 4 * (6 * 17 + 1))


def test_flow_dit_predict_draws_a_row_per_class(tmp_path):
    run = _run(tmp_path, "flow_dit", "fashion_mnist", "")
    (picture,) = predict_dense([], run)
    assert picture.name == "samples.png"
    width, height = Image.open(picture).size
    assert (width, height) == (8 * 17 + 1, 10 * 17 + 1)  # 8 samples per class, 10 classes, 16 px with 1 px gaps
