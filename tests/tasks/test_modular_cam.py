"""modular_cam: zero-init motion module and control branch (= the base per frame), LoRA switching, the director,
the phase-correlation global motion, base checkpoints, and the errors on adapters that do not fit."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.engine.checkpoint import save_weights
from vitlab.layers.adapters import AdapterError, add_lora
from vitlab.models import create_model
from vitlab.tasks import create_task_model
from vitlab.tasks.generative.modular_cam_parts import DirectorError, Scene, direct, global_motion

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
FMNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _model(**kw):
    kw = {"img_size": 16, "num_frames": 3, "motion_layers": 1, "motion_heads": 2, "train": "all", **kw}
    return create_task_model("modular_cam", backbone_kwargs=TINY, **kw).eval()


def _randomize(module: torch.nn.Module, seed: int = 3) -> None:
    # zero-initialised parameters (adaLN-Zero, zero outputs, LoRA B) get values, so outputs can differ
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, model.num_frames, 1, 16, 16, generator=g)
    return x, torch.rand(2, generator=g), torch.tensor([1, 8])


def test_zero_init_motion_module_is_the_base_per_frame():
    model = _model()
    _randomize(model.base)
    x, t, y = _inputs(model)
    with torch.no_grad():
        v = model.velocity(x, t, y)
        per_frame = model.base.velocity(x.flatten(0, 1), t.repeat_interleave(3), y.repeat_interleave(3))
        assert per_frame.abs().mean() > 0.01  # a base that is not trivially zero
        torch.testing.assert_close(v, per_frame.unflatten(0, (2, 3)), rtol=0, atol=1e-6)
        # once trained (non-zero), the motion module mixes frames: frame 0 depends on frame 2
        _randomize(model.motion)
        x2 = x.clone()
        x2[:, 2] += 1.0
        assert not torch.allclose(model.velocity(x, t, y)[:, 0], model.velocity(x2, t, y)[:, 0], atol=1e-5)


def test_lora_switching_changes_the_output_only_when_lora_weights_are_nonzero():
    model = _model(motions=["pan_left", "zoom_in"])
    _randomize(model.base)
    with torch.no_grad():  # a trained motion module, LoRA B still zero
        for m in model.motion:
            m.proj_out.weight.normal_(0, 0.1)
    x, t, y = _inputs(model)
    with torch.no_grad():
        model.use_motion(None)
        plain = model.velocity(x, t, y)
        model.use_motion("pan_left")
        torch.testing.assert_close(model.velocity(x, t, y), plain, rtol=0, atol=0)  # B = 0: LoRA is a no-op
        for name, p in model.motion.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        pan = model.velocity(x, t, y)
        model.use_motion("zoom_in")
        zoom = model.velocity(x, t, y)
        model.use_motion(None)
        again = model.velocity(x, t, y)
    assert not torch.allclose(pan, plain, atol=1e-4)
    assert not torch.allclose(pan, zoom, atol=1e-4)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)  # switching off restores the motion module exactly
    assert model.lora_names() == ["pan_left", "zoom_in"]


def test_control_branch_is_zero_at_init_and_conditions_when_trained():
    model = _model(control=True)
    _randomize(model.base)
    x, t, y = _inputs(model)
    cond = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t, y, cond), model.velocity(x, t, y), rtol=0, atol=0)
        _randomize(model.control, seed=5)  # the zeroed hint embedding and output layers
        a, b = model.velocity(x, t, y, cond), model.velocity(x, t, y, cond + 1.0)
    assert not torch.allclose(a, b, atol=1e-5)
    # the copy starts from the base's weights but is a separate module
    assert model.control.blocks[0] is not model.base.blocks[0]


def test_trainable_parts():
    model = _model(motions=["pan_left", "zoom_in"], active_motion="zoom_in", control=True, train="lora")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names
    assert all("lora_" in n and ".zoom_in." in n for n in names)
    model = _model(motions=["pan_left"], control=True, train="motion")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names
    assert all(n.startswith("motion.") and "lora_" not in n for n in names)
    model = _model(control=True, train="control")
    assert all(n.startswith("control.") for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="active_motion"):
        _model(motions=["pan_left"], train="lora")
    with pytest.raises(ValueError, match="train must be one of"):
        _model(train="everything")


def test_adapters_that_do_not_fit_are_refused():
    model = _model(motions=["pan_left"])
    with pytest.raises(AdapterError, match="match no"):
        add_lora(model.motion, ["to_qkv"], name="tilt_up")
    with pytest.raises(AdapterError, match="already has"):
        add_lora(model.motion, ["to_q"], name="pan_left")
    with pytest.raises(AdapterError, match="not one of the LoRAs"):
        _model(motions=["pan_left"], active_motion="zoom_in")
    with pytest.raises(AdapterError, match="unknown camera motion LoRA"):
        model.sample(1, motion="zoom_in", steps=1)
    with pytest.raises(ValueError, match="control=True"):
        model.sample(1, cond=torch.zeros(1, 1, 16, 16), steps=1)
    with pytest.raises(ValueError, match="cond must be one frame per clip"):
        _model(control=True)(torch.zeros(2, 3, 1, 16, 16), cond=torch.zeros(2, 3, 1, 16, 16))


def test_director_parses_and_refuses():
    motions = ["zoom_in", "zoom_out", "pan_left", "pan_right", "tilt_up", "static"]
    assert direct("Zoom in on the bag, then pan left", FMNIST, motions) == [
        Scene(8, "bag", "zoom_in"),
        Scene(8, "bag", "pan_left"),
    ]
    scenes = direct("pan right over the sneakers; hold on the t-shirt and tilt up", FMNIST, motions)
    assert [(s.label, s.motion) for s in scenes] == [(7, "pan_right"), (0, "static"), (0, "tilt_up")]
    assert direct("zoom out", FMNIST, motions) == [Scene(None, None, "zoom_out")]
    with pytest.raises(DirectorError, match="unknown camera motion 'orbit_around'"):
        direct("orbit around the coat", FMNIST, motions)
    with pytest.raises(DirectorError, match="unknown camera motion 'tilt_down'"):
        direct("zoom in on the dress then tilt down", FMNIST, motions)
    with pytest.raises(DirectorError, match="names no camera motion"):
        direct("show the bag", FMNIST, motions)
    with pytest.raises(DirectorError, match="non-empty"):
        direct("  ", FMNIST, motions)


def _pattern(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # a textured 48 px world; frames see its middle 16 px
    return F.interpolate(torch.rand(1, 1, 24, 24, generator=g), size=(48, 48), mode="bicubic", align_corners=False)


def _warp(img, scale=1.0, dx=0.0):
    theta = torch.tensor([[[1 / scale, 0.0, dx], [0.0, 1 / scale, 0.0]]])
    grid = F.affine_grid(theta, (1, 1, 16, 16), align_corners=False)
    return F.grid_sample(img, grid / 3, align_corners=False)[0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_motion_signs_follow_the_camera(seed):
    img = _pattern(seed)
    # content moving left by ~1 px per frame = a camera panning right
    pan = torch.stack([_warp(img, dx=0.125 * k) for k in range(5)])
    m = global_motion(pan)
    assert m["pan_x"] > 2.0
    assert abs(m["pan_y"]) < 0.5
    assert abs(m["zoom"]) < 1.0
    assert global_motion(pan.flip(0))["pan_x"] < -2.0
    zoom_in = torch.stack([_warp(img, scale=math.exp(0.1 * k)) for k in range(5)])  # content grows
    m = global_motion(zoom_in)
    assert m["zoom"] > 1.0
    assert abs(m["pan_x"]) < 1.0
    assert global_motion(zoom_in.flip(0))["zoom"] < -1.0
    with pytest.raises(ValueError, match="clip must be gray frames"):
        global_motion(torch.zeros(1, 16, 16))


def test_sample_and_generate_shapes():
    model = _model(motions=["pan_left"], control=True)
    _randomize(model.base)
    g = torch.Generator().manual_seed(0)
    clips = model.sample(2, torch.tensor([0, 3]), "pan_left", torch.zeros(2, 1, 16, 16), steps=2, generator=g)
    assert clips.shape == (2, 3, 1, 16, 16)
    assert torch.isfinite(clips).all()
    assert model.active_motion is None  # sampling restores the active LoRA
    scenes, clips = model.generate("pan left on the bag, then hold", FMNIST, n=2, steps=1)
    assert [s.motion for s in scenes] == ["pan_left", "static"]
    assert [tuple(c.shape) for c in clips] == [(2, 3, 1, 16, 16)] * 2


def test_base_checkpoint_loads_frozen_and_wrong_checkpoints_are_named(tmp_path):
    base = create_task_model("flow_dit", backbone_kwargs=TINY, img_size=16)
    _randomize(base)
    meta = {"model": "vit_micro_patch4_28", "task": "flow_dit", "num_classes": 10, "in_chans": 1, "img_size": 16,
            "backbone_args": TINY, "task_args": {}}  # fmt: skip
    path = save_weights(base, tmp_path / "base.safetensors", meta)
    model = _model(base_checkpoint=str(path), train="motion")
    torch.testing.assert_close(model.base.final.proj.weight, base.final.proj.weight)
    assert not any(p.requires_grad for p in model.base.parameters())
    with pytest.raises(ValueError, match="does not exist"):
        _model(base_checkpoint=str(tmp_path / "none.safetensors"))
    classifier = create_model("vit_micro_patch4_28", num_classes=10, in_chans=1, img_size=16, **TINY)
    other = save_weights(classifier, tmp_path / "cls.safetensors",
                         {"model": "vit_micro_patch4_28", "num_classes": 10, "in_chans": 1, "img_size": 16,
                          "model_args": TINY})  # fmt: skip
    with pytest.raises(ValueError, match="must be a vitlab flow_dit checkpoint"):
        _model(base_checkpoint=str(other))
    with pytest.raises(ValueError, match="img_size"):
        create_task_model("modular_cam", backbone_kwargs=TINY, img_size=32, base_checkpoint=str(path))
