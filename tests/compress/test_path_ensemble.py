"""Path Ensemble (arXiv:2308.06548): the two-stream wrapper equals the host at init, the path decomposition is
exact, pruning removes exactly the named terms, self-distillation, EnsembleScale gradients, host checks, round trip,
and the path analysis (removal table, spectra)."""

import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitlab
from vitlab import compress
from vitlab.compress.path_analysis import _amplitude, _summary, feature_spectra, path_contributions
from vitlab.compress.path_ensemble import (
    EnsembleScale,
    is_path_ensemble,
    path_distill_loss,
    self_distill_kl,
    unwrap_paths,
    wrap_paths,
)

_VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 5}
HOSTS = {
    "timm_vit_token": lambda: timm.create_model("vit_tiny_patch16_224", **_VIT),
    "timm_vit_avg_ls": lambda: timm.create_model(
        "vit_tiny_patch16_224", global_pool="avg", class_token=False, init_values=0.3, **_VIT
    ),
    "vit_nano_patch4_28": lambda: vitlab.create_model("vit_nano_patch4_28", embed_dim=32, depth=4, num_heads=2),
    # vitlab's own isotropic family (layers.IsotropicBackbone: MetaBlock + layers.Attention)
    "channelvit_nano": lambda: vitlab.create_model("channelvit_nano_patch4_28", embed_dim=32, depth=4, num_heads=2),
}


def _host(name):
    torch.manual_seed(0)
    model = HOSTS[name]().eval()
    chans, *size = model.pretrained_cfg["input_size"]
    size = getattr(model.patch_embed, "img_size", None) or size
    return model, torch.randn(3, chans, *size)


@pytest.fixture(params=sorted(HOSTS))
def host(request):
    return _host(request.param)


def _prenorm(model, x):
    """The tokens that reach the final norm (captured by a pre-hook)."""
    seen = []
    handle = model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def _capture(model, x):
    blocks = model.blocks
    blocks.capture = cap = {}
    with torch.no_grad():
        model.forward_features(x)
    blocks.capture = None
    return cap


def test_registered():
    assert "path_ensemble" in compress.list_methods()


def test_wrapped_at_init_equals_host(host):
    model, x = host
    ref = model(x)
    keys = set(model.state_dict())
    compress.apply(model, "path_ensemble", ensemble_scale=True, prune_direct=0, self_distill=0.0)
    assert is_path_ensemble(model)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    new = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())
    assert new
    assert all(".es" in k for k in new)
    compress.remove(model)
    assert not is_path_ensemble(model)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_decomposition_identity(host):
    """input path + every block's attention and FFN term == the last block's output before the final norm."""
    model, x = host
    last = _prenorm(model, x)
    wrap_paths(model)
    cap = _capture(model, x)
    total = cap["input"] + sum(cap["attn"]) + sum(cap["ffn"])
    torch.testing.assert_close(total, last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap["reps"][-1], last, rtol=0, atol=0)  # the representation stream is the host's


@pytest.mark.parametrize("k", [1, 3])
def test_prune_direct_removes_exactly_those_terms(k):
    model, x = _host("timm_vit_avg_ls")
    wrap_paths(model)
    full = _capture(model, x)
    unwrap_paths(model)
    compress.apply(model, "path_ensemble", ensemble_scale=False, prune_direct=k)
    pruned = _capture(model, x)
    expect = full["output"] - full["input"] - sum(full["attn"][:k]) - sum(full["ffn"][:k])
    torch.testing.assert_close(pruned["output"], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_prenorm(model, x), pruned["output"], rtol=0, atol=0)
    for a, b in zip(pruned["reps"], full["reps"], strict=True):  # pruned paths still feed later blocks
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert pruned["input"] is None
    assert all(t is None for t in pruned["attn"][:k] + pruned["ffn"][:k])
    assert all(t is not None for t in pruned["attn"][k:])
    assert compress.surgery_of(model)[-1]["report"]["pruned_blocks"] == list(range(k))


