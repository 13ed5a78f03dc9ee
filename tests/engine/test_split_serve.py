"""ED-ViT distributed inference (``engine/split_serve.py``) and the ``vitlab split`` / ``serve-split`` commands:
two gloo processes give what the split gives in one process; a killed worker (or one that stops answering) is a
clear ``SplitServeError`` within the timeout, not a hang; bad input is a one-line error."""

import json
import os
import signal
import threading
import time

import pytest
import torch

import vitlab
from vitlab.cli import run
from vitlab.engine.checkpoint import save_weights
from vitlab.engine.split_run import build_split, load_split, save_split
from vitlab.engine.split_serve import SplitServeError, SplitServer
from vitlab.errors import CheckpointError

META = {"model": "vit_nano_patch4_28", "num_classes": 10, "in_chans": 1, "img_size": 28}
META |= {"classes": [f"class_{i}" for i in range(10)], "mean": [0.5], "std": [0.5]}


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """A 2-part pruned split of an untrained vit_nano with a fusion MLP that is not zero (its path is exercised)."""
    torch.manual_seed(0)
    host = vitlab.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1).eval()
    x, y = torch.randn(20, 1, 28, 28), torch.arange(20) % 10
    split, _ = build_split(host, x, y, 2, heads=0.5, mlp=0.5, distill_epochs=0, fusion_epochs=0)
    torch.nn.init.normal_(split.fusion.mlp[-1].weight)
    out = tmp_path_factory.mktemp("edvit") / "split"
    save_split(split, out, META)
    return out


def test_two_gloo_processes_equal_the_single_process_split(split_dir):
    ref_split, _ = load_split(split_dir)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        ref = ref_split(x)
    with SplitServer(split_dir, backend="gloo", timeout_s=20) as server:
        assert len(server.pids) == 1  # rank 0 is this process
        res = server.infer(x)
        torch.testing.assert_close(res.logits, ref, atol=1e-5, rtol=1e-5)
        assert len(res.part_seconds) == 2
        assert res.seconds >= max(res.part_seconds)
        torch.testing.assert_close(server(x[:2]), ref[:2], atol=1e-5, rtol=1e-5)  # a second request, other size
    assert not torch.distributed.is_initialized()  # closed cleanly


def test_worker_killed_mid_request_raises_a_clear_error_not_a_hang(split_dir):
    x = torch.randn(3, 1, 28, 28)
    with SplitServer(split_dir, backend="gloo", timeout_s=30) as server:
        server.infer(x)
        pid = server.pids[0]
        os.kill(pid, signal.SIGSTOP)  # the worker cannot answer: rank 0 will wait inside the next request ...
        killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))  # ... and the worker dies while it waits
        killer.start()
        start = time.monotonic()
        with pytest.raises(SplitServeError, match=r"rank 1 \(part 1\) was killed by SIGKILL"):
            server.infer(x)
        killer.join()
        assert time.monotonic() - start < 30  # the closed connection ends the request, before the timeout
        with pytest.raises(SplitServeError, match="closed after an earlier failure"):
            server.infer(x)
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_stopped_worker_times_out(split_dir):
    x = torch.randn(3, 1, 28, 28)
    with SplitServer(split_dir, backend="gloo", timeout_s=2) as server:
        os.kill(server.pids[0], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(SplitServeError, match=r"did not answer within 2 s"):
            server.infer(x)
        assert time.monotonic() - start < 10


def test_serving_something_that_is_not_a_split_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a split directory"):
        SplitServer(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a vitlab split manifest"):
        SplitServer(tmp_path)


@pytest.fixture(scope="module")
def host_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "host.safetensors"
    model = vitlab.create_model("vit_nano_patch4_28", num_classes=10, in_chans=1)
    meta = META | {"mean": [0.24092447757720947], "std": [0.17630770802497864]}  # the synthetic set's
    save_weights(model, path, meta)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "11"], "larger than the number of classes"),
        (["--parts", "0"], "--parts must be an integer >= 1"),
        (["--parts", "2", "--budgets-mb", "0.1"], "needs"),
        (["--parts", "2", "--heads", "1.5"], "--heads"),
    ],
)
def test_split_command_bad_input_is_one_line(host_checkpoint, tmp_path, capsys, args, message):
    common = ["--dataset", "synthetic", "--train-subset", "20", "--test-subset", "10", "--distill-epochs", "0"]
    assert run(["split", str(host_checkpoint), *args, *common, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


def test_split_command_rejects_a_file_that_is_not_vitlabs(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert run(["split", str(bad), "--parts", "2", "--out", str(tmp_path / "s")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_split_command_writes_a_split_directory(host_checkpoint, tmp_path, capsys):
    out = tmp_path / "split"
    args = ["split", str(host_checkpoint), "--parts", "3", "--out", str(out), "--dataset", "synthetic"]
    args += ["--train-subset", "40", "--test-subset", "20", "--distill-epochs", "0.5", "--fusion-epochs", "1"]
    assert run([*args, "--heads", "0.5", "--mlp", "0.5", "--batch-size", "16", "--budgets-mb", "4,4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(c for p in manifest["parts"] for c in p["classes"]) == list(range(10))
    assert {"host_top1", "top1", "top1_argmax"} <= set(manifest["scores"])
    assert all(p["params"] < manifest["host_params"] * 0.6 for p in manifest["parts"])
    assert all(0 <= p["device"] < 2 for p in manifest["parts"])
    assert "split top-1" in capsys.readouterr().out
    assert (out / "part2.safetensors").is_file()
    assert (out / "fusion.safetensors").is_file()


@pytest.mark.slow
def test_serve_split_command_scores_a_data_set(split_dir, capsys):
    assert run(["serve-split", str(split_dir), "--dataset", "synthetic", "--test-subset", "16"]) == 0
    assert "2 processes (gloo)" in capsys.readouterr().out
