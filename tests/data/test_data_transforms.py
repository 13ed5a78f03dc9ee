"""Batch transforms: the channel rule, crop/flip augmentation, normalisation and resizing."""

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.data as vd


def test_match_channels_gray_to_rgb_repeats() -> None:
    x = torch.randint(0, 256, (4, 1, 5, 6), dtype=torch.uint8)
    y = vd.match_channels(x, 3)
    assert y.shape == (4, 3, 5, 6)
    assert y.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(y[:, c], x[:, 0])
    assert vd.match_channels(x, 1) is x


def test_match_channels_rgb_to_gray_matches_pil() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    expected = torch.from_numpy(np.array(Image.fromarray(rgb, "RGB").convert("L"))).int()
    gray = vd.match_channels(torch.from_numpy(rgb).permute(2, 0, 1), 1)
    assert gray.shape == (1, 17, 23)
    assert gray.dtype == torch.uint8
    assert (gray[0].int() - expected).abs().max() <= 1
    as_float = vd.match_channels(torch.from_numpy(rgb).permute(2, 0, 1).float(), 1)
    assert as_float.dtype == torch.float32
    assert (as_float[0] - expected).abs().max() <= 1


def test_match_channels_mismatch_names_both_counts() -> None:
    with pytest.raises(vd.ChannelMismatchError, match=r"2 input channels.*in_chans=3"):
        vd.match_channels(torch.zeros(1, 2, 4, 4), 3)


def test_match_channels_stats() -> None:
    assert vd.match_channels_stats((0.5,), (0.25,), 3) == ((0.5,) * 3, (0.25,) * 3)
    mean, std = vd.match_channels_stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1)
    assert mean[0] == pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)
    assert len(std) == 1
    with pytest.raises(vd.ChannelMismatchError, match="2 input channels"):
        vd.match_channels_stats((0.1, 0.2), (1.0, 1.0), 3)


def test_random_crop_flip_reproducible_and_per_sample() -> None:
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    a = vd.random_crop_flip(x, torch.Generator().manual_seed(7), padding=3)
    b = vd.random_crop_flip(x, torch.Generator().manual_seed(7), padding=3)
    assert torch.equal(a, b)
    assert a.shape == x.shape
    assert a.dtype == torch.uint8
    c = vd.random_crop_flip(x, torch.Generator().manual_seed(8), padding=3)
    assert not torch.equal(a, c)
    # recover each sample's crop by brute force: with 64 samples several distinct crops must appear
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    found = set()
    for i in range(len(x)):
        for dy in range(7):
            for dx in range(7):
                window = padded[i, :, dy : dy + 12, dx : dx + 12]
                for flipped in (False, True):
                    if torch.equal(window.flip(-1) if flipped else window, a[i]):
                        found.add((dy, dx, flipped))
    assert len(found) > 5


def test_random_crop_flip_identity_and_flip_only() -> None:
    x = torch.randint(0, 256, (8, 1, 6, 6), dtype=torch.uint8)
    assert torch.equal(vd.random_crop_flip(x, torch.Generator(), padding=0, flip=False), x)
    y = vd.random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    for i in range(len(x)):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))


def test_normalize() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 2, 1, 3).contiguous()
    y = vd.normalize(x, (0.2, 0.5), (0.5, 0.25))
    assert y.dtype == torch.float32
    expected = (x.float() / 255 - torch.tensor([0.2, 0.5]).view(2, 1, 1)) / torch.tensor([0.5, 0.25]).view(2, 1, 1)
    torch.testing.assert_close(y, expected)
    with pytest.raises(vd.ChannelMismatchError):
        vd.normalize(x, (0.5,), (0.5,))


def test_resize_batch() -> None:
    x = torch.rand(2, 3, 28, 28)
    assert vd.resize_batch(x, 28) is x
    assert vd.resize_batch(x, 32).shape == (2, 3, 32, 32)
    assert vd.resize_batch(x, (14, 20)).shape == (2, 3, 14, 20)
    flat = torch.full((1, 1, 28, 28), 0.3)
    torch.testing.assert_close(vd.resize_batch(flat, 9), torch.full((1, 1, 9, 9), 0.3))
