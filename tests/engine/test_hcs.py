"""Hierarchical Channel Sampling: the two-step distribution, how subsets reach models, and the CLI hooks."""

import importlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import vitlab
from vitlab.cli import run as cli_run
from vitlab.engine import RunConfig, train
from vitlab.engine.hcs import (
    ChannelSubset,
    apply_hcs,
    hcs_generator,
    parse_channels,
    sample_channels,
    select_channels,
    supports_channel_subsets,
)

train_module = importlib.import_module("vitlab.engine.hcs")  # where the channel-sampling callback draws
TINY = {"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 16, "patch_size": 8, "in_chans": 4, "num_classes": 3}


def test_subset_size_is_uniform_then_channels_uniform():
    g = torch.Generator().manual_seed(0)
    draws = [sample_channels(4, g) for _ in range(4000)]
    sizes = Counter(len(d) for d in draws)
    # two-step draw: each size 1..4 has probability 1/4 (independent per-channel dropout would not give this)
    assert set(sizes) == {1, 2, 3, 4}
    assert all(abs(n - 1000) < 130 for n in sizes.values()), sizes
    singles = Counter(int(d[0]) for d in draws if len(d) == 1)
    assert all(abs(n - sizes[1] / 4) < 80 for n in singles.values()), singles
    for d in draws[:200]:
        assert d.tolist() == sorted(set(d.tolist()))
        assert int(d.min()) >= 0
        assert int(d.max()) < 4


def test_draws_depend_only_on_seed_and_step():
    a = [sample_channels(6, hcs_generator(3, step)).tolist() for step in range(20)]
    b = [sample_channels(6, hcs_generator(3, step)).tolist() for step in range(20)]
    assert a == b
    assert len({tuple(s) for s in a}) > 5


def test_channelvit_gets_the_subset_and_a_plain_model_gets_zeros():
    cvit = vitlab.create_model("channelvit_nano_patch4_28", **TINY).eval()
    vit = vitlab.create_model("vit_nano_patch4_28", **TINY).eval()
    x = torch.randn(2, 4, 16, 16)
    sub, kw = select_channels(x, cvit, [0, 2])
    torch.testing.assert_close(sub, x[:, [0, 2]])
    assert kw["channels"].tolist() == [0, 2]
    zeroed, kw = select_channels(x, vit, [0, 2])
    assert kw == {}
    torch.testing.assert_close(zeroed[:, [0, 2]], x[:, [0, 2]])
    assert (zeroed[:, [1, 3]] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(ChannelSubset(cvit, "2,0", 4)(x), cvit(x[:, [0, 2]], channels=[0, 2]))
        torch.testing.assert_close(ChannelSubset(vit, [0, 2], 4)(x), vit(zeroed))


def test_apply_hcs_feeds_the_model_a_consistent_subset():
    cvit = vitlab.create_model("channelvit_nano_patch4_28", **TINY).eval()
    x = torch.randn(2, 4, 16, 16)
    for step in range(8):
        sub, kw = apply_hcs(x, cvit, seed=0, step=step)
        assert sub.shape[1] == len(kw["channels"]) >= 1
        torch.testing.assert_close(sub, x[:, kw["channels"]])
        assert cvit(sub, **kw).shape == (2, 3)


def test_wrapped_models_are_recognised():
    cvit = vitlab.create_model("channelvit_nano_patch4_28", **TINY)
    wrapper = nn.Module()
    wrapper.module = cvit  # what DDP looks like from outside
    assert supports_channel_subsets(wrapper)
    assert not supports_channel_subsets(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("text", "match"), [("0,4", r"0\.\.3"), ("1,1", "distinct"), ("", "--channels"), ("a,b", "comma-separated")]
)
def test_bad_channel_lists_name_the_flag_and_range(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_channels(text, 4)
    assert "--channels" in str(err.value)


def test_parse_channels_accepts_lists_and_spaces():
    assert parse_channels(" 2, 0", 3) == [0, 2]
    assert parse_channels([1], 3) == [1]


@pytest.fixture(scope="module")
def hcs_run(tmp_path_factory, fmnist_dir_or_skip) -> tuple[Path, list[int]]:
    """Two --hcs steps of the nano ChannelViT on the 4-channel set, recording the channel counts it trained on."""
    seen: list[int] = []
    original = train_module.apply_hcs

    def spy(x, model, seed, step):
        x, kw = original(x, model, seed, step)
        seen.append(len(kw["channels"]))
        return x, kw

    cfg = RunConfig(out=str(tmp_path_factory.mktemp("hcs")), name="cv", device="cpu", log_every=1)
    cfg.model.model = "channelvit_nano_patch4_28"
    cfg.data.dataset, cfg.data.data_dir = "fashion_mnist_multichannel", str(fmnist_dir_or_skip)
    cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = 32, 16, 8
    cfg.optim.epochs, cfg.hcs.hcs, cfg.stop_after_steps = 1, True, 2  # stop before the epoch-end evaluation
    train_module.apply_hcs = spy
    try:
        run = train(cfg)
    finally:
        train_module.apply_hcs = original
    return run, seen


@pytest.fixture(scope="module")
def fmnist_dir_or_skip() -> Path:
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    return folder


def test_train_with_hcs_uses_channel_subsets(hcs_run):
    run, seen = hcs_run
    assert len(seen) == 2
    assert all(1 <= n <= 4 for n in seen)
    assert json.loads((run / "config.json").read_text())["hcs"]["hcs"] is True  # its own config group
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_eval_channels_flag(hcs_run, capsys):
    run, _ = hcs_run
    assert cli_run(["eval", str(run), "--channels", "0,2", "--device", "cpu", "--out", str(run / "sub")]) == 0
    assert json.loads((run / "sub" / "eval.json").read_text())["num_images"] == 16
    assert cli_run(["eval", str(run), "--channels", "0,7", "--device", "cpu"]) == 2
    assert "--channels" in capsys.readouterr().err


def test_hcs_refuses_a_teacher():
    cfg = RunConfig()
    cfg.hcs.hcs, cfg.distillation.teacher = True, "vit_nano_patch4_28"
    with pytest.raises(ValueError, match="--hcs"):
        cfg.validate()
