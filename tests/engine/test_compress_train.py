"""Training with compression applied (``--compress``): aux-loss terms reach the loss, after-step hooks run,
checkpoints rebuild the compressed model, and ``--init-from`` carries the compression into a fine-tune."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from vitlab import compress
from vitlab.compress import Method
from vitlab.engine import RunConfig, train
from vitlab.engine.inference import load_trained

CALLS: list[int] = []


def _add_gain(model: nn.Module, weight: float = 1.0, size: int = 3) -> dict:
    # a new parameter (new state-dict key, so replay must happen before loading) that the loss pulls to 2
    model.toy_gain = nn.Parameter(torch.ones(size))
    return {"size": size}


def _rebuild(model: nn.Module, kwargs: dict, report: dict) -> None:
    model.toy_gain = nn.Parameter(torch.zeros(report["size"]))


def _aux(model: nn.Module) -> dict[str, torch.Tensor]:
    w = compress.surgery_of(model)[-1]["kwargs"]["weight"]
    return {"toy_pull": w * (model.toy_gain - 2).pow(2).sum()}


TOY = Method(
    name="toy",
    fn=_add_gain,
    replay="build",
    summary="test method",
    aux_loss=_aux,
    after_step=lambda m: CALLS.append(1),
    rebuild=_rebuild,
)


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(compress.METHODS, "toy", TOY)
    CALLS.clear()


def _cfg(tmp_path: Path, name: str, steps: int = 4, **compression) -> RunConfig:
    cfg = RunConfig(out=str(tmp_path), name=name, log_every=1, device="cpu")
    cfg.model.model = "vit_nano_patch4_28"
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 64, 32, 16
    cfg.optim.steps, cfg.optim.warmup_epochs, cfg.optim.lr = steps, 0.0, 0.05
    for k, v in compression.items():
        setattr(cfg.compression, k, v)
    return cfg


def test_aux_terms_train_log_and_the_run_reloads_compressed(tmp_path, toy_method):
    run = train(_cfg(tmp_path, "toy", compress="toy", compress_args='{"weight": 5.0, "size": 2}'))
    assert len(CALLS) == 4  # after every optimizer step
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pulls = [r["toy_pull"] for r in logged if "toy_pull" in r]
    assert len(pulls) == 4
    assert pulls[-1] < pulls[0]
    model, meta, _ = load_trained(run)
    assert meta["surgery"][-1]["method"] == "toy"
    assert meta["surgery"][-1]["report"] == {"size": 2}
    # rebuilt from the report (zeros), then the trained values loaded over it: moved from 1 towards 2
    assert model.toy_gain.shape == (2,)
    assert bool((model.toy_gain > 1).all())


def test_init_from_a_compressed_run_carries_its_compression(tmp_path, toy_method):
    first = train(_cfg(tmp_path, "a", steps=2, compress="toy", compress_args='{"weight": 5.0}'))
    trained = load_trained(first)[0].toy_gain.detach().clone()
    cfg = _cfg(tmp_path, "b", steps=2)
    cfg.model.init_from = str(first)
    CALLS.clear()
    second = train(cfg)
    assert len(CALLS) == 2  # the carried record still trains as the method says
    model, meta, _ = load_trained(second)
    assert [r["method"] for r in meta["surgery"]] == ["toy"]
    assert not torch.equal(model.toy_gain, trained)  # fine-tuned further, not reset


def test_compress_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--compress-args needs --compress"):
        train(_cfg(tmp_path, "x", compress_args='{"amount": 0.5}'))
    with pytest.raises(ValueError, match="magnitude"):
        train(_cfg(tmp_path, "y", compress="magnitud"))
    with pytest.raises(ValueError, match="--compress-args must be a JSON object"):
        train(_cfg(tmp_path, "z", compress="magnitude", compress_args="amount=0.5"))
    with pytest.raises(TypeError, match="magnitude takes"):
        train(_cfg(tmp_path, "w", compress="magnitude", compress_args='{"amont": 0.5}'))


def test_magnitude_fine_tune_through_train(tmp_path):
    run = train(_cfg(tmp_path, "m", steps=1, compress="magnitude", compress_args='{"amount": 0.4}'))
    model, meta, _ = load_trained(run)
    assert meta["surgery"][-1]["report"]["sparsity"] == pytest.approx(0.4, abs=0.01)
    assert compress.sparsity(model) < 0.4  # without a kept mask one optimizer step regrows the zeros


def test_model_args_build_the_classifier_and_reload_with_it(tmp_path):
    cfg = _cfg(tmp_path, "deep", steps=1)
    cfg.model.model_args = '{"depth": 2, "embed_dim": 32, "num_heads": 2}'
    run = train(cfg)
    model, meta, _ = load_trained(run)
    assert meta["model_args"] == {"depth": 2, "embed_dim": 32, "num_heads": 2}
    assert len(model.blocks) == 2
    assert model.embed_dim == 32
    cfg = _cfg(tmp_path, "bad", steps=1)
    cfg.model.model_args = "depth=2"
    with pytest.raises(ValueError, match="--model-args must be a JSON object"):
        train(cfg)
