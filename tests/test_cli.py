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


def test_list_kind_h_shows_task_models(capsys):
    assert run(["list", "--kind", "H"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[0] == "segmentation" for line in lines)


def test_data_make_writes_scenes_preview_and_info(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "scenes"
    assert run(["data", "make", "fmnist_scenes", "--out", str(out), "--n", "8", "--canvas", "32"]) == 0
    assert str(out) in capsys.readouterr().out
    for name in ("preview.png", "info.json", "scenes.npz"):
        assert (out / name).stat().st_size > 0, name
    info = json.loads((out / "info.json").read_text())
    assert info["num_scenes"] == 8
    assert info["img_size"] == [32, 32]


def test_data_make_unknown_generator_is_one_line(tmp_path, capsys):
    assert run(["data", "make", "no_such_set", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "fmnist_scenes" in err
    assert err.strip().count("\n") == 0


@pytest.mark.export
def test_export_model_name_to_torch_export(tmp_path, capsys):
    assert run(["export", "vit_micro_patch4_28", "--format", "torch.export", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    assert (tmp_path / "vit_micro_patch4_28.pt2").stat().st_size > 0


@pytest.mark.export
def test_export_into_a_folder_that_does_not_exist_yet(tmp_path, capsys):
    out = tmp_path / "exports"  # no suffix: a folder, made on the way
    assert run(["export", "vit_micro_patch4_28", "--format", "torch.export", "--out", str(out)]) == 0
    assert (out / "vit_micro_patch4_28.pt2").is_file()


def test_export_unknown_target_is_one_line(tmp_path, capsys):
    assert run(["export", "no_such_model", "--format", "torch.export", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0


def _options(path: tuple[str, ...]) -> list:
    import argparse

    from vitlab.cli import build_parser

    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return [a for a in parser._actions if any(o.startswith("--") for o in a.option_strings)]


VERBS = [("list",), ("info",), ("train",), ("eval",), ("predict",), ("bench",), ("reduce",), ("export",), ("compress",)]


@pytest.mark.parametrize("path", [*VERBS, ("distill", "save-logits"), ("data", "make")])
def test_every_flag_has_a_help_line(path):
    actions = _options(path)
    assert len(actions) >= 2  # --help and at least one of the verb's own
    bare = [a.option_strings[-1] for a in actions if not a.help or a.help.startswith("(default")]
    assert not bare, f"flags without a help text: {bare}"


def test_train_help_describes_val_fraction(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert "--val-fraction" in text
    assert "hold out this fraction of the training images" in text
    assert "--task" in text
    assert "--backbone" in text


TINY_TASK_TRAIN = [
    "train",
    "--task",
    "segmentation",
    "--backbone",
    "vit_micro_patch4_28",
    "--dataset",
    "fmnist_scenes",
    "--img-size",
    "32",
    "--train-subset",
    "32",
    "--test-subset",
    "16",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--name",
    "seg",
]


@pytest.fixture(scope="module")
def task_run_dir(tmp_path_factory):
    # generated scenes go to a temporary cache for as long as the module's tests use the run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = tmp_path_factory.mktemp("task_runs")
        assert run([*TINY_TASK_TRAIN, "--out", str(out)]) == 0
        yield out / "seg"


def test_task_train_reports_its_metric(task_run_dir):
    summary = json.loads((task_run_dir / "summary.json").read_text())
    assert summary["primary_metric"] == "miou"
    assert summary["steps"] == 2
    assert 0 <= summary["test_miou"] <= 100


def test_task_eval_prints_its_metrics(task_run_dir, tmp_path, capsys):
    assert run(["eval", str(task_run_dir), "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    lines = capsys.readouterr().out.splitlines()
    miou = next(line for line in lines if line.split()[0] == "miou")
    assert 0 <= float(miou.split()[1]) <= 100
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_images"] == 16


def test_task_predict_writes_an_overlay(task_run_dir, tmp_path, capsys):
    img = tmp_path / "some.png"
    Image.fromarray((torch.rand(40, 40) * 255).byte().numpy()).save(img)
    out = tmp_path / "overlays"
    assert run(["predict", str(img), "--checkpoint", str(task_run_dir), "--out", str(out)]) == 0
    assert str(out / "some.png") in capsys.readouterr().out
    with Image.open(out / "some.png") as overlay:
        assert overlay.size == (64, 32)  # the input beside its prediction, at the run's 32 px
        assert overlay.mode == "RGB"


@pytest.mark.export
def test_task_run_exports_to_onnx(task_run_dir, tmp_path, capsys):
    assert run(["export", str(task_run_dir), "--format", "onnx", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    assert (tmp_path / "vit_micro_patch4_28.onnx").stat().st_size > 0


def test_compress_a_run_and_reload_it_compressed(run_dir, tmp_path, capsys):
    from vitlab.compress import sparsity
    from vitlab.engine import load_trained

    out = tmp_path / "pruned.safetensors"
    assert run(["compress", str(run_dir), "--method", "magnitude", "--amount", "0.5", "--out", str(out)]) == 0
    assert "sparsity" in capsys.readouterr().out
    model, meta, _ = load_trained(out)
    assert [r["method"] for r in meta["surgery"]] == ["magnitude"]
    assert 0.45 <= sparsity(model) <= 0.55
    assert run(["eval", str(out), "--dataset", "synthetic"]) == 0  # evaluates like any checkpoint
    assert run(["compress", str(run_dir), "--method", "magnitude", "--out", str(tmp_path / "x.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_compress_takes_the_methods_keywords_as_json(run_dir, tmp_path, capsys):
    from vitlab.engine import load_trained

    out = tmp_path / "p.safetensors"
    args = ["compress", str(run_dir), "--method", "magnitude", "--args", '{"amount": 0.3}', "--out", str(out)]
    assert run(args) == 0
    assert load_trained(out)[1]["surgery"][-1]["kwargs"]["amount"] == 0.3
    capsys.readouterr()
    assert run(["compress", str(run_dir), "--method", "magnitude", "--args", "amount=0.3", "--out", str(out)]) == 2
    assert "--args must be a JSON object" in capsys.readouterr().err
