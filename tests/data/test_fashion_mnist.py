"""Fashion-MNIST: reading the real IDX files, finding them, downloading them, and the errors on the way."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab.data as vd
from vitlab.data import fashion_mnist as fm


def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point every default location at empty temp dirs; return the cache root."""
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    (tmp_path / "debian").mkdir()
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_read_idx_real_files(fmnist_dir: Path) -> None:
    labels = vd.read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,)
    assert labels.dtype == np.uint8
    assert labels[0] == 9  # the first training image is an ankle boot
    assert set(np.unique(labels).tolist()) == set(range(10))
    test_images = vd.read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    assert test_images.shape == (10000, 28, 28)
    assert vd.read_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz").shape == (10000,)


def test_load_both_splits(fmnist_train: vd.TensorImageDataset, fmnist_test: vd.TensorImageDataset) -> None:
    assert fmnist_train.images.shape == (60000, 1, 28, 28)
    assert fmnist_test.images.shape == (10000, 1, 28, 28)
    for ds in (fmnist_train, fmnist_test):
        assert ds.images.dtype == torch.uint8
        assert ds.targets.dtype == torch.int64
        assert int(ds.targets.min()) == 0
        assert int(ds.targets.max()) == 9
        assert ds.classes[9] == "Ankle boot"
        assert len(ds.classes) == 10
        assert ds.in_chans == 1
        assert ds.img_size == (28, 28)
    assert fmnist_train.classes[int(fmnist_train.targets[0])] == "Ankle boot"
    # the published normalisation constants match the training images
    scaled = fmnist_train.images[:10000].float() / 255
    assert scaled.mean().item() == pytest.approx(vd.FASHION_MNIST_MEAN[0], abs=0.01)
    assert scaled.std().item() == pytest.approx(vd.FASHION_MNIST_STD[0], abs=0.01)


def test_unknown_split_names_it(fmnist_dir: Path) -> None:
    with pytest.raises(ValueError, match="'val'"):
        vd.load_fashion_mnist(fmnist_dir, split="val")


def test_find_explicit_root_gz_links(tmp_path: Path, fmnist_dir: Path, fmnist_files: tuple[str, ...]) -> None:
    for name in fmnist_files:
        (tmp_path / f"{name}.gz").symlink_to(fmnist_dir / f"{name}.gz")
    assert vd.find_fashion_mnist(tmp_path) == tmp_path


def test_find_explicit_root_gunzipped_and_layouts(
    tmp_path: Path, fmnist_dir: Path, fmnist_files: tuple[str, ...], fmnist_test: vd.TensorImageDataset
) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    for name in fmnist_files:
        with gzip.open(fmnist_dir / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert vd.find_fashion_mnist(tmp_path, download=False) == raw
    test = vd.load_fashion_mnist(tmp_path, split="test", download=False)
    assert torch.equal(test.images, fmnist_test.images)
    assert torch.equal(test.targets, fmnist_test.targets)


def test_missing_explicit_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(vd.DatasetNotFoundError, match="nowhere") as info:
        vd.find_fashion_mnist(missing)
    assert str(missing) in str(info.value)


def test_incomplete_explicit_root_names_missing_files(tmp_path: Path, fmnist_dir: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").symlink_to(fmnist_dir / "train-images-idx3-ubyte.gz")
    with pytest.raises(vd.DatasetNotFoundError) as info:
        vd.find_fashion_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "t10k-labels-idx1-ubyte" in message
    assert "train-images-idx3-ubyte," not in message  # present, so not listed as missing


def test_env_var_is_searched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fmnist_dir: Path) -> None:
    _isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("VITLAB_DATA", str(fmnist_dir.parent))  # holds a fashion-mnist/ folder
    assert vd.find_fashion_mnist(download=False) == fmnist_dir


def test_all_ways_fail_lists_all_three(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _isolate(monkeypatch, tmp_path)

    def no_network(url: str, dest: Path) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(fm, "_download", no_network)
    with pytest.raises(vd.DatasetNotFoundError) as info:
        vd.find_fashion_mnist()
    message = str(info.value)
    assert "--data-dir" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert fm.FASHION_MNIST_URL in message
    assert "network is unreachable" in message


def test_download_is_validated_and_atomic(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fmnist_dir: Path, fmnist_files: tuple[str, ...]
) -> None:
    cache = _isolate(monkeypatch, tmp_path) / "fashion-mnist"
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in fmnist_files:
        (mirror / f"{name}.gz").symlink_to(fmnist_dir / f"{name}.gz")
    # a corrupt file on the server: the download fails and leaves nothing under the final name
    (mirror / "t10k-labels-idx1-ubyte.gz").unlink()
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setattr(fm, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    with pytest.raises(vd.DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        vd.find_fashion_mnist()
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]

    (mirror / "t10k-labels-idx1-ubyte.gz").unlink()
    (mirror / "t10k-labels-idx1-ubyte.gz").symlink_to(fmnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert vd.find_fashion_mnist() == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in fmnist_files)


def test_download_false_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _isolate(monkeypatch, tmp_path)
    with pytest.raises(vd.DatasetNotFoundError, match="download=False"):
        vd.find_fashion_mnist(download=False)


def test_label_count_mismatch(tmp_path: Path, fmnist_dir: Path, fmnist_files: tuple[str, ...]) -> None:
    for name in fmnist_files:
        if name != "t10k-labels-idx1-ubyte":
            (tmp_path / f"{name}.gz").symlink_to(fmnist_dir / f"{name}.gz")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    with pytest.raises(vd.DataError, match=r"10000 images but .* 3 labels"):
        vd.load_fashion_mnist(tmp_path, split="test")
