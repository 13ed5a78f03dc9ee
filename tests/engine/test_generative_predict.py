"""``vitlab train`` then ``vitlab predict --checkpoint RUN`` (no images) for the generators: flow_dit writes its grid
of samples (a row per class); modular_cam a sheet of clips (a row per camera-motion LoRA, frames across)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.engine import RunConfig, train
from vitlab.engine.task_inference import predict_dense

TINY_BACKBONE = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, task: str, dataset: str, args: str, img_size: int = 16):
    cfg = RunConfig(out=str(tmp_path / "runs"), name=task, log_every=1, device="cpu")
    cfg.task.task, cfg.task.task_args, cfg.task.backbone_args = task, args, TINY_BACKBONE
    cfg.data.dataset, cfg.model.img_size = dataset, img_size
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


def test_fourm_fits_its_tokenizers_then_predicts_maps_from_an_image(tmp_path):
    from vitlab.engine import load_trained

    args = ('{"tokenizer_steps": 5, "tokenizer_scenes": 8, "levels": [3, 3], "semseg_levels": [3, 3], '
            '"tokenizer_hidden": 4, "bins": 4, "max_items": 2, "dec_depth": 1, "dec_heads": 2, '
            '"input_budget": 8, "target_budget": 8}')  # fmt: skip
    run = _run(tmp_path, "fourm", "fmnist_scenes_3d", args, img_size=32)  # the scenes' smallest canvas
    model, _, _ = load_trained(run)
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    untrained = type(model)("vit_micro_patch4_28", img_size=32, backbone_kwargs=tiny, **json.loads(args))
    # prepare_data trained the tokenizers before the model, and the run saved them
    fitted, fresh = model.tokenizers["rgb"].state_dict(), untrained.tokenizers["rgb"].state_dict()
    assert any(not torch.equal(fitted[k], fresh[k]) for k in fitted)
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(image)
    (picture,) = predict_dense([image], run)
    # image | semantic overlay (the overlay draws image and blend) | depth, 32 px each
    assert Image.open(picture).size == (3 * 32, 32)


def test_fourm_resume_restores_its_tokenizers_instead_of_refitting_them(tmp_path, monkeypatch):
    from vitlab.tasks.generative.fourm import FourM

    cfg = RunConfig(out=str(tmp_path / "runs"), name="cut", log_every=1, device="cpu", stop_after_steps=1)
    cfg.task.task, cfg.task.backbone_args = "fourm", TINY_BACKBONE
    cfg.task.task_args = '{"tokenizer_steps": 2, "tokenizer_scenes": 4, "levels": [3, 3], "semseg_levels": [3, 3]}'
    cfg.data.dataset, cfg.model.img_size = "fmnist_scenes_3d", 32
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 8, 4, 4
    cfg.optim.steps = 2
    cut = train(cfg)
    assert not (cut / "summary.json").exists()

    def refit(self, dataset):
        raise AssertionError("a resumed run refitted its tokenizers")

    monkeypatch.setattr(FourM, "prepare_data", refit)
    train(resume=cut)
    assert json.loads((cut / "summary.json").read_text())["steps"] == 2
