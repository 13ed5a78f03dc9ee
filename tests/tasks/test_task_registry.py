"""The task-model contract, checked for every registered task on two backbones of different topology.

Each task declares its ``test_backbones`` (one isotropic, one hierarchical) and tiny ``test_kwargs``; backbones
are built from their own tiny ``test_kwargs``. Everything runs on the task's ``example_batch``. Video tasks
(``tasks.video.VideoTaskModel``) take clips ``(B, T, C, H, W)`` where image tasks take ``(B, C, H, W)``.
Forward passes go as the engine makes them, ``model(batch["image"], **model.forward_kwargs(batch))`` (cameras,
labels, ...), except the export and bad-input checks, which pass the image alone.
"""

import json

import pytest
import torch

import vitlab
from vitlab.errors import VitlabError
from vitlab.models import VARIANTS, get_variant
from vitlab.tasks import (
    TaskModel,
    UnknownTaskError,
    create_backbone,
    create_task_model,
    feature_dicts,
    get_task,
    list_tasks,
    register_task,
)
from vitlab.tasks.video import VideoTaskModel

CASES = [(name, backbone) for name in list_tasks() for backbone in get_task(name).test_backbones]
IDS = [f"{name}-{backbone}" for name, backbone in CASES]


def _build(name: str, backbone: str, **kw) -> TaskModel:
    # the backbone's own tiny configuration, at the task's image size
    tiny = get_variant(backbone).test_kwargs if backbone in VARIANTS else {}
    tiny = {k: v for k, v in tiny.items() if k != "img_size"}
    return create_task_model(name, backbone, backbone_kwargs=tiny, **{**get_task(name).test_kwargs, **kw})


def _batch(model: TaskModel) -> dict:
    return model.example_batch(batch_size=2, generator=torch.Generator().manual_seed(0))


def _input_shape(model: TaskModel, batch_size: int = 2) -> tuple[int, ...]:
    frames = (model.num_frames,) if isinstance(model, VideoTaskModel) else ()
    return (batch_size, *frames, model.in_chans, model.img_size, model.img_size)


def _equal(a, b) -> bool:
    # a batch value is a tensor or, for per-image targets, a list of tensors
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(torch.equal, a, b))
    return torch.equal(a, b)


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [t for v in values for t in _tensors(v)]


def test_registry_lists_tasks_and_public_names():
    assert "segmentation" in list_tasks()
    assert vitlab.list_tasks() == list_tasks()
    assert list_tasks("seg*") == ["segmentation"]
    assert list_tasks("nothing*") == []
    for name in list_tasks():
        spec = get_task(name)
        assert len(spec.test_backbones) == 2
        assert spec.exportable or spec.export_reason


