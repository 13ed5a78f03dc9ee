"""ViT-ResNAS supernet: masked sub-networks equal their standalone networks with sliced weights."""

import random

import pytest
import torch
import torch.nn as nn

from vitlab.bench import count_flops, gmacs
from vitlab.models.vit_resnas import ViTResNAS
from vitlab.search import Arch, SearchSpace, StageSpace, Supernet, masked_layer_norm

SPACE = SearchSpace(
    (
        StageSpace(embed=(16, 12), heads=(3, 2, 1), mlp=(32, 24), head_dim=8, depth=2, skippable=(1,)),
        StageSpace(embed=(32, 24), heads=(4, 2), mlp=(64, 40), head_dim=8, depth=2, skippable=(1,)),
    ),
    patch_size=4,
    stem_chans=8,
    img_size=28,
    in_chans=1,
    num_classes=5,
)
SMALL = Arch((12, 24), (((2, 24, True), (1, 32, False)), ((2, 40, True), (4, 64, True))))


def _supernet(seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    net = Supernet(SPACE)
    for p in net.parameters():  # non-trivial norms, biases and BN statistics
        p.data.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_masked_layer_norm_equals_layer_norm_on_active_channels():
    norm = nn.LayerNorm(10, eps=1e-6)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(3, 5, 10)
    mask = torch.zeros(3, 1, 10, dtype=torch.bool)
    for i, k in enumerate((10, 7, 3)):
        mask[i, :, :k] = True
    out = masked_layer_norm(x, mask, norm)
    for i, k in enumerate((10, 7, 3)):
        ref = nn.functional.layer_norm(x[i, :, :k], (k,), norm.weight[:k], norm.bias[:k], 1e-6)
        torch.testing.assert_close(out[i, :, :k], ref)
        assert (out[i, :, k:] == 0).all()


def test_largest_subnet_equals_standalone_largest():
    net = _supernet()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x, SPACE.largest()), net.model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.extract(SPACE.largest())(x), net.model(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_subnet_equals_standalone_with_sliced_weights(seed):
    net = _supernet(seed)
    arch = SMALL if seed == 0 else SPACE.sample(random.Random(seed))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x, arch), net.extract(arch)(x), rtol=1e-4, atol=1e-5)


def test_multi_arch_batch_runs_each_arch_on_its_slice():
    net = _supernet()
    archs = [SPACE.largest(), SMALL, SPACE.smallest()]
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        out = net(x, archs)
        for i, arch in enumerate(archs):
            torch.testing.assert_close(
                out[2 * i : 2 * i + 2], net.extract(arch)(x[2 * i : 2 * i + 2]), rtol=1e-4, atol=1e-5
            )


def test_multi_arch_gradients_reach_shared_weights():
    net = _supernet().train()
    out = net(torch.randn(4, 1, 28, 28), [SPACE.largest(), SPACE.smallest()])
    out.sum().backward()
    qkv = net.model.stages[0].blocks[0].attn.qkv.weight.grad
    assert qkv is not None
    assert qkv.abs().sum() > 0


def test_macs_of_sampled_configs_match_bench_counting():
    rng = random.Random(0)
    for arch in [SPACE.largest(), SPACE.smallest(), SMALL] + [SPACE.sample(rng) for _ in range(3)]:
        with torch.device("meta"):
            model = ViTResNAS(SPACE.to_spec(arch), img_size=28, in_chans=1, num_classes=5)
        assert gmacs(count_flops(model, (1, 28, 28))) == pytest.approx(SPACE.macs(arch) / 1e9, rel=1e-9)


@pytest.mark.parametrize(
    "bad",
    [
        Arch((16,), ((), ())),  # one width for two stages
        Arch((20, 32), SPACE.largest().blocks),  # width not a choice
        Arch((16, 32), (((3, 32, True), (3, 32, True)), ((4, 64, False), (4, 64, True)))),  # block 0 not skippable
        Arch((16, 32), (((5, 32, True), (3, 32, True)), ((4, 64, True), (4, 64, True)))),  # 5 heads not a choice
    ],
)
def test_bad_arch_errors(bad):
    with pytest.raises(ValueError, match="arch"):
        SPACE.validate(bad)
    with pytest.raises(ValueError, match="arch"):
        _supernet()(torch.randn(2, 1, 28, 28), bad)


def test_bad_space_and_batch_error():
    with pytest.raises(ValueError, match="width"):
        SearchSpace((StageSpace((32,), (1,), (8,), 8, 1), StageSpace((16,), (1,), (8,), 8, 1)))
    with pytest.raises(ValueError, match="skippable"):
        StageSpace((16,), (1,), (8,), 8, 1, skippable=(3,))
    with pytest.raises(ValueError, match="split evenly"):
        _supernet()(torch.randn(3, 1, 28, 28), [SMALL, SMALL])
