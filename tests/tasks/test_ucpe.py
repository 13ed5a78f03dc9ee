"""``ucpe_nvs`` (UCPE, paper 40): shapes per encoding, world-frame invariance of the relative encodings, bad input."""

import pytest
import torch

from vitlab.layers.camera import CameraError, axis_angle_to_matrix
from vitlab.tasks import create_task_model
from vitlab.tasks.multiview.ucpe import ENCODINGS, UCPENovelView, nvs_batch

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(encoding: str, backbone: str = "vit_micro_patch4_28", **kw) -> UCPENovelView:
    torch.manual_seed(0)
    return create_task_model(
        "ucpe_nvs", backbone, img_size=16, backbone_kwargs=TINY, encoding=encoding, compress=1, **kw
    ).eval()


def _batch(model: UCPENovelView, n: int = 2) -> dict:
    return model.example_batch(n, torch.Generator().manual_seed(3))


def _run(model: UCPENovelView, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["image"], **model.forward_kwargs(batch))


def _wake_branches(model: UCPENovelView) -> None:
    # the camera branches start at zero (UCPE's adapter): give them weights, or every encoding looks invariant
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "camera_attn" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3


def _move_world(batch: dict, R: torch.Tensor, t: torch.Tensor) -> dict:
    G = torch.eye(4)
    G[:3, :3], G[:3, 3] = R, t
    return {**batch, "cam_to_world": G @ batch["cam_to_world"]}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_shapes_and_loss_for_every_encoding(encoding):
    model = _model(encoding).train()
    batch = _batch(model, 3)
    out = model(batch)  # the batch dict carries the cameras
    assert out.shape == (3, 3, 16, 16)
    assert torch.equal(out, model(batch["image"], **model.forward_kwargs(batch)))
    loss = model.loss(out, batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    adapters = encoding in ("prope", "relray", "relray_absmap")
    assert any("camera_attn" in n for n, _ in model.named_parameters()) == adapters
    assert (model.plucker is not None) == (encoding == "plucker")


@pytest.mark.parametrize("encoding", ["prope", "relray"])
def test_zero_initialised_branch_leaves_the_backbone_unchanged(encoding):
    # at initialisation the adapter adds exactly zero: the relative-encoding models equal the "none" model
    plain, adapted = _model("none"), _model(encoding)
    state = {k.replace(".block.", "."): v for k, v in adapted.state_dict().items() if "camera_attn" not in k}
    plain.load_state_dict(state)
    batch = _batch(plain)
    torch.testing.assert_close(_run(adapted, batch), _run(plain, batch))


@pytest.mark.parametrize("encoding", ["relray", "prope"])
def test_relative_encodings_ignore_a_global_rigid_motion(encoding):
    model = _model(encoding)
    _wake_branches(model)
    batch = _batch(model)
    R = axis_angle_to_matrix(torch.tensor([0.4, -1.1, 0.7]))
    moved = _move_world(batch, R, torch.tensor([1.5, -2.0, 0.8]))
    out, out_moved = _run(model, batch), _run(model, moved)
    torch.testing.assert_close(out_moved, out, atol=2e-4, rtol=1e-4)
    # the branch does matter: another target camera changes the prediction
    other = {**batch, "cam_to_world": batch["cam_to_world"].flip(1)}
    assert (_run(model, other) - out).abs().max() > 1e-3


def test_absolute_encodings_see_the_world_frame():
    # Plücker coordinates and the Lat-Up map are absolute: a rotation of the world changes the output; the
    # Lat-Up map ignores a turn about the world's up axis (z) and translations
    R = axis_angle_to_matrix(torch.tensor([0.4, -1.1, 0.7]))
    plucker = _model("plucker")
    batch = _batch(plucker)
    assert (_run(plucker, _move_world(batch, R, torch.zeros(3))) - _run(plucker, batch)).abs().max() > 1e-3
    absmap = _model("relray_absmap")
    _wake_branches(absmap)
    out = _run(absmap, batch)
    assert (_run(absmap, _move_world(batch, R, torch.zeros(3))) - out).abs().max() > 1e-3
    yaw = axis_angle_to_matrix(torch.tensor([0.0, 0.0, 1.3]))
    torch.testing.assert_close(_run(absmap, _move_world(batch, yaw, torch.tensor([0.5, 1.0, -0.3]))), out,
                               atol=2e-4, rtol=1e-4)  # fmt: skip


def test_metrics_on_a_perfect_prediction():
    model = _model("relray")
    batch = _batch(model)
    metrics = model.build_metrics()
    model.update_metrics(metrics, batch["target"] + 0.01, batch)
    summary = model.summarize_metrics(metrics)
    # an error of 0.01 in normalised space is 0.0025 in [0, 1] RGB (before clamping): PSNR <= 20 log10(400)
    assert 45 < summary["psnr"] <= 20 * torch.log10(torch.tensor(400.0)).item() + 1e-3
    assert summary["ssim"] > 0.99


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="encoding must be one of"):
        _model("rays")
    with pytest.raises(ValueError, match="in_chans must be 3"):
        create_task_model("ucpe_nvs", "vit_micro_patch4_28", in_chans=1, img_size=16, backbone_kwargs=TINY)
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        create_task_model("ucpe_nvs", "vir_nano_patch4_28", img_size=16, backbone_kwargs=TINY)
    model = _model("relray")
    batch = _batch(model)
    with pytest.raises(ValueError, match="needs the cameras"):
        model(batch["image"])
    three = {**batch, "K": torch.cat([batch["K"], batch["K"][:, :1]], 1)}
    with pytest.raises(ValueError, match="2 views"):
        _run(model, three)
    with pytest.raises(CameraError, match="disagree"):  # distortion of 3 views, K and poses of 2
        _run(model, {**batch, "distortion": torch.zeros(2, 3, 5)})
    singular = batch["K"].clone()
    singular[0, 1, 0, 0] = 0.0
    with pytest.raises(CameraError, match="singular"):
        _run(model, {**batch, "K": singular})
    reflected = batch["cam_to_world"].clone()
    reflected[1, 0, :3, 0] *= -1
    with pytest.raises(CameraError, match="not a rotation"):
        _run(model, {**batch, "cam_to_world": reflected})
    out = _run(model, batch)
    with pytest.raises(ValueError, match=r"batch\['target'\]"):
        model.loss(out, {**batch, "target": batch["target"][:, :1]})
    with pytest.raises(ValueError, match=r"\(B, 2, 3, H, W\)"):
        nvs_batch({"views": torch.zeros(2, 3, 3, 16, 16, dtype=torch.uint8)})
