"""ResFormer's multi-resolution training step (arXiv:2212.00776, Sec. 4.1, github.com/ruitian12/resformer).

Every training image is replicated at several resolutions; all replicas go through the same model in the same
step, and the loss is the classification loss of every resolution plus a *scale-consistency* loss: the class
feature (the classifier's input) at resolution ``i + 1`` regresses, with a smooth-L1 loss, onto the detached and
whitened (LayerNorm without affine) class feature at the next-larger resolution ``i`` (Eq. 2). The sum is divided
by the number of resolutions. ``vitlab train --resolutions 224,160,128 --scale-consistency 1.0`` turns it on;
the defaults follow the official recipe (smooth-L1 on the class token, weight 1.0).

``ResolutionCurriculum`` is UniViTAR's resolution curriculum (arXiv:2504.01792, github.com/MM-MVR/UniViTAR):
``vitlab train --model univitar_nano_patch4_28 --native-after 0.5`` trains at the fixed size for the first half
of the steps and on packed batches of images at their own sizes and aspect ratios after.

Deviation: the official data pipeline crops and augments each replica separately (``RandomResizedCrop`` per
resolution); here the replicas are resized (bicubic, antialiased) from the one augmented batch the loader gives,
so they differ in scale only. Our data sets store one size per image, so the native phase of the curriculum
draws a random size and aspect ratio per image (``varied_resolution_images``) instead of reading the originals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MultiResConfig
from .objective import ObjectiveWrapper
from .technique import Technique

__all__ = [
    "MultiResolutionLoss",
    "ResolutionCurriculum",
    "build_multires",
    "parse_resolutions",
    "resize_batch",
    "scale_consistency_loss",
    "varied_resolution_images",
]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parse_resolutions(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"224,160,128"`` (or a sequence of ints) -> ``(224, 160, 128)``, largest first; ``""``/None -> ``()``.

    Raises ValueError naming ``--resolutions`` for anything but distinct integers >= 8.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        sizes = [int(v) for v in items]
    except (TypeError, ValueError):
        sizes = []
    bad = not sizes or any(s < 8 or str(s) != str(v).strip() for s, v in zip(sizes, items, strict=False))
    if bad or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"--resolutions must be distinct integers >= 8 separated by commas (e.g. '224,160,128'), got {value!r}"
        )
    return tuple(sorted(sizes, reverse=True))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` images to ``size x size`` (bicubic, antialiased when shrinking); same size: as is."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def scale_consistency_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 from ``student`` features to the detached, whitened ``teacher`` features (ResFormer Eq. 2)."""
    target = F.layer_norm(teacher.detach(), teacher.shape[-1:], eps=1e-6)
    return F.smooth_l1_loss(student, target)


