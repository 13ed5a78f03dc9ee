"""Training end to end on tiny data: loss falls, resume is exact, NaN stops cleanly, runs are complete."""

import importlib
import json
import types
import warnings
from pathlib import Path

import pytest
import torch

from vitlab.engine import RunConfig, evaluate_run, predict, train
from vitlab.errors import CheckpointError, TrainingDivergedError


def _cfg(tmp_path: Path, name: str, **optim) -> RunConfig:
    cfg = RunConfig(out=str(tmp_path), name=name, log_every=1, device="cpu")
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 192, 64, 32
    cfg.optim.epochs, cfg.optim.warmup_epochs = 2, 0.5
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "lr" in r}


def test_loss_falls_on_fashion_mnist_subset(tmp_path):
    cfg = RunConfig(out=str(tmp_path), name="fm", log_every=1, device="cpu")
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 1000, 500, 50
    cfg.optim.epochs = 2
    run = train(cfg)
    losses = list(_losses(run).values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_top1"] > 30.0  # 10 classes: chance is 10%
    for f in (
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "checkpoints/best.safetensors",
        "checkpoints/last.safetensors",
        "checkpoints/last.state.pt",
        "eval/eval.json",
        "eval/confusion.png",
    ):
        assert (run / f).is_file(), f


def test_resume_continues_exactly(tmp_path):
    # drop path and mixup draw from the global RNGs; mid-epoch stop exercises the data order too
    kw = {"mixup": 0.2}
    full = train(_cfg(tmp_path, "full", **kw))
    cut_cfg = _cfg(tmp_path, "cut", **kw)
    cut_cfg.stop_after_steps = 7  # 6 batches per epoch: stops inside epoch 2
    cut = train(cut_cfg)
    assert not (cut / "summary.json").exists()
    train(resume=cut)
    a, b = _losses(full), _losses(cut)
    assert len(a) == 12
    assert a.keys() == b.keys()
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    train_mod = importlib.import_module("vitlab.engine.objective")  # where the classification loss is

    calls = {"n": 0}
    real_ce = torch.nn.functional.cross_entropy

    def flaky_ce(*args, **kwargs):
        calls["n"] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_mod, "F", types.SimpleNamespace(cross_entropy=flaky_ce))
    cfg = _cfg(tmp_path, "nan")
    cfg.ckpt_every = 2
    with pytest.raises(TrainingDivergedError, match="step 4") as err:
        train(cfg)
    assert "last good checkpoint" in str(err.value)
    from vitlab.engine import read_metadata

    assert read_metadata(tmp_path / "nan" / "checkpoints" / "last.safetensors")["step"] == 4


def test_eval_and_predict_from_run(tmp_path):
    from PIL import Image

    run = train(_cfg(tmp_path, "ev"))
    res = evaluate_run(run, device="cpu")
    assert res.num_images == 64
    assert 0 <= res.top1 <= res.top5 <= 100
    assert sum(map(sum, res.confusion)) == 64
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(img)
    (pred,) = predict([img], run, topk=3)
    assert len(pred.top) == 3
    assert pred.top[0][1] >= pred.top[1][1]
    assert pred.top[0][0].startswith("class")


def test_existing_run_directory_is_not_overwritten(tmp_path):
    train(_cfg(tmp_path, "once", epochs=0.2))
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(_cfg(tmp_path, "once", epochs=0.2))


def test_bad_config_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="--lr"):
        train(_cfg(tmp_path, "bad", lr=-1.0))


def test_a_short_run_says_so_and_steps_set_the_length(tmp_path):
    cfg = _cfg(tmp_path, "short")
    cfg.data.train_subset, cfg.data.test_subset, cfg.model.model = 64, 32, "vit_micro_patch4_28"
    with pytest.warns(UserWarning, match=r"only 4 optimizer steps .* --steps 1000"):
        train(cfg)
    cfg = _cfg(tmp_path, "by_steps", steps=3)  # 3 steps of 2 batches an epoch: ends inside epoch 2
    cfg.data.train_subset, cfg.data.test_subset, cfg.model.model = 64, 32, "vit_micro_patch4_28"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an explicit length is not second-guessed
        run = train(cfg)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
