"""Data for vitlab: Fashion-MNIST, image folders, synthetic sets and scenes, batch transforms, a resumable loader."""

from .datasets import IMAGE_EXTENSIONS, ImageFolderDataset, TensorImageDataset, load_image, make_synthetic
from .errors import ChannelMismatchError, DataError, DatasetNotFoundError, IdxFormatError, ImageReadError
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from .loader import BatchLoader
from .synthetic import FMNISTScenes, SceneDataset
from .transforms import match_channels, match_channels_stats, normalize, random_crop_flip, resize_batch

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_EXTENSIONS",
    "BatchLoader",
    "ChannelMismatchError",
    "DataError",
    "DatasetNotFoundError",
    "FMNISTScenes",
    "IdxFormatError",
    "ImageFolderDataset",
    "ImageReadError",
    "SceneDataset",
    "TensorImageDataset",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_image",
    "make_synthetic",
    "match_channels",
    "match_channels_stats",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "resize_batch",
]
