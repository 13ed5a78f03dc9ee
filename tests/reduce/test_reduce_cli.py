"""The ``reduce`` verb end to end on a tiny model, and the source-map drawing."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.reduce.cli import add_reduce_parser
from vitlab.reduce.visualize import draw_sources


def _run(argv, load_trained=None):
    parser = argparse.ArgumentParser(prog="vitlab")
    add_reduce_parser(parser.add_subparsers(dest="command", required=True), load_trained=load_trained)
    args = parser.parse_args(argv)
    return args.fn(args)


@pytest.mark.parametrize(("method", "flags"), [("tome", ["--r", "4"]), ("ats", ["--keep", "0.5", "--layers", "1,2"])])
def test_reduce_verb_prints_and_draws(method, flags, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "sources.png"
    argv = ["reduce", "vit_nano_patch4_28", "--method", method, *flags, "--batch-size", "2"]
    assert _run([*argv, "--no-speed", "--visualize", str(image), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokens after block" in text
    assert "GFLOPs" in text
    assert Image.open(out).size[0] >= 224


def test_reduce_verb_checkpoint_needs_engine():
    with pytest.raises(ValueError, match="load_trained"):
        _run(["reduce", "--method", "tome", "--checkpoint", "run"])


def test_reduce_verb_uses_given_loader(capsys):
    import vitlab

    model = vitlab.create_model("vit_nano_patch4_28", depth=2, embed_dim=32, num_heads=2)
    assert (
        _run(["reduce", "--method", "mctf", "--r", "2", "--checkpoint", "x", "--no-speed"], lambda p: (model, {}, None))
        == 0
    )
    assert "mctf" in capsys.readouterr().out


def test_draw_sources_marks_groups_and_dropped_patches():
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    source = torch.tensor([1, 1, 2, -1])  # 2 x 2 grid: two patches in token 1, one in token 2, one dropped
    out = draw_sources(image, source, (2, 2))
    assert out.shape == (8, 8, 3)
    assert np.allclose(out[6, 6], 0.125)  # dropped: dimmed grey
    assert np.allclose(out[1, 1], out[1, 6])  # one token, one colour
    assert not np.allclose(out[1, 1], out[6, 1])  # different tokens, different colours
