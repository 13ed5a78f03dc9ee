"""DeiT distillation: the hard/soft losses by hand, the teacher's input mapping, and a tiny distilled run."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.engine import RunConfig, train
from vitlab.engine.distill import Distiller, Teacher, distillation_loss, load_teacher
from vitlab.errors import CheckpointError

STUDENT = "deit_tiny_distilled_patch4_28"
S = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
T = [[0.2, 1.5, -0.7], [2.5, 0.0, 0.4]]


def _softmax(row: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_hard_distillation_is_ce_to_teacher_argmax():
    # teacher argmax: class 1 for sample 0, class 0 for sample 1
    expected = -(math.log(_softmax(S[0])[1]) + math.log(_softmax(S[1])[0])) / 2
    got = distillation_loss(torch.tensor(S), torch.tensor(T), "hard")
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_is_tau2_kl_teacher_student(tau):
    kl = 0.0
    for s, t in zip(S, T, strict=True):
        p_s, p_t = _softmax(s, tau), _softmax(t, tau)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for ps, pt in zip(p_s, p_t, strict=True))
    expected = kl / len(S) * tau * tau
    got = distillation_loss(torch.tensor(S), torch.tensor(T), "soft", tau=tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_distiller_mixes_label_and_teacher_terms_on_the_distillation_head():
    teacher = Teacher(torch.nn.Flatten(), in_chans=3, img_size=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    x = torch.tensor(T).view(2, 3, 1, 1)  # the flatten "teacher" returns T as its logits
    cls_logits, dist_logits, base = torch.randn(2, 3), torch.tensor(S), torch.tensor(0.7)
    d = Distiller(teacher, "soft", alpha=0.25, tau=2.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    got = d(x, (cls_logits, dist_logits), base)
    kd = distillation_loss(torch.tensor(S), torch.tensor(T), "soft", tau=2.0)
    assert got.item() == pytest.approx(0.75 * 0.7 + 0.25 * kd.item(), rel=1e-6)
    # a student with one head gets the teacher's term on that head
    assert d(x, dist_logits, base).item() == pytest.approx(got.item(), rel=1e-6)


def test_teacher_input_is_renormalised_channel_matched_and_resized():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    pixels = torch.rand(2, 1, 28, 28)
    s_mean, s_std, t_mean, t_std = (0.3,), (0.4,), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    teacher = Teacher(Probe(), in_chans=3, img_size=32, mean=t_mean, std=t_std)
    teacher((pixels - 0.3) / 0.4, s_mean, s_std)
    rgb = pixels.expand(2, 3, 28, 28)
    want = (rgb - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    want = torch.nn.functional.interpolate(want, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["x"], want)


def test_named_teacher_whose_weights_predict_other_classes_is_refused():
    with pytest.raises(CheckpointError, match="1000 classes"):
        load_teacher("vit_tiny_patch16_224", 10, 1, 28, (0.5,), (0.5,), torch.device("cpu"))
    with pytest.raises(vitlab.UnknownModelError, match="neither"):
        load_teacher("no_such_teacher_xyz", 10, 1, 28, (0.5,), (0.5,), torch.device("cpu"))


def _cfg(tmp_path: Path, name: str, model: str, **distill) -> RunConfig:
    cfg = RunConfig(out=str(tmp_path), name=name, log_every=1, device="cpu")
    cfg.model.model = model
    cfg.data.dataset, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "synthetic", 64, 32, 16
    cfg.optim.epochs, cfg.optim.warmup_epochs = 2, 0.5
    for k, v in distill.items():
        setattr(cfg.distillation, k, v)
    return cfg


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = _cfg(tmp, "teacher", "vit_nano_patch4_28")
    cfg.optim.epochs = 1
    return train(cfg)


def _student_cfg(tmp_path: Path, name: str, **distill) -> RunConfig:
    cfg = _cfg(tmp_path, name, STUDENT, **distill)
    cfg.model.img_size = 16  # 4x4 patches (a quarter of the compute); the 28 px teacher gets the batch resized
    return cfg


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "lr" in r}


def test_distilled_run_trains_with_a_frozen_teacher_that_is_not_saved(tmp_path, teacher_run, monkeypatch):
    train_mod = importlib.import_module("vitlab.engine.distill")  # where the technique builds it
    built = {}
    real_build = train_mod.build_distiller

    def spy(*args, **kwargs):
        built["d"] = real_build(*args, **kwargs)
        return built["d"]

    monkeypatch.setattr(train_mod, "build_distiller", spy)
    run = train(_student_cfg(tmp_path, "student", teacher=str(teacher_run), distill="hard"))
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["test_top1"] <= 100
    assert all(math.isfinite(v) for v in _losses(run).values())

    teacher = built["d"].teacher.model
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    before = load_file(str(teacher_run / "checkpoints" / "best.safetensors"))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # the teacher did not move

    student_keys = set(vitlab.create_model(STUDENT).state_dict())
    for stem in ("best", "last"):
        assert set(load_file(str(run / "checkpoints" / f"{stem}.safetensors"))) == student_keys
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    n_student = len(list(vitlab.create_model(STUDENT).parameters()))
    assert len(state["optimizer"]["state"]) == n_student


def test_resume_continues_exactly_with_soft_distillation(tmp_path, teacher_run):
    kw = {"teacher": str(teacher_run), "distill": "soft", "distill_tau": 2.0}
    full_cfg = _student_cfg(tmp_path, "full", **kw)
    full_cfg.optim.mixup = 0.2  # mixup draws from numpy's RNG; the teacher sees the mixed batch
    full = train(full_cfg)
    cut_cfg = _student_cfg(tmp_path, "cut", **kw)
    cut_cfg.optim.mixup = 0.2
    cut_cfg.stop_after_steps = 5  # 4 batches per epoch: stops inside epoch 2
    cut = train(cut_cfg)
    train(resume=cut)
    a, b = _losses(full), _losses(cut)
    assert len(a) == 8
    assert a.keys() == b.keys()
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_distillation_flags_are_validated(tmp_path):
    with pytest.raises(ValueError, match="--distill "):
        train(_cfg(tmp_path, "bad", STUDENT, teacher="x", distill="medium"))
    with pytest.raises(ValueError, match="--distill-alpha"):
        train(_cfg(tmp_path, "bad", STUDENT, teacher="x", distill_alpha=1.5))
