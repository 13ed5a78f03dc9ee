"""ImageFolderDataset and load_image on tiny PNG folders written with PIL."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.data as vd


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 3), ("ant", 2)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8)
            suffix = ".PNG" if i == 0 else ".png"  # extensions match case-insensitively
            Image.fromarray(pixels, "RGB").save(tmp_path / cls / f"{i}{suffix}")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_classes_len_shapes(folder: Path) -> None:
    ds = vd.ImageFolderDataset(folder, img_size=8)
    assert ds.classes == ["ant", "cat"]
    assert len(ds) == 5
    assert ds.targets == [0, 0, 1, 1, 1]
    image, target = ds[4]
    assert image.shape == (3, 8, 8)
    assert image.dtype == torch.uint8
    assert target == 1
    assert ds.in_chans == 3
    assert ds.img_size == (8, 8)
    assert ds.mean == (0.485, 0.456, 0.406)
    gray = vd.ImageFolderDataset(folder, img_size=(6, 9), in_chans=1)
    assert gray[0][0].shape == (1, 6, 9)
    assert gray.mean == (0.5,)
    tensors = gray.to_tensor_dataset()
    assert tensors.images.shape == (5, 1, 6, 9)
    assert tensors.targets.tolist() == gray.targets


def test_load_image_matches_pil(folder: Path) -> None:
    path = folder / "cat" / "1.png"
    expected = np.array(Image.open(path).convert("L"))
    assert torch.equal(vd.load_image(path, 1)[0], torch.from_numpy(expected))
    with pytest.raises(vd.ChannelMismatchError, match="in_chans=2"):
        vd.load_image(path, 2)


def test_unreadable_image_names_the_file(folder: Path) -> None:
    bad = folder / "ant" / "x.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes())
    ds = vd.ImageFolderDataset(folder, img_size=8)
    index = [str(p) for p, _ in ds.samples].index(str(bad))
    with pytest.raises(vd.ImageReadError) as info:
        ds[index]
    assert str(bad) in str(info.value)


def test_empty_or_missing_root(tmp_path: Path) -> None:
    with pytest.raises(vd.DataError, match="no class subfolders") as info:
        vd.ImageFolderDataset(tmp_path, img_size=8)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(vd.DataError, match="holds no images"):
        vd.ImageFolderDataset(tmp_path, img_size=8)
    with pytest.raises(vd.DatasetNotFoundError, match="absent"):
        vd.ImageFolderDataset(tmp_path / "absent", img_size=8)
