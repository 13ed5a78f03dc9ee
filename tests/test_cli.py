"""Each verb end to end on tiny data through ``vitlab.cli.run`` (the console script minus the re-exec)."""

import json

import pytest
import torch
from PIL import Image

from vitlab.cli import run

TINY_TRAIN = [
    "train",
    "--dataset",
    "synthetic",
    "--train-subset",
    "96",
    "--test-subset",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--name",
    "r",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert run([*TINY_TRAIN, "--out", str(out)]) == 0
    return out / "r"


def test_list_and_info(capsys):
    assert run(["list", "deit_tiny*"]) == 0
    listed = capsys.readouterr().out
    assert "deit_tiny_distilled_patch16_224" in listed
    assert "vit_base_patch16_224" not in listed
    assert run(["info", "vit_nano_patch4_28", "--img-size", "32"]) == 0
    info = capsys.readouterr().out
    assert "GFLOPs" in info
    assert "1x32x32" in info


def test_unknown_model_is_one_line_with_suggestions(capsys):
    assert run(["info", "vit_nano_patch4"]) == 2
    err = capsys.readouterr().err
    assert "vit_nano_patch4_28" in err
    assert "Traceback" not in err


def test_train_writes_a_complete_run(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (run_dir / "curves.png").stat().st_size > 0
    assert (run_dir / "eval" / "confusion.png").stat().st_size > 0


def test_eval_and_predict(run_dir, tmp_path, capsys):
    assert run(["eval", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    assert "top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_images"] == 32
    img = tmp_path / "a.png"
    Image.fromarray((torch.rand(28, 28, 3) * 255).byte().numpy()).save(img)  # RGB into a 1-channel model
    assert run(["predict", str(img), "--checkpoint", str(run_dir), "--topk", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(img))
    assert line.count("class") == 2


def test_predict_unreadable_image_names_it(run_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    assert run(["predict", str(bad), "--checkpoint", str(run_dir)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_eval_of_foreign_checkpoint_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    assert run(["eval", str(tmp_path / "x.safetensors"), "--device", "cpu"]) == 2
    assert "not a vitlab checkpoint" in capsys.readouterr().err


def test_missing_data_dir_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run(["train", "--data-dir", str(missing), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_wrong_channel_count_is_refused(tmp_path, capsys):
    assert run([*TINY_TRAIN, "--in-chans", "2", "--out", str(tmp_path)]) == 2
    assert "in-chans" in capsys.readouterr().err


def test_config_file_and_resume(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        "data:\n  dataset: synthetic\n  train_subset: 64\n  test_subset: 32\n  batch_size: 32\n"
        "optim:\n  epochs: 2\ndevice: cpu\n"
    )
    assert run(["train", "--config", str(cfg), "--out", str(tmp_path), "--name", "c", "--stop-after-steps", "1"]) == 0
    assert not (tmp_path / "c" / "summary.json").exists()
    assert run(["train", "--resume", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["steps"] == 4


def test_bench_writes_tables(tmp_path, capsys):
    prefix = tmp_path / "b"
    args = ["bench", "vit_nano_patch4_28", "--batch-size", "4", "--baseline", "timm", "--out", str(prefix)]
    assert run(args) == 0
    assert "vit_nano_patch4_28" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.csv").read_text().count("\n") >= 2


def test_unknown_teacher_is_named_before_a_run_starts(tmp_path, capsys):
    args = [*TINY_TRAIN, "--out", str(tmp_path), "--teacher", "no_such_teacher", "--distill", "soft"]
    assert run([*args, "--distill-alpha", "0.3", "--distill-tau", "2"]) == 2
    assert "--teacher 'no_such_teacher'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_reduce_reports_tokens_and_flops(run_dir, capsys):
    assert run(["reduce", "vit_nano_patch4_28", "--method", "tome", "--r", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "tokens after block" in out
    assert "GFLOPs" in out
    assert run(["reduce", "tiny_vit_1m_28", "--method", "tome", "--r", "4"]) == 2  # not an isotropic ViT
