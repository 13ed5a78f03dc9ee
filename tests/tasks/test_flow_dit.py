"""flow_dit: the flow-matching target and path, ODE sampling against a closed-form flow, guidance, bad input."""

import pytest
import torch
from timm.models.vision_transformer import Attention

from vitlab.engine.task_inference import sample_grid
from vitlab.tasks import create_task_model

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(**kw):
    return create_task_model("flow_dit", backbone_kwargs=TINY, img_size=16, **kw)


def _randomize_zero_inits(model: torch.nn.Module) -> None:
    # adaLN-Zero starts every block (and the output) at zero: give the zero-initialised parameters values
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_structure_and_zero_velocity_at_init():
    model = _model().eval()
    # the host's (timm's) attention and MLP now sit in adaLN-Zero blocks, addressable as model.blocks[i].attn
    assert len(model.blocks) == 2
    assert all(isinstance(b.attn, Attention) for b in model.blocks)
    assert len(model.trunk.backbone.blocks) == 0  # the blocks moved into the DiT, nothing is held twice
    x = torch.randn(3, 1, 16, 16)
    v = model.velocity(x, torch.rand(3), torch.tensor([0, 4, 9]))
    assert v.shape == x.shape
    assert not v.any()  # adaLN-Zero: the network starts at velocity 0


def test_loss_is_zero_for_the_true_velocity_of_a_point_mass():
    # data = one image a: x_t = (1 - t) a + t eps, so eps - a = (x_t - a) / t is known from x_t alone
    model = _model().train()
    a = torch.randn(1, 1, 16, 16).expand(8, -1, -1, -1).contiguous()
    model.velocity = lambda x, t, label=None: (x - a) / t.view(-1, 1, 1, 1)
    out = model(a, label=torch.arange(8))
    assert model.loss(out, {})["loss"].item() < 1e-8
    assert out["t"].min() > 0
    assert out["t"].max() < 1
    # the opposite convention (velocity towards the data) is far off
    model.velocity = lambda x, t, label=None: (a - x) / t.view(-1, 1, 1, 1)
    assert model.loss(model(a), {})["loss"].item() > 1.0


def _gaussian_flow(mu: float, s: float):
    """The exact velocity E[eps - x0 | x_t] of the path from N(mu, s^2) data (t = 0) to N(0, 1) noise (t = 1)."""

    def velocity(x, t, label=None):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    return velocity


@pytest.mark.parametrize(("solver", "steps"), [("euler", 200), ("heun", 30)])
def test_sampling_a_gaussian_flow_lands_on_the_data_distribution(solver, steps):
    model = _model().eval()
    mu, s = 1.5, 0.4
    model.velocity = _gaussian_flow(mu, s)
    x = model.sample(64, steps=steps, solver=solver, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) < 0.02
    # a single Euler step from t = 1 to 0 would not: it moves every sample onto the mean (std near 0)
    half = model.sample(64, steps=1, generator=torch.Generator().manual_seed(0))
    assert abs(half.std().item() - s) > 0.1


def test_sampling_is_deterministic_and_guidance_follows_its_formula():
    model = _model().eval()
    _randomize_zero_inits(model)
    labels = torch.tensor([0, 3, 7])
    a = model.sample(3, labels, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(5))
    b = model.sample(3, labels, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(5))
    c = model.sample(3, labels, steps=3, cfg=2.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # one Euler step from t = 1 to 0: x0 = eps - v, v = v_null + w (v_class - v_null)
    eps = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    ones = torch.ones(3)
    with torch.no_grad():
        v_class, v_null = model.velocity(eps, ones, labels), model.velocity(eps, ones, None)
    for w in (1.0, 3.0):
        got = model.sample(3, labels, steps=1, cfg=w, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, eps - (v_null + w * (v_class - v_null)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_class, v_null)
    assert model.training is False


def test_eval_loss_is_fixed_and_training_draws_are_not():
    model = _model()
    batch = model.example_batch(4)
    model.eval()
    first, second = model(batch), model(batch)
    assert torch.equal(first["velocity"], second["velocity"])
    assert torch.equal(first["target"], second["target"])
    torch.testing.assert_close(first["t"], torch.tensor([0.0625, 0.1875, 0.3125, 0.4375]))
    model.train()
    assert not torch.equal(model(batch)["target"], model(batch)["target"])


def test_label_dropout_only_while_training():
    model = _model(class_dropout=0.5).train()
    _randomize_zero_inits(model)
    seen = []
    model.velocity = lambda x, t, label=None: seen.append(label.clone()) or torch.zeros_like(x)
    torch.manual_seed(0)
    model(torch.randn(64, 1, 16, 16), label=torch.zeros(64, dtype=torch.long))
    dropped = (seen[-1] == 10).float().mean().item()
    assert 0.3 < dropped < 0.7
    assert set(seen[-1].tolist()) <= {0, 10}
    model.eval()
    model(torch.randn(64, 1, 16, 16), label=torch.zeros(64, dtype=torch.long))
    assert not seen[-1].any()


def test_sample_grid_has_a_row_per_class():
    model = _model().eval()
    picture = sample_grid(model, (0.5,), (0.5,), per_class=3, steps=1)
    assert picture.size == (3 * 17 + 1, 10 * 17 + 1)


def test_bad_input_is_named():
    model = _model().eval()
    image = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"label must hold class ids in \[0, 10\)"):
        model(image, label=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"label must hold class ids"):
        model.sample(2, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="label must be int64"):
        model(image, label=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="label must be int64"):
        model.sample(3, torch.tensor([0, 1]))
    for steps in (0, -2, 1.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            model.sample(2, steps=steps)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)
    with pytest.raises(ValueError, match="solver"):
        model.sample(2, solver="rk4")
    with pytest.raises(ValueError, match="cfg"):
        model.sample(2, torch.tensor([0, 1]), cfg=-1.0)
    with pytest.raises(ValueError, match="give labels"):
        model.sample(2, cfg=3.0)
    broken = image.clone()
    broken[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(broken)
    with pytest.raises(ValueError, match="16x16 px"):
        model(torch.randn(2, 1, 20, 20))
    with pytest.raises(ValueError, match="t_sampling"):
        _model(t_sampling="cosine")
    with pytest.raises(ValueError, match="class_dropout"):
        _model(class_dropout=1.0)
    with pytest.raises(ValueError, match="multiple of"):
        create_task_model("flow_dit", backbone_kwargs=TINY, img_size=18)
    with pytest.raises(ValueError, match="hierarchical"):
        create_task_model("flow_dit", "tiny_vit_1m_28", img_size=16)
