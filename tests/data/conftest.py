"""Shared fixtures for the data tests: the real Fashion-MNIST files (tests skip where they are absent)."""

from pathlib import Path

import pytest

import vitlab.data as vd

_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The folder of the real Fashion-MNIST ``.gz`` files (Debian package ``dataset-fashion-mnist``)."""
    if not all((_FMNIST_DIR / f"{name}.gz").is_file() for name in _FMNIST_FILES):
        pytest.skip(f"Fashion-MNIST .gz files not found in {_FMNIST_DIR}")
    return _FMNIST_DIR


@pytest.fixture(scope="session")
def fmnist_files() -> tuple[str, ...]:
    return _FMNIST_FILES


@pytest.fixture(scope="session")
def fmnist_train(fmnist_dir: Path) -> vd.TensorImageDataset:
    return vd.load_fashion_mnist(fmnist_dir, split="train", download=False)


@pytest.fixture(scope="session")
def fmnist_test(fmnist_dir: Path) -> vd.TensorImageDataset:
    return vd.load_fashion_mnist(fmnist_dir, split="test", download=False)
