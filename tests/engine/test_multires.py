"""engine/multires.py: ResFormer's multi-resolution loss equals its definition; --resolutions is validated."""

import json

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.engine import RunConfig, train
from vitlab.engine.config import MultiResConfig
from vitlab.engine.multires import (
    MultiResolutionLoss,
    ResolutionCurriculum,
    build_multires,
    parse_resolutions,
    resize_batch,
    scale_consistency_loss,
    varied_resolution_images,
)

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 32, "num_classes": 5}


def _model():
    torch.manual_seed(0)
    return vitlab.create_model("resformer_nano_patch4_28", in_chans=1, **TINY)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("16,24,32", (32, 24, 16)), (" 224, 128 ,160", (224, 160, 128)), ([20, 28], (28, 20)), ("", ()), (None, ())],
)
def test_parse_resolutions_sorts_largest_first(value, expected):
    assert parse_resolutions(value) == expected


@pytest.mark.parametrize("bad", ["a,b", "16,16", "4,16", "16.5", "16,,24", [16, 0]])
def test_bad_resolutions_are_named(bad):
    with pytest.raises(ValueError, match="--resolutions"):
        parse_resolutions(bad)
    cfg = RunConfig()
    cfg.multires.resolutions = bad if isinstance(bad, str) else ",".join(map(str, bad))
    with pytest.raises(ValueError, match="--resolutions"):
        cfg.validate()


def test_resolutions_and_teacher_refused_together():
    cfg = RunConfig()
    cfg.multires.resolutions, cfg.distillation.teacher = "28,20", "vit_nano_patch4_28"
    with pytest.raises(ValueError, match="--teacher"):
        cfg.validate()


def test_scale_consistency_is_smooth_l1_to_whitened_detached_teacher():
    student = torch.randn(4, 16, requires_grad=True)
    teacher = (torch.randn(4, 16) * 3 + 1).requires_grad_()
    loss = scale_consistency_loss(student, teacher)
    t = teacher.detach()
    whitened = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
    diff = (student - whitened).abs()
    naive = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    assert torch.allclose(loss, naive, atol=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher is detached (Sec. 4.1)
    assert student.grad is not None
    assert student.grad.abs().sum() > 0


def test_loss_matches_the_definition():
    model = _model().eval()
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 3, 4])
    sizes = (32, 24, 16)
    alpha = 0.7
    loss_fn = MultiResolutionLoss(sizes, model.get_classifier(), F.cross_entropy, alpha)
    logits, loss = loss_fn(model, x, y)
    # by hand: CE at each size, plus alpha * smooth-L1(cls_{i+1}, LN(cls_i)), divided by the number of sizes
    feats = [model.forward_head(model.forward_features(resize_batch(x, s)), pre_logits=True) for s in sizes]
    ce = [F.cross_entropy(model.get_classifier()(f), y) for f in feats]
    kd = [scale_consistency_loss(feats[i + 1], feats[i]) for i in range(len(sizes) - 1)]
    expected = (sum(ce) + alpha * sum(kd)) / len(sizes)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(logits, model(x), atol=1e-5)  # logits at the largest size (32 = the input here)
    assert set(loss_fn.last) == {"loss_32", "loss_24", "loss_16", "consistency_24", "consistency_16"}


def test_without_consistency_is_the_mean_classification_loss():
    model = _model().eval()
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    _, loss = MultiResolutionLoss((32, 16), model.get_classifier(), F.cross_entropy, 0.0)(model, x, y)
    ce = [F.cross_entropy(model(resize_batch(x, s)), y) for s in (32, 16)]
    assert torch.allclose(loss, (ce[0] + ce[1]) / 2, atol=1e-6)


def test_hook_is_removed_and_gradients_reach_every_parameter():
    model = _model().train()
    loss_fn = build_multires(MultiResConfig(resolutions="32,16"), model)
    _, loss = loss_fn(model, torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))
    loss.backward()
    assert not model.get_classifier()._forward_pre_hooks
    assert all(p.grad is not None for p in model.parameters())


def test_build_multires_off_without_resolutions_and_refuses_headless_models():
    model = _model()
    assert build_multires(MultiResConfig(), model) is None
    model.reset_classifier(0)
    with pytest.raises(ValueError, match="--resolutions"):
        build_multires(MultiResConfig(resolutions="28,20"), model)


def test_train_with_resolutions_end_to_end(tmp_path):
    cfg = RunConfig(out=str(tmp_path), name="mr", log_every=1, device="cpu")
    cfg.model.model = "resformer_nano_patch4_28"
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 64, 32, 32
    cfg.optim.epochs, cfg.multires.resolutions = 1, "28,20,16"
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "lr" in line]
    assert len(losses) == 2
    assert all(torch.isfinite(torch.tensor(losses)))


def _univitar():
    torch.manual_seed(0)
    return vitlab.create_model("univitar_nano_patch4_28", embed_dim=32, depth=1, num_heads=2, num_classes=5).eval()


def test_varied_resolution_images_are_patch_multiples_and_reproducible():
    x = torch.rand(6, 1, 28, 28)
    a = varied_resolution_images(x, 4, torch.Generator().manual_seed(3))
    b = varied_resolution_images(x, 4, torch.Generator().manual_seed(3))
    assert [t.shape for t in a] == [t.shape for t in b]
    assert all(t.shape[0] == 1 and t.shape[1] % 4 == 0 and t.shape[2] % 4 == 0 for t in a)
    assert len({(t.shape[1], t.shape[2]) for t in a}) > 1  # sizes and aspect ratios differ


def test_curriculum_is_fixed_size_then_packed_native():
    model = _univitar()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    curriculum = ResolutionCurriculum(model, F.cross_entropy, switch_step=5, seed=1)
    logits, loss = curriculum(model, x, y, step=4)
    assert torch.allclose(logits, model(x))
    assert torch.allclose(loss, F.cross_entropy(model(x), y))
    logits, loss = curriculum(model, x, y, step=5)
    images = varied_resolution_images(x, 4, torch.Generator().manual_seed(1 * 1_000_003 + 5))
    expect = torch.cat([model(img[None]) for img in images])  # packed == each image alone
    assert torch.allclose(logits, expect, atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(expect, y), atol=1e-5)


def test_curriculum_options_are_checked():
    with pytest.raises(ValueError, match="forward_packed"):
        ResolutionCurriculum(_model(), F.cross_entropy, 0)
    with pytest.raises(ValueError, match="--resolutions"):
        build_multires(MultiResConfig(resolutions="28,20", native_after=0.5), _univitar())
    cfg = RunConfig()
    cfg.multires.native_after = 1.5
    with pytest.raises(ValueError, match="--native-after"):
        cfg.validate()
    assert isinstance(
        build_multires(MultiResConfig(native_after=0.5), _univitar(), total_steps=10), ResolutionCurriculum
    )


def test_train_with_native_resolution_curriculum(tmp_path):
    cfg = RunConfig(out=str(tmp_path), name="nr", log_every=1, device="cpu")
    cfg.model.model = "univitar_nano_patch4_28"
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 64, 32, 32
    cfg.optim.epochs, cfg.multires.native_after = 1, 0.5  # step 0 at 28 px, step 1 packed at native sizes
    run = train(cfg)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
