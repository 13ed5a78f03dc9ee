"""Checkpoint files: atomic writes, our metadata, clear errors for files that are not ours or torn."""

import pytest
import torch
from safetensors.torch import save_file

from vitlab.engine.checkpoint import atomic_write, load_state, load_weights, read_metadata, save_state, save_weights
from vitlab.engine.inference import load_trained
from vitlab.errors import CheckpointError


def test_weights_round_trip_with_metadata(tmp_path):
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    save_weights(a, tmp_path / "w.safetensors", {"model": "m", "classes": ["x", "y"], "step": 3})
    meta = load_weights(b, tmp_path / "w.safetensors")
    assert meta == {"model": "m", "classes": ["x", "y"], "step": 3}
    assert torch.equal(a.weight, b.weight)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "f.bin"
    path.write_text("good")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_foreign_safetensors_is_rejected(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not a vitlab checkpoint"):
        read_metadata(tmp_path / "foreign.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage pickle", b"\xff" * 64])
def test_garbage_checkpoint_is_rejected(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        load_trained(path)


def test_missing_checkpoint_and_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_metadata(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        load_trained(tmp_path)


def test_state_loads_without_unpickling_objects(tmp_path):
    save_state(tmp_path / "s.pt", {"step": 2, "rng": torch.get_rng_state()})
    assert load_state(tmp_path / "s.pt")["step"] == 2

    import datetime

    torch.save({"x": datetime.datetime(2020, 1, 1)}, tmp_path / "evil.pt")  # any non-tensor object
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_state(tmp_path / "evil.pt")