@pytest.mark.parametrize("name", list_tasks())
def test_test_backbones_differ_in_topology(name):
    # one isotropic and one hierarchical backbone, so both necks are exercised; a task that takes only one
    # topology says why, refuses the other, and is tested on two families of its own
    spec = get_task(name)
    hierarchical = []
    for backbone in spec.test_backbones:
        model = _build(name, backbone)
        assert model.backbone_name == backbone
        tiny = get_variant(backbone).test_kwargs if backbone in VARIANTS else {}
        tiny = {k: v for k, v in tiny.items() if k != "img_size"}  # the task's size, as in _build
        net = create_backbone(backbone, in_chans=spec.in_chans, img_size=model.img_size, **tiny)
        hierarchical.append(len({d["reduction"] for d in feature_dicts(net)}) > 1)
    if spec.backbones != "any":
        assert hierarchical == [spec.backbones == "hierarchical"] * 2
        assert type(create_backbone(spec.test_backbones[0], in_chans=1, img_size=32)) is not type(net)
        other = "vit_micro_patch4_28" if spec.backbones == "hierarchical" else "tiny_vit_1m_28"
        with pytest.raises(ValueError, match="isotropic" if spec.backbones == "hierarchical" else "hierarchical"):
            _build(name, other)
    else:
        assert sorted(hierarchical) == [False, True]


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_attributes_and_example_batch_schema(name, backbone):
    model = _build(name, backbone)
    spec = get_task(name)
    assert model.task_name == name
    assert (model.primary_metric, model.higher_is_better) == (spec.metric, spec.higher_is_better)
    assert model.img_size == spec.test_kwargs.get("img_size", spec.img_size)
    assert (model.num_classes, model.in_chans) == (spec.num_classes, spec.in_chans)
    batch = _batch(model)
    assert set(model.batch_keys) | set(model.target_keys) <= set(batch)
    image = batch["image"]
    assert image.dtype == torch.float32
    assert image.shape == _input_shape(model)
    again = _batch(model)
    assert all(_equal(batch[k], again[k]) for k in batch)  # deterministic for a seeded generator


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_forward_backward_loss_and_postprocess(name, backbone):
    model = _build(name, backbone).train()
    batch = _batch(model)
    output = model(batch["image"], **model.forward_kwargs(batch))  # as the engine calls it
    assert all(torch.isfinite(t).all() for t in _tensors(output))
    losses = model.loss(output, batch)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    # predictions come back in the batch schema: one per target, with the target's shape and dtype
    with torch.no_grad():
        preds = model.postprocess(model.eval()(batch))  # forward also takes the batch dict
    for key in model.target_keys:
        if isinstance(batch[key], list):  # per-image targets (detection boxes): any count, the target's row shape
            assert isinstance(preds[key], list), key
            assert len(preds[key]) == len(batch[key]), key
            for p, t in zip(preds[key], batch[key], strict=True):
                assert p.shape[1:] == t.shape[1:], key
                assert p.dtype == t.dtype, key
        else:
            assert preds[key].shape == batch[key].shape, key
            assert preds[key].dtype == batch[key].dtype, key


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_overfits_example_batch(name, backbone):
    model = _build(name, backbone).train()
    batch = _batch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model.loss(model(batch["image"], **model.forward_kwargs(batch)), batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_metrics_summary(name, backbone):
    model = _build(name, backbone).eval()
    batch = _batch(model)
    metrics = model.build_metrics()
    assert all(m.device.type == "cpu" for m in metrics.values())
    with torch.no_grad():
        for _ in range(2):
            model.update_metrics(metrics, model(batch["image"], **model.forward_kwargs(batch)), batch)
    summary = model.summarize_metrics(metrics)
    assert model.primary_metric in summary
    assert isinstance(summary[model.primary_metric], float)
    json.dumps(summary, allow_nan=False)  # plain numbers, no tensors or NaN


def test_segmentation_metrics_values():
    model = _build("segmentation", "vit_micro_patch4_28")
    batch = _batch(model)
    target = batch["semantic"]
    # logits that put the target class first: a perfect prediction wherever the pixel is labelled
    perfect = torch.nn.functional.one_hot(target.clamp(max=model.num_classes - 1), model.num_classes)
    metrics = model.build_metrics()
    model.update_metrics(metrics, perfect.permute(0, 3, 1, 2).float(), batch)
    summary = model.summarize_metrics(metrics)
    assert summary["miou"] == pytest.approx(100.0)
    assert summary["pixel_acc"] == pytest.approx(100.0)
    present = set(target[target != 255].unique().tolist())
    assert len(summary["iou_per_class"]) == model.num_classes
    for k, iou in enumerate(summary["iou_per_class"]):
        assert (iou is None) == (k not in present)
    # no labelled pixel: loss 0, not NaN
    ignored = {**batch, "semantic": torch.full_like(target, 255)}
    assert model.loss(perfect.permute(0, 3, 1, 2).float(), ignored)["loss"].item() == 0.0


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_state_dict_round_trip(name, backbone):
    a, b = _build(name, backbone).eval(), _build(name, backbone).eval()
    b.load_state_dict(a.state_dict())
    batch = _batch(a)
    image, kw = batch["image"], a.forward_kwargs(batch)
    with torch.no_grad():
        ya = a(image, **kw)
        assert all(torch.equal(u, v) for u, v in zip(_tensors(ya), _tensors(a(image, **kw)), strict=True))
        assert all(torch.equal(u, v) for u, v in zip(_tensors(ya), _tensors(b(image, **kw)), strict=True))


@pytest.mark.export
@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_torch_export(name, backbone):
    if backbone in VARIANTS and not get_variant(backbone).exportable:
        pytest.skip(f"backbone {backbone} declares exportable=False: {get_variant(backbone).export_reason}")
    model = _build(name, backbone).eval()
    image = _batch(model)["image"]
    if not get_task(name).exportable:
        with pytest.raises(Exception):  # noqa: B017, PT011  (the declared reason, whatever torch raises)
            torch.export.export(model, (image,))
        return
    program = torch.export.export(model, (image,))
    with torch.no_grad():
        for u, v in zip(_tensors(program.module()(image)), _tensors(model(image)), strict=True):
            assert torch.allclose(u, v, atol=1e-5)


@pytest.mark.parametrize(("name", "backbone"), CASES, ids=IDS)
def test_bad_input_is_named(name, backbone):
    model = _build(name, backbone).eval()
    image = _batch(model)["image"]
    if isinstance(model, VideoTaskModel):
        _check_bad_clips(model, image)
        return
    with pytest.raises(ValueError, match=rf"image must be \(B, {model.in_chans}, H, W\)"):
        model(torch.randn(2, model.in_chans + 2, model.img_size, model.img_size))
    with pytest.raises(ValueError, match="image must be"):
        model(image[0])
    with pytest.raises(ValueError, match="image must be a normalised float"):
        model(image.long())
    with pytest.raises(ValueError, match="batch has no 'image'"):
        model({"pixels": image})


def _check_bad_clips(model: VideoTaskModel, clips: torch.Tensor) -> None:
    # the image tasks' checks on clips, plus what only clips can get wrong: length, frame size, broken frames
    B, T, C, H, W = clips.shape
    with pytest.raises(ValueError, match=rf"image must be \(B, T, {model.in_chans}, H, W\)"):
        model(torch.randn(B, T, C + 2, H, W))
    with pytest.raises(ValueError, match="image must be"):
        model(clips[0])
    with pytest.raises(ValueError, match="image must be"):
        model(clips[:, 0])  # a batch of single frames
    with pytest.raises(ValueError, match="image must be a normalised float"):
        model(clips.long())
    with pytest.raises(ValueError, match="batch has no 'image'"):
        model({"pixels": clips})
    with pytest.raises(ValueError, match=f"image must hold {T} frames"):
        model(torch.cat([clips, clips], 1))
    with pytest.raises(ValueError, match="image frames must be"):
        model(torch.randn(B, T, C, H + 4, W + 4))
    broken = clips.clone()
    broken[0, -1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(broken)


def test_bad_target_is_named():
    model = _build("segmentation", "vit_micro_patch4_28")
    batch = _batch(model)
    output = model(batch["image"])
    with pytest.raises(ValueError, match=r"batch\['semantic'\]"):
        model.loss(output, {**batch, "semantic": batch["semantic"][:, :4]})
    with pytest.raises(ValueError, match=r"batch\['semantic'\]"):
        model.loss(output, {**batch, "semantic": batch["semantic"].float()})


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UnknownTaskError, match="Did you mean: segmentation"):
        create_task_model("segmentaton")
    assert issubclass(UnknownTaskError, ValueError)
    assert issubclass(UnknownTaskError, VitlabError)
    with pytest.raises(vitlab.UnknownModelError, match="vit_micro_patch4_28"):
        create_task_model("segmentation", "vit_micro_patch4_29")


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"in_chans": -1}, {"img_size": "big"}])
def test_bad_constructor_arguments_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_task_model("segmentation", **bad)


def test_register_task_checks_the_spec():
    spec = get_task("segmentation")
    with pytest.raises(ValueError, match="registered twice"):
        register_task(spec)
    from dataclasses import replace

    with pytest.raises(ValueError, match="reports 'miou'"):
        register_task(replace(spec, name="segmentation_wrong_metric", metric="pixel_acc"))
    with pytest.raises(ValueError, match="export_reason"):
        register_task(replace(spec, name="segmentation_no_reason", exportable=False))
