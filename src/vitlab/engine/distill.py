"""DeiT distillation: a frozen teacher supervises the student during ``vitlab train --teacher ...``.

"Training data-efficient image transformers & distillation through attention" (arXiv:2012.12877),
github.com/facebookresearch/deit (``losses.py``). A student with a distillation token (timm's
``VisionTransformerDistilled``) trains its class head on the labels and its distillation head on the
teacher; a student without one gets both terms on its single head (classic knowledge distillation).
At evaluation the model's normal output is used (for DeiT, the average of the two heads).

loss = (1 - alpha) * CE(cls_logits, labels) + alpha * KD(dist_logits, teacher_logits), with
KD hard = CE(dist_logits, argmax teacher) (the paper's choice, alpha = 0.5) and
KD soft = tau^2 * KL(softmax(teacher / tau) || softmax(dist / tau)), averaged over the batch.

Deviation: the official soft loss divides the summed KL by batch * classes (``outputs.numel()``); here
it is the per-sample mean (``batchmean``, Hinton et al.'s form), so alpha weighs the same in both modes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import match_channels, resize_batch
from ..errors import CheckpointError
from ..models import UnknownModelError, create_model, get_variant
from .config import DistillConfig, check_fields
from .objective import ObjectiveWrapper
from .technique import Technique

__all__ = ["DistillationObjective", "Distiller", "Teacher", "build_distiller", "distillation_loss", "load_teacher"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, tau: float = 1.0
) -> torch.Tensor:
    """The KD term: ``hard`` = CE to the teacher's argmax; ``soft`` = tau² · KL(teacher ‖ student) at ``tau``."""
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    if kind == "soft":
        log_p_student = F.log_softmax(student_logits / tau, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (tau * tau)
    raise ValueError(f"--distill must be 'hard' or 'soft', got {kind!r}")


class Teacher:
    """A frozen model plus what its input expects; calling it maps the student's batch to the teacher's input.

    Deliberately not an ``nn.Module``: it can never become a submodule of the student, so its weights are
    never in the student's state dict, optimizer or checkpoints.
    """

    def __init__(self, model: nn.Module, in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float]):
        self.model = model.eval().requires_grad_(False)
        self.in_chans, self.img_size = in_chans, img_size
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """Teacher logits for a student batch ``x`` normalised with ``mean``/``std`` (B, C, H, W)."""
        x = self._adapt(x, tuple(mean), tuple(std))
        out = self.model(x)
        return out.float()

    def _adapt(self, x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        same_pixels = x.shape[1] == self.in_chans and (mean, std) == (self.mean, self.std)
        if not same_pixels:
            # undo the student's normalisation, match channels (data.transforms rule), apply the teacher's
            C = x.shape[1]
            x = x * torch.tensor(std, device=x.device).view(1, C, 1, 1) + torch.tensor(mean, device=x.device).view(
                1, C, 1, 1
            )
            x = match_channels(x, self.in_chans)
            t_mean = torch.tensor(self.mean, device=x.device).view(1, self.in_chans, 1, 1)
            t_std = torch.tensor(self.std, device=x.device).view(1, self.in_chans, 1, 1)
            x = (x - t_mean) / t_std
        return resize_batch(x, self.img_size)


def load_teacher(
    spec: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> Teacher:
    """Build the frozen teacher named by ``--teacher``.

    ``spec`` is a vitlab run directory or checkpoint (rebuilt as trained), or a vitlab/timm model name. A name
    whose pretrained weights are declared loads them (its head must predict ``num_classes`` classes); a name
    without declared weights is built randomly initialised at the student's input, with a warning (smoke tests).
    ``in_chans``, ``img_size``, ``mean`` and ``std`` describe the student's input batches.
    """
    path = Path(spec)
    if path.exists():
        from .inference import load_trained

        model, meta, _ = load_trained(path, device)
        if meta["num_classes"] != num_classes:
            raise CheckpointError(
                f"--teacher {spec!r} predicts {meta['num_classes']} classes but the data has {num_classes}"
            )
        return Teacher(model, meta["in_chans"], meta["img_size"], meta["mean"], meta["std"])
    name = spec
    is_vitlab = _is_vitlab(name)
    if not is_vitlab and not timm.is_model(name):
        raise UnknownModelError(
            f"--teacher {spec!r} is neither an existing run directory / checkpoint nor a vitlab or timm model name"
        )
    cfg = timm.get_pretrained_cfg(name)
    has_weights = cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)
    build = create_model if is_vitlab else timm.create_model
    if not has_weights:
        warnings.warn(
            f"--teacher {name!r} has no pretrained weights; it is randomly initialised (useful only for smoke "
            "tests). Pass a vitlab run directory to distil from a trained teacher.",
            stacklevel=2,
        )
        # vitlab models take any img_size; a plain timm model keeps its own input size (the batch is resized)
        size = img_size if is_vitlab or cfg is None else cfg.input_size[-1]
        kwargs = {"img_size": img_size} if is_vitlab else {}
        model = build(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
        return Teacher(model.to(device), in_chans, size, mean, std)
    if cfg.num_classes != num_classes:
        raise CheckpointError(
            f"--teacher {name!r}: its pretrained weights predict {cfg.num_classes} classes but the data has "
            f"{num_classes}; fine-tune it first (vitlab train --model {name} ...) and pass that run directory"
        )
    try:
        model = build(name, pretrained=True)
    except Exception as e:  # no network, no cache, a broken file: say which teacher and what to do
        raise CheckpointError(
            f"--teacher {name!r}: its pretrained weights could not be loaded ({e}); "
            "pass a vitlab run directory or checkpoint instead"
        ) from e
    C, H, _W = cfg.input_size
    return Teacher(model.to(device), C, H, cfg.mean, cfg.std)


def _is_vitlab(name: str) -> bool:
    try:
        get_variant(name)
    except UnknownModelError:
        return False
    return True


class Distiller:
    """Adds the teacher's term to the base (label) loss; ``student_out`` is a tensor or DeiT's (cls, dist) pair."""

    def __init__(self, teacher: Teacher, kind: str, alpha: float, tau: float, mean, std):
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor, student_out, base_loss: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher(x, self.mean, self.std)
        dist_logits = student_out[1] if isinstance(student_out, tuple) else student_out
        kd = distillation_loss(dist_logits.float(), teacher_logits, self.kind, self.tau)
        return (1 - self.alpha) * base_loss + self.alpha * kd


def build_distiller(
    cfg: DistillConfig,
    student: nn.Module,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> Distiller | None:
    """The run's distiller, or None without ``--teacher``; switches a DeiT student to two-head training."""
    if not cfg.teacher:
        return None
    # building a teacher draws from the global RNG; fork it so the student's run is the same as without one
    with torch.random.fork_rng(devices=[]):
        teacher = load_teacher(cfg.teacher, num_classes, in_chans, img_size, mean, std, device)
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(True)
    return Distiller(teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau, mean, std)


class DistillationObjective(ObjectiveWrapper):
    """The wrapped objective's loss mixed with a distillation term: ``distill(x, output, base loss)``."""

    def __init__(self, base: Any, distill: Any) -> None:
        super().__init__(base)
        self.distill = distill

    def step(self, net: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        res = self.base.step(net, batch, step)
        res["loss"] = self.distill(batch["image"], res["output"], res["loss"])
        return res


def _install(setup: Any) -> None:
    distiller = build_distiller(
        setup.cfg.distillation,
        setup.model,
        len(setup.classes),
        setup.in_chans,
        setup.img_size,
        setup.train_loader.mean,
        setup.train_loader.std,
        setup.device,
    )
    setup.objective = DistillationObjective(setup.objective, distiller)


def _validate(cfg: Any) -> None:
    d = cfg.distillation
    checks = [
        ("distill", d.distill, d.distill in ("hard", "soft"), "hard or soft"),
        ("distill_alpha", d.distill_alpha, 0 <= d.distill_alpha <= 1, "in [0, 1]"),
        ("distill_tau", d.distill_tau, d.distill_tau > 0, "a number > 0"),
    ]
    check_fields(checks)


TECHNIQUE = Technique(
    flag="--teacher",
    what="DeiT distillation",
    is_on=lambda cfg: bool(cfg.distillation.teacher),
    validate=_validate,
    install=_install,
)