class MultiResolutionLoss:
    """One training step's loss over replicas of a batch at several resolutions.

    ``loss_fn(net, x, target, step) -> (logits at the largest resolution, loss)``. The class features are read as the
    input of ``classifier`` (``model.get_classifier()``) through a forward pre-hook, so this works for any model
    with a linear head, also under DDP (``net`` is the wrapped model, ``classifier`` a module inside it).

    Args:
        resolutions: sizes, largest first (``parse_resolutions``).
        criterion: ``criterion(logits, target)``, the per-resolution classification loss.
        consistency: weight of the scale-consistency loss (0: multi-resolution training without it, Table 7).
    """

    def __init__(
        self, resolutions: Sequence[int], classifier: nn.Module, criterion: Criterion, consistency: float = 1.0
    ) -> None:
        if len(resolutions) < 1:
            raise ValueError("resolutions must name at least one size")
        if consistency < 0:
            raise ValueError(f"--scale-consistency must be >= 0, got {consistency}")
        self.resolutions = tuple(resolutions)
        self.classifier = classifier
        self.criterion = criterion
        self.consistency = consistency
        self.last: dict[str, torch.Tensor] = {}  # per-resolution losses of the last step (detached), for logging

    def __call__(
        self, net: nn.Module, x: torch.Tensor, target: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats: list[torch.Tensor] = []
        handle = self.classifier.register_forward_pre_hook(lambda _m, args: feats.append(args[0]))
        try:
            total, first_logits, teacher = x.new_zeros(()), None, None
            for size in self.resolutions:
                out = net(resize_batch(x, size))
                logits = out[0] if isinstance(out, tuple) else out
                loss = self.criterion(logits, target)
                self.last[f"loss_{size}"] = loss.detach()
                if teacher is not None and self.consistency > 0:
                    kd = scale_consistency_loss(feats[-1], teacher)
                    self.last[f"consistency_{size}"] = kd.detach()
                    loss = loss + self.consistency * kd
                teacher = feats[-1]
                total = total + loss
                first_logits = logits if first_logits is None else first_logits
        finally:
            handle.remove()
        return first_logits, total / len(self.resolutions)


def build_multires(
    optim: MultiResConfig,
    model: nn.Module,
    criterion: Criterion | None = None,
    total_steps: int = 1,
    seed: int = 0,
) -> MultiResolutionLoss | ResolutionCurriculum | None:
    """The training-step loss of ``--resolutions`` or ``--native-after`` (None when neither is set).

    ``criterion(logits, target)``: the classification loss (default: cross-entropy).
    """
    criterion = criterion or F.cross_entropy
    if optim.native_after is not None:
        if optim.resolutions:
            raise ValueError("--native-after (resolution curriculum) cannot be combined with --resolutions")
        return ResolutionCurriculum(model, criterion, round(optim.native_after * total_steps), seed)
    sizes = parse_resolutions(optim.resolutions)
    if not sizes:
        return None
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        raise ValueError("--resolutions needs a model with a linear classifier (get_classifier()) and num_classes > 0")
    return MultiResolutionLoss(sizes, classifier, criterion, optim.scale_consistency)


def varied_resolution_images(
    x: torch.Tensor, patch_size: int, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.5)
) -> list[torch.Tensor]:
    """Resize each ``(C, H, W)`` image of a batch to its own size and aspect ratio (multiples of ``patch_size``).

    The side scale is uniform in ``scale`` and the aspect ratio log-uniform in [1/2, 2]: a stand-in for data at
    native resolution when the data set stores one size (Fashion-MNIST).
    """
    B, _, H, W = x.shape
    u = torch.rand(B, 2, generator=generator)
    side = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp((u[:, 1] * 2 - 1) * math.log(2.0))  # width / height
    out = []
    for i in range(B):
        h = max(patch_size, round(float(H * side[i] / aspect[i].sqrt()) / patch_size) * patch_size)
        w = max(patch_size, round(float(W * side[i] * aspect[i].sqrt()) / patch_size) * patch_size)
        img = F.interpolate(x[i : i + 1], size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        out.append(img[0])
    return out


class ResolutionCurriculum:
    """UniViTAR's resolution curriculum (Sec. 3): fixed-size batches first, native-resolution packed batches after.

    Until ``switch_step`` the step is the ordinary one (``net(x)``); from then on every image gets its own size and
    aspect ratio (``varied_resolution_images``) and the batch runs through ``model.forward_packed`` as one packed
    sequence with a block-diagonal mask. The sizes depend only on (seed, step), so a resumed run draws the same.
    Single-process only: the packed path bypasses a DDP wrapper.
    """

    def __init__(self, model: nn.Module, criterion: Criterion, switch_step: int, seed: int = 0) -> None:
        if not hasattr(model, "forward_packed"):
            raise ValueError(f"--native-after needs a model with forward_packed (UniViTAR), not {type(model).__name__}")
        if switch_step < 0:
            raise ValueError(f"--native-after must be >= 0, got a switch at step {switch_step}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("--native-after runs in a single process (the packed path bypasses DDP)")
        self.model = model
        self.criterion = criterion
        self.switch_step = switch_step
        self.seed = seed
        self.patch_size = model.patch_embed.patch_size[0]

    def __call__(
        self, net: nn.Module, x: torch.Tensor, target: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if step < self.switch_step:
            logits = net(x)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            logits = self.model.forward_packed(varied_resolution_images(x, self.patch_size, g))
        return logits, self.criterion(logits, target)


class MultiResolutionObjective(ObjectiveWrapper):
    """The wrapped objective's classification loss over several resolutions, or the resolution curriculum."""

    def __init__(self, base, loss_fn: MultiResolutionLoss | ResolutionCurriculum) -> None:
        super().__init__(base)
        self.loss_fn = loss_fn

    def step(self, net: nn.Module, batch: dict, step: int) -> dict:
        out, loss = self.loss_fn(net, batch["image"], batch.get("target", batch["label"]), step)
        return {"loss": loss, "output": out, **self.base.logs(out, batch)}


def _install(setup) -> None:
    loss_fn = build_multires(
        setup.cfg.multires, setup.model, setup.objective.criterion, setup.total_steps, setup.cfg.seed
    )
    setup.objective = MultiResolutionObjective(setup.objective, loss_fn)


def _validate(cfg) -> None:
    parse_resolutions(cfg.multires.resolutions)  # a clear error naming --resolutions
    after = cfg.multires.native_after
    if after is not None and not 0 <= after <= 1:
        raise ValueError(f"--native-after must be a fraction of training in [0, 1], got {after!r}")


TECHNIQUE = Technique(
    flag="--resolutions",
    what="multi-resolution training",
    is_on=lambda cfg: bool(cfg.multires.resolutions),
    excludes=("--teacher", "--native-after"),
    validate=_validate,
    install=_install,
)
CURRICULUM = Technique(
    flag="--native-after",
    what="resolution curriculum",
    is_on=lambda cfg: cfg.multires.native_after is not None,
    install=_install,
)