def test_ensemble_scale_init_and_gradients():
    model, x = _host("vit_nano_patch4_28")
    report = compress.surgery_of(compress.apply(model, "path_ensemble", prune_direct=1))[-1]["report"]
    scales = [m for m in model.modules() if isinstance(m, EnsembleScale)]
    assert len(scales) == 2 * 3
    assert report["ensemble_scale_params"] == 6 * 32
    assert all(torch.equal(s.gamma, torch.ones(32)) for s in scales)
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    assert all(s.gamma.grad is not None and s.gamma.grad.abs().sum() > 0 for s in scales)


def test_ensemble_scale_weights_the_output_stream_only():
    model, x = _host("timm_vit_token")
    compress.apply(model, "path_ensemble")
    ref = _capture(model, x)
    model.blocks[2].es2.gamma.data.fill_(0.0)  # block 2's FFN term leaves the output stream
    out = _capture(model, x)
    torch.testing.assert_close(out["output"], ref["output"] - ref["ffn"][2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["reps"][-1], ref["reps"][-1], rtol=0, atol=0)


def test_self_distill_is_zero_when_student_equals_teacher():
    z = torch.randn(6, 10, requires_grad=True)
    assert self_distill_kl(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert self_distill_kl(torch.randn(6, 10), z, 2.0).item() > 0
    t = torch.randn(6, 10, requires_grad=True)
    self_distill_kl(torch.randn(6, 10, requires_grad=True), t).backward()
    assert t.grad is None  # the teacher is detached
    # the last block's representation is the output stream when nothing is scaled or pruned: a zero term
    model, x = _host("vit_nano_patch4_28")
    compress.apply(model, "path_ensemble", ensemble_scale=False, self_distill=1.0, distill_layers=[3])
    model.train()
    model(x)
    assert compress.aux_losses(model)["path_distill"].item() == pytest.approx(0.0, abs=1e-6)


def test_self_distill_trains_short_paths():
    model, x = _host("vit_nano_patch4_28")
    compress.apply(model, "path_ensemble", self_distill=0.5, distill_temperature=2.0)
    assert compress.surgery_of(model)[-1]["report"]["distill_layers"] == [0, 1, 2]
    model.train()
    model(x)
    terms = compress.aux_losses(model)
    assert set(terms) == {"path_distill"}
    assert terms["path_distill"].item() > 0
    terms["path_distill"].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # reaches the short paths
    assert path_distill_loss(model) == {}  # read once per forward
    model.eval()
    model(x)
    assert compress.aux_losses(model) == {}  # nothing stashed outside training


def test_ensemble_student_exits_start_after_the_pruned_blocks():
    model, x = _host("vit_nano_patch4_28")
    compress.apply(model, "path_ensemble", prune_direct=2, self_distill=1.0, distill_student="ensemble")
    assert compress.surgery_of(model)[-1]["report"]["distill_layers"] == [2]  # blocks 0, 1 add nothing yet
    model.train()
    model(x)
    assert compress.aux_losses(model)["path_distill"].item() > 0


def test_bad_input_errors():
    model, _ = _host("vit_nano_patch4_28")
    for k in (4, 5, -1, True, 1.5):
        with pytest.raises(ValueError, match="prune_direct"):
            compress.apply(model, "path_ensemble", prune_direct=k)
    with pytest.raises(ValueError, match="self_distill"):
        compress.apply(model, "path_ensemble", self_distill=-1.0)
    with pytest.raises(ValueError, match="distill_temperature"):
        compress.apply(model, "path_ensemble", distill_temperature=0)
    with pytest.raises(ValueError, match="distill_student"):
        compress.apply(model, "path_ensemble", distill_student="head")
    with pytest.raises(ValueError, match="distill_layers"):
        compress.apply(model, "path_ensemble", self_distill=1.0, distill_layers=[7])
    assert not is_path_ensemble(model)
    assert compress.surgery_of(model) == []
    compress.apply(model, "path_ensemble")
    with pytest.raises(ValueError, match="already wrapped"):
        compress.apply(model, "path_ensemble")


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1), num_heads=(1, 1))


