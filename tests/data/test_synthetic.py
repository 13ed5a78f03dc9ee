"""make_synthetic and TensorImageDataset: determinism, learnable classes, subsets, validation."""

import pytest
import torch

import vitlab.data as vd


def test_deterministic_for_a_seed() -> None:
    a, b = vd.make_synthetic(n=64, seed=1), vd.make_synthetic(n=64, seed=1)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.targets, b.targets)
    assert a.mean == b.mean
    assert not torch.equal(a.images, vd.make_synthetic(n=64, seed=2).images)


def test_shapes_and_stats() -> None:
    ds = vd.make_synthetic(n=40, num_classes=4, img_size=16, in_chans=3)
    assert ds.images.shape == (40, 3, 16, 16)
    assert ds.images.dtype == torch.uint8
    assert ds.targets.bincount().tolist() == [10, 10, 10, 10]
    assert len(ds.classes) == 4
    assert ds.in_chans == 3
    assert ds.img_size == (16, 16)
    scaled = ds.images.float() / 255
    assert ds.mean == pytest.approx(scaled.mean(dim=(0, 2, 3)).tolist())
    assert ds.std == pytest.approx(scaled.std(dim=(0, 2, 3)).tolist())


def test_classes_are_distinguishable() -> None:
    ds = vd.make_synthetic(n=500, seed=0)
    x = ds.images.float().flatten(1) / 255
    means = torch.stack([x[ds.targets == k].mean(0) for k in range(10)])
    # nearest class mean classifies most samples: the classes differ by far more than the noise
    predicted = torch.cdist(x, means).argmin(1)
    assert (predicted == ds.targets).float().mean() > 0.9
    gaps = torch.cdist(means, means) + torch.eye(10) * 1e9
    assert gaps.min() > 1.0


def test_tiny_model_learns_quickly() -> None:
    torch.manual_seed(0)
    loader = vd.BatchLoader(vd.make_synthetic(n=256, seed=0), batch_size=32)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for epoch in range(4):
        for x, y in loader.iter_epoch(epoch):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) == 32
    assert sum(losses[-4:]) / 4 < 0.5 * losses[0]


def test_subset() -> None:
    ds = vd.make_synthetic(n=50)
    sub = ds.subset(10, seed=4)
    assert len(sub) == 10
    assert torch.equal(sub.images, ds.subset(10, seed=4).images)
    assert not torch.equal(sub.images, ds.subset(10, seed=5).images)
    picked = ds.subset([3, 1])
    assert torch.equal(picked.images[0], ds.images[3])
    assert picked[1][1] == int(ds.targets[1])
    with pytest.raises(ValueError, match="51"):
        ds.subset(51)


def test_validation() -> None:
    ds = vd.make_synthetic(n=4)
    with pytest.raises(vd.DataError, match="uint8"):
        vd.TensorImageDataset(ds.images.float(), ds.targets, ds.classes, ds.mean, ds.std)
    with pytest.raises(vd.DataError, match="4 images but 3 targets"):
        vd.TensorImageDataset(ds.images, ds.targets[:3], ds.classes, ds.mean, ds.std)
    with pytest.raises(vd.ChannelMismatchError):
        vd.TensorImageDataset(ds.images, ds.targets, ds.classes, (0.5, 0.5, 0.5), ds.std)
    with pytest.raises(vd.DataError, match="targets span"):
        vd.TensorImageDataset(ds.images, ds.targets + 10, ds.classes, ds.mean, ds.std)
