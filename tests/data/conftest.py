"""Shared fixtures for the data tests: the real Fashion-MNIST files (tests skip where they are absent)."""

from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def square_items() -> vd.TensorImageDataset:
    """12 fake gray items (bright noisy squares on black), so the renderers' tests need no Fashion-MNIST files."""
    g = np.random.default_rng(0)
    images = np.zeros((12, 1, 28, 28), np.uint8)
    images[:, 0, 6:22, 6:22] = g.integers(80, 256, (12, 16, 16))
    return vd.TensorImageDataset(images=torch.from_numpy(images), targets=torch.arange(12) % 10,
                                 classes=list(vd.FASHION_MNIST_CLASSES), mean=(0.3,), std=(0.3,))  # fmt: skip