def _post_norm_vit():
    post = timm.models.vision_transformer.ResPostBlock
    return timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", block_fn=post, **_VIT)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.Linear(4, 4), "no attribute 'blocks'"),
        (_swin, "not isotropic|blocks"),
        (_post_norm_vit, "pre-norm"),
    ],
)
def test_unsupported_hosts(make, match):
    with pytest.raises(ValueError, match=match):
        compress.apply(make(), "path_ensemble")


def test_checkpoint_round_trip_rebuilds_it(tmp_path):
    from vitlab.engine.checkpoint import save_weights
    from vitlab.engine.inference import load_trained

    model = vitlab.create_model("vit_nano_patch4_28").eval()
    compress.apply(model, "path_ensemble", prune_direct=2, self_distill=0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, EnsembleScale):
                m.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 1, 28, 28)
    meta = {"model": "vit_nano_patch4_28", "num_classes": 10, "in_chans": 1, "img_size": 28}
    path = save_weights(model, tmp_path / "pe.safetensors", {**meta, "surgery": compress.surgery_of(model)})
    loaded, _, _ = load_trained(path)
    assert is_path_ensemble(loaded)
    assert loaded.blocks.prune_direct == 2
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_path_contributions_equal_rerunning_without_the_term():
    model, x = _host("timm_vit_token")
    labels = torch.tensor([0, 1, 2])
    batches = [(x, labels), (x.flip(0), labels)]
    rows = path_contributions(model, batches)
    assert not is_path_ensemble(model)  # a plain host is wrapped for the call only
    assert len(rows) == 1 + 2 * 4
    assert rows[0]["path"] == "input"
    compress.apply(model, "path_ensemble", prune_direct=1)
    rows = {(r["layer"], r["path"]): r for r in path_contributions(model, batches)}
    assert not rows[(0, "attn")]["direct"]
    assert rows[(0, "attn")]["drop"] == 0
    assert rows[(1, "ffn")]["direct"]
    model.blocks[2].es1.gamma.data.zero_()  # remove block 2's attention term for real and rerun

    def top1(m):
        with torch.no_grad():
            return 100.0 * sum(int((m(b).argmax(-1) == y).sum()) for b, y in batches) / 6

    assert rows[(2, "attn")]["top1"] == pytest.approx(top1(model), abs=1e-3)


def test_feature_spectra_high_band_share():
    grid = (6, 6)
    flat = torch.ones(2, 1 + 36, 4)  # constant over the grid: all energy at DC
    assert _summary(_amplitude(flat, 1, grid))["high_frac"] == 0.0
    checker = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2 * 2.0 - 1.0  # the Nyquist corner only
    tokens = torch.cat([torch.zeros(2, 1, 4), checker.reshape(1, 36, 1).expand(2, 36, 4)], dim=1)
    assert _summary(_amplitude(tokens, 1, grid))["high_frac"] == pytest.approx(1.0)
    model, x = _host("vit_nano_patch4_28")
    rows = feature_spectra(model, [(x, None)])
    assert [r["stream"] for r in rows].count("representation") == 4
    assert rows[-1]["stream"] == "output"
    assert all(0 <= r["high_frac"] <= 1 for r in rows)
    json.dumps(rows)  # plain numbers: goes straight into a results table


@pytest.mark.slow  # one real optimizer step through the engine (~5 s quiet)
def test_train_with_compress_flag(tmp_path):
    from vitlab.engine import RunConfig, train
    from vitlab.engine.inference import load_trained

    cfg = RunConfig(out=str(tmp_path), name="pe", log_every=1, device="cpu")
    cfg.model.model = "vit_nano_patch4_28"
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 32, 16, 16
    cfg.optim.steps, cfg.optim.warmup_epochs = 1, 0.0
    cfg.compression.compress = "path_ensemble"
    cfg.compression.compress_args = '{"prune_direct": 2, "self_distill": 0.5}'
    run = train(cfg)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("path_distill", 0) > 0 for r in logged)
    model, meta, _ = load_trained(run)
    assert is_path_ensemble(model)
    assert meta["surgery"][-1]["kwargs"]["prune_direct"] == 2
    assert not torch.equal(model.blocks[5].es2.gamma, torch.ones_like(model.blocks[5].es2.gamma))  # trained
