"""Training with token reduction: the step's losses against hand computations, schedules restored."""

import pytest
import timm
import torch
import torch.nn.functional as F

from vitlab.engine.reduce_train import ReduceTrainer, build_reduce_trainer, reduce_kwargs
from vitlab.reduce import is_reduced, schedule_of


def _vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=4
    )


def test_reduce_kwargs_parse_and_errors():
    assert reduce_kwargs("8") == {"r": 8}
    assert reduce_kwargs("8,4", layers="1,2") == {"r": [8, 4], "layers": [1, 2]}
    assert reduce_kwargs(keep=0.5) == {"keep": 0.5}
    with pytest.raises(ValueError, match="--reduce-r"):
        reduce_kwargs("eight")
    with pytest.raises(ValueError, match="--reduce-layers"):
        reduce_kwargs(layers="a,b")


def test_without_consistency_is_one_forward_of_the_reduced_model():
    model = _vit().train()
    step = build_reduce_trainer(model, "tome", {"r": 8}, F.cross_entropy)
    assert is_reduced(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    out, loss = step(model, x, y, y)
    torch.manual_seed(1)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert out.shape == (4, 4)


@pytest.mark.parametrize(("method", "kw"), [("mctf", {"r": 8}), ("evit", {"keep": 0.5})])
def test_consistency_term_matches_hand_computation(method, kw):
    model = _vit().eval()  # no dropout: the two forwards are reproducible
    step = build_reduce_trainer(model, method, kw, F.cross_entropy, consistency=2.0)
    amounts = schedule_of(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    u = float(torch.rand(()))
    torch.manual_seed(3)
    _, loss = step(model, x, y, y)
    assert schedule_of(model) == amounts  # restored after the lighter pass

    def cls_and_logits(amts):
        from vitlab.reduce import set_schedule

        set_schedule(model, amts)
        feats = model.forward_features(x)
        set_schedule(model, amounts)
        return feats[:, 0], model.forward_head(feats)

    cls_r, logits_r = cls_and_logits(amounts)
    light = [int(a * u) for a in amounts] if method == "mctf" else [1 - (1 - a) * u if a else 0.0 for a in amounts]
    cls_l, logits_l = cls_and_logits(light)
    expected = F.cross_entropy(logits_r, y) + F.cross_entropy(logits_l, y) + 2.0 * (cls_l - cls_r).pow(2).mean(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_confidence_gate_removes_the_term():
    model = _vit().eval()
    step = build_reduce_trainer(model, "mctf", {"r": 8}, F.cross_entropy, consistency=5.0, threshold=0.99)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    _, gated = step(model, x, y, y)
    plain = ReduceTrainer(model, "mctf", F.cross_entropy, consistency=1e-12)
    torch.manual_seed(0)
    _, reference = plain(model, x, y, y)  # an untrained 4-class model is never 99% sure
    torch.testing.assert_close(gated, reference, rtol=1e-5, atol=1e-6)


def test_gradients_flow_and_bad_settings_are_named():
    model = _vit().train()
    step = build_reduce_trainer(model, "mctf", {"r": 4}, F.cross_entropy, consistency=1.0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    _, loss = step(model, x, y, y)
    loss.backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="consistency"):
        ReduceTrainer(model, "mctf", F.cross_entropy, consistency=-1)
    with pytest.raises(ValueError, match="threshold"):
        ReduceTrainer(model, "mctf", F.cross_entropy, threshold=1.0)


def _run_cfg(tmp_path, name, **reduction):
    from vitlab.engine import RunConfig

    cfg = RunConfig(out=str(tmp_path), name=name, log_every=1, device="cpu")
    cfg.model.model = "vit_nano_patch4_28"
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 64, 32, 32
    cfg.optim.epochs, cfg.optim.warmup_epochs = 1, 0.0
    for k, v in reduction.items():
        setattr(cfg.reduction, k, v)
    return cfg


def test_train_with_reduce_saves_a_model_that_reloads_reduced_and_fine_tunes(tmp_path):
    from vitlab.engine import evaluate_run, load_trained, train
    from vitlab.engine.inference import init_from_checkpoint

    plain = train(_run_cfg(tmp_path, "plain"))
    cfg = _run_cfg(tmp_path, "mctf", reduce="mctf", reduce_r="4", reduce_consistency=1.0)
    cfg.model.init_from = str(plain)  # fine-tuning the plain run with the reduction on
    run = train(cfg)
    model, meta, _ = load_trained(run)
    assert meta["surgery"] == [{"kind": "reduce", "method": "mctf", "kwargs": {"r": 4}}]
    assert is_reduced(model)
    assert schedule_of(model)[1:] == [4] * (len(model.blocks) - 1)
    assert evaluate_run(run).top1 >= 0
    with pytest.raises(Exception, match="does not fit"):
        init_from_checkpoint(_vit(), plain)  # another architecture


def test_reduce_flags_are_validated():
    from vitlab.engine import RunConfig

    cfg = RunConfig()
    cfg.reduction.reduce_consistency = 1.0
    with pytest.raises(ValueError, match="--reduce-consistency needs --reduce"):
        cfg.validate()
    cfg.reduction.reduce, cfg.multires.resolutions = "tome", "16,24"
    with pytest.raises(ValueError, match=r"--reduce .*--resolutions"):
        cfg.validate()
