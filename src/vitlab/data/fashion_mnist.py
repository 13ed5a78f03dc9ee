"""Fashion-MNIST: the IDX reader, finding (or fetching) the four files, and loading a split.

Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747, https://github.com/zalandoresearch/fashion-mnist) ships
as four IDX files. :func:`find_fashion_mnist` looks for them, in order, in a folder the user names, in
``$VITLAB_DATA``, in the Debian package folder (``apt-get install dataset-fashion-mnist``) and in the vitlab
cache, and downloads them into the cache as a last resort.
"""

import gzip
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from .datasets import TensorImageDataset
from .errors import DataError, DatasetNotFoundError, IdxFormatError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_FILES = tuple(name for pair in _SPLIT_FILES.values() for name in pair)
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw) holding uint8 data.

    Compression is detected from the gzip magic bytes, not the suffix.

    Raises:
        DatasetNotFoundError: the file does not exist.
        IdxFormatError: the file is empty, corrupt, truncated, too long or not uint8.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"IDX file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetNotFoundError(f"IDX path {path} is a directory; expected an IDX file") from None
    if not raw:
        raise IdxFormatError(f"IDX file {path} is empty; expected a 4-byte magic number, dims and data")
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxFormatError(f"IDX file {path} is a corrupt or truncated gzip stream ({e})") from e
        if not raw:
            raise IdxFormatError(f"IDX file {path} decompresses to nothing; expected IDX data")

    if len(raw) < 4:
        raise IdxFormatError(f"IDX file {path} is {len(raw)} bytes long; expected at least a 4-byte magic number")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise IdxFormatError(
            f"IDX file {path} has magic {raw[:4].hex()}; expected two zero bytes then the dtype and ndim bytes"
        )
    if code != 0x08:
        name = _IDX_DTYPES.get(code, "unknown")
        raise IdxFormatError(f"IDX file {path} has dtype code {code:#04x} ({name}); only 0x08 (uint8) is supported")
    if ndim == 0:
        raise IdxFormatError(f"IDX file {path} declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"IDX file {path} is {len(raw)} bytes, too short for its {ndim} dimension sizes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "too long"
        raise IdxFormatError(f"IDX file {path} is {kind}: dims {dims} need {expected} data bytes, found {actual}")
    # copy() so the array is writable and owns its memory (torch.from_numpy warns on read-only buffers)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _cache_dir() -> Path:
    root = os.environ.get("VITLAB_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vitlab"
    return base / "fashion-mnist"


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(folder: Path) -> list[str]:
    return [name for name in _ALL_FILES if _file_in(folder, name) is None]


def _layouts(root: Path) -> list[Path]:
    # our own layout, then the common "fashion-mnist/" folder and torchvision's "FashionMNIST/raw"
    return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]


def _download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically, validating it as IDX before it takes the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        read_idx(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_fashion_mnist(root: str | Path | None = None, download: bool = True) -> Path:
    """Return the folder holding the four Fashion-MNIST IDX files (``.gz`` or uncompressed).

    Search order: ``root`` (also ``root/fashion-mnist`` and ``root/FashionMNIST/raw``), ``$VITLAB_DATA``, the
    Debian package folder ``/usr/share/datasets/fashion-mnist``, the cache (``$VITLAB_CACHE/fashion-mnist``,
    default ``~/.cache/vitlab/fashion-mnist``), then, if ``download``, a download into the cache.

    Raises:
        DatasetNotFoundError: ``root`` was given but lacks the files, or every way failed.
    """
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(f"Fashion-MNIST data dir {root} does not exist (or is not a directory)")
        for folder in _layouts(root):
            if not _missing(folder):
                return folder
        raise DatasetNotFoundError(
            f"Fashion-MNIST data dir {root} lacks {', '.join(_missing(root))} (plain or .gz); also looked in "
            f"{root / 'fashion-mnist'} and {root / 'FashionMNIST' / 'raw'}"
        )

    searched = []
    env = os.environ.get("VITLAB_DATA")
    candidates = _layouts(Path(env).expanduser()) if env else []
    cache = _cache_dir()
    for folder in [*candidates, DEBIAN_DIR, cache]:
        searched.append(str(folder))
        if folder.is_dir() and not _missing(folder):
            return folder

    if download:
        url = FASHION_MNIST_URL
        try:
            for name in _missing(cache):
                url = f"{FASHION_MNIST_URL}{name}.gz"
                _download(url, cache / f"{name}.gz")
            return cache
        except (OSError, DataError) as e:
            download_note = f"download of {url} failed: {type(e).__name__}: {e}"
    else:
        download_note = "download=False, so no download was tried"
    raise DatasetNotFoundError(
        "Fashion-MNIST not found (searched " + ", ".join(searched) + "). Get it one of three ways:\n"
        "  1. pass --data-dir DIR (root=DIR) pointing at a folder holding "
        + ", ".join(f"{n}[.gz]" for n in _ALL_FILES)
        + ";\n"
        f"  2. install the Debian package: sudo apt-get install dataset-fashion-mnist (fills {DEBIAN_DIR});\n"
        f"  3. download the four .gz files from {FASHION_MNIST_URL} into {cache} ({download_note})."
    )


def load_fashion_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = True
) -> TensorImageDataset:
    """Load one Fashion-MNIST split (``"train"`` or ``"test"``) as uint8 images (N, 1, 28, 28)."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(_SPLIT_FILES)}")
    folder = find_fashion_mnist(root, download=download)
    image_path, label_path = (_file_in(folder, name) for name in _SPLIT_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise IdxFormatError(f"IDX file {image_path} has shape {images.shape}; expected (N, H, W) images")
    if labels.ndim != 1:
        raise IdxFormatError(f"IDX file {label_path} has shape {labels.shape}; expected (N,) labels")
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_path} holds label {labels.max()}; expected labels in 0..9")
    return TensorImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        targets=torch.from_numpy(labels).long(),
        classes=list(FASHION_MNIST_CLASSES),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        name=f"fashion_mnist/{split}",
    )
