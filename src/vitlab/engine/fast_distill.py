"""TinyViT fast distillation: store a teacher's sparse top-k once, then train students without the teacher.

"TinyViT: Fast Pretraining Distillation for Small Vision Transformers" (arXiv:2207.10666, Sec. 3.1),
github.com/microsoft/Cream/tree/main/TinyViT (``save_logits.py``, ``main.py``). ``vitlab distill save-logits``
(:func:`save_logits`) runs the teacher over every training image, epoch by epoch, and stores per image the
augmentation seed and the teacher's top-k probabilities (``logit_store.py``). ``vitlab train --distill-from DIR``
(:func:`build_stored_distillation`) re-creates each image's augmentation from its stored seed, bit for bit, and
trains the student against the stored predictions; the teacher never runs again.

Augmentation is per image: image i of epoch e is ``random_crop_flip`` (the loader's augmentation) with a generator
seeded from its stored seed, so the student may use any batch size and order. Mixup/cutmix (applied by the train
loop, not the loader) are seeded from the first stored seed of each batch; with them the student must batch as the
save job did (same ``--seed``, ``--batch-size``; checked), as in the official code.

Loss: the stored distribution q puts the top-k probabilities on their classes and spreads the remaining mass
uniformly over the other classes (the paper's label-smoothing-like recovery). ``--distill soft``:
tau² · KL(q ‖ softmax(student / tau)), the same gradient as the paper's soft cross-entropy and the same value
as the online soft loss (``distill.py``) when k = num_classes; ``--distill hard``: CE to the teacher's top-1.
loss = (1 - alpha) · label loss + alpha · that term, as with an online teacher.
Deviations: the official code uses random (not derived) seeds and trains on the teacher term alone (alpha = 1 here);
the temperature is applied when saving (``--distill-tau``, recorded and checked), not when training.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup

from ..data import (
    BatchLoader,
    TensorImageDataset,
    match_channels,
    normalize,
    random_crop_flip,
    resize_batch,
)
from .config import RunConfig
from .distill import Teacher, load_teacher
from .distributed import DistEnv, shard_batch
from .logit_store import EpochLogits, LogitStore, LogitStoreError, StoreManifest
from .setup import build_datasets, build_loader, model_img_size, resolve_device
from .technique import Technique

__all__ = [
    "StoredDistillation",
    "augment_from_seeds",
    "build_stored_distillation",
    "epoch_seeds",
    "save_logits",
    "sparse_to_dense",
    "stored_distillation_loss",
]

_MASK63 = (1 << 63) - 1


def epoch_seeds(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The per-image augmentation seeds of ``epoch`` (int32 (N,), as the official format), from ``(seed, epoch)``."""
    folded = ((seed * 1_000_003 + epoch) * 1_000_003 + 0x5EED) & _MASK63
    generator = torch.Generator().manual_seed(folded)
    return torch.randint(0, 2**31 - 1, (num_samples,), generator=generator, dtype=torch.int32)


def augment_from_seeds(images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The loader's crop/flip applied to each image (B, C, H, W) of a batch alone, from its own seed (B,)."""
    if images.ndim != 4 or seeds.shape != (images.shape[0],):
        raise ValueError(f"expected images (B, C, H, W) and seeds (B,), got {tuple(images.shape)} and {seeds.shape}")
    # NOTE: one generator per image makes the result independent of batching (~50 us/image on CPU)
    gens = (torch.Generator().manual_seed(s) for s in seeds.tolist())
    return torch.cat([random_crop_flip(img[None], g) for img, g in zip(images, gens, strict=True)])


def _prepare(images: torch.Tensor, seeds: torch.Tensor, loader: BatchLoader) -> torch.Tensor:
    """What ``loader`` yields for these raw uint8 images, with each image's augmentation drawn from its seed."""
    if loader.augment:
        images = augment_from_seeds(images, seeds)
    x = normalize(match_channels(images, loader.in_chans), loader.mean, loader.std)
    return resize_batch(x, loader.img_size)


def _fetch(loader: BatchLoader, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw uint8 images and int64 targets of the samples ``idx`` (in that order)."""
    ds = loader.dataset
    if isinstance(ds, TensorImageDataset):
        return ds.images[idx], ds.targets[idx]
    items = [ds[i] for i in idx.tolist()]
    return torch.stack([im for im, _ in items]), torch.tensor([t for _, t in items], dtype=torch.long)


def _seeded_mix(
    mixup: Mixup, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup (it draws from numpy's global RNG) seeded from the batch's first seed; the RNG is restored."""
    state = np.random.get_state()
    np.random.seed(int(seeds[0]))
    try:
        return mixup(x, y)
    finally:
        np.random.set_state(state)


def sparse_to_dense(probs: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float32 (B, num_classes) distribution: ``probs`` (B, k) on ``classes`` (B, k), the rest spread evenly."""
    if probs.shape != classes.shape or probs.ndim != 2:
        raise ValueError(f"probs and classes must both be (B, k), got {tuple(probs.shape)} and {tuple(classes.shape)}")
    B, k = probs.shape
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk must be in 1..num_classes ({num_classes}), got {k}")
    probs = probs.float()
    # fp16 rounding can make the top-k sum exceed 1: then nothing is left for the other classes
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
    return rest.expand(B, num_classes).scatter(-1, classes.long(), probs)


def stored_distillation_loss(
    student_logits: torch.Tensor,
    probs: torch.Tensor,
    classes: torch.Tensor,
    kind: str,
    tau: float = 1.0,
) -> torch.Tensor:
    """The teacher term from stored top-k: ``soft`` = tau² · KL(q ‖ softmax(s / tau)), ``hard`` = CE to top-1."""
    if kind == "hard":
        return F.cross_entropy(student_logits, classes[:, 0].long())
    if kind == "soft":
        q = sparse_to_dense(probs, classes, student_logits.shape[-1])
        log_p = F.log_softmax(student_logits / tau, dim=-1)
        return F.kl_div(log_p, q, reduction="batchmean") * (tau * tau)
    raise ValueError(f"--distill must be 'hard' or 'soft', got {kind!r}")


def _fingerprint(loader: BatchLoader) -> str:
    """A hash of the training set's content, so a store is never read for another data set of the same size."""
    ds, h = loader.dataset, hashlib.sha256()
    if isinstance(ds, TensorImageDataset):
        h.update(ds.images.contiguous().numpy().tobytes())
        h.update(ds.targets.contiguous().numpy().tobytes())
    else:
        for path, target in ds.samples:
            h.update(f"{Path(path).relative_to(ds.root)}\t{target}\n".encode())
    return h.hexdigest()[:32]


def _settings(cfg: RunConfig, loader: BatchLoader) -> dict[str, Any]:
    """What the teacher's inputs depended on; a student reading the store must agree on every entry."""
    mixing = cfg.optim.mixup > 0 or cfg.optim.cutmix > 0
    settings = {
        "data_fingerprint": _fingerprint(loader),
        "img_size": loader.img_size,
        "in_chans": loader.in_chans,
        "mean": loader.mean,
        "std": loader.std,
        "augment": loader.augment,
        "mixup": cfg.optim.mixup,
        "cutmix": cfg.optim.cutmix,
        # mixing pairs images inside a batch, so then the batches themselves must be the same
        "batches": {"seed": cfg.seed, "batch_size": loader.batch_size, "drop_last": loader.drop_last}
        if mixing
        else None,
    }
    return json.loads(json.dumps(settings))  # tuples -> lists, as read back from the manifest


def _build_mixup(cfg: RunConfig, num_classes: int) -> Mixup | None:
    # the same Mixup train.py builds
    o = cfg.optim
    if o.mixup <= 0 and o.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, label_smoothing=o.label_smoothing, num_classes=num_classes)


def _epoch_batches(loader: BatchLoader, epoch: int, mixing: bool) -> Iterator[tuple[torch.Tensor, bool]]:
    """Index batches covering every image once, and whether to mix each one."""
    n, B = len(loader.dataset), loader.batch_size
    if not mixing:  # per-image seeds: any order will do
        yield from ((idx, False) for idx in torch.arange(n).split(B))
        return
    order = loader.epoch_order(epoch)
    used = len(loader) * B if loader.drop_last else n
    yield from ((idx, True) for idx in order[:used].split(B))  # the student's batches
    if used < n:  # images drop_last leaves out (never trained on): stored unmixed
        yield order[used:], False


@torch.no_grad()
def _teacher_epoch(
    teacher: Teacher,
    loader: BatchLoader,
    mixup: Mixup | None,
    epoch: int,
    topk: int,
    tau: float,
    device: torch.device,
    amp: bool,
) -> EpochLogits:
    n = len(loader.dataset)
    seeds = epoch_seeds(loader.seed, epoch, n)
    probs, classes = torch.empty(n, topk, dtype=torch.float16), torch.empty(n, topk, dtype=torch.long)
    for idx, mixed in _epoch_batches(loader, epoch, mixup is not None):
        images, y = _fetch(loader, idx)
        x = _prepare(images, seeds[idx], loader)
        if mixed:
            x, _ = _seeded_mix(mixup, x, y, seeds[idx])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = teacher(x.to(device), loader.mean, loader.std)
        values, indices = F.softmax(logits.float() / tau, dim=-1).topk(topk, dim=-1)  # sorted: top-1 first
        probs[idx], classes[idx] = values.to(torch.float16).cpu(), indices.cpu()
    return EpochLogits(seeds, probs, classes)


def save_logits(cfg: RunConfig, out: str | Path, topk: int | None = None) -> Path:
    """Store ``cfg.distillation.teacher``'s top-k for ``ceil(cfg.optim.epochs)`` epochs of ``cfg``'s training data.

    ``cfg`` is the student's run config (data, ``--seed``, ``--augment``, mixing, input size): the teacher sees
    the inputs that ``vitlab train --distill-from out`` with the same flags re-creates. ``topk`` defaults to
    min(10, num_classes). Epochs already in ``out`` are kept, so a stopped job continues. Returns ``out``.
    """
    cfg.validate()
    d = cfg.distillation
    if not d.teacher:
        raise ValueError("--teacher is required: the run directory, checkpoint or model whose logits to store")
    if d.distill_from:
        raise ValueError("--distill-from is for `vitlab train`; `vitlab distill save-logits` writes the store")
    torch.manual_seed(cfg.seed)
    train_set = build_datasets(cfg, splits=("train",))["train"]
    num_classes = len(train_set.classes)
    topk = min(10, num_classes) if topk is None else topk
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes:
        raise ValueError(f"--topk must be an integer in 1..{num_classes} (the number of classes), got {topk!r}")
    in_chans = cfg.model.in_chans or train_set.in_chans
    loader = build_loader(train_set, cfg, train=True, in_chans=in_chans)
    device = resolve_device(cfg.device)
    teacher = load_teacher(d.teacher, num_classes, in_chans, model_img_size(cfg), loader.mean, loader.std, device)
    manifest = StoreManifest(
        num_samples=len(train_set),
        num_classes=num_classes,
        topk=topk,
        epochs=math.ceil(cfg.optim.epochs),
        tau=d.distill_tau,
        teacher=d.teacher,
        settings=_settings(cfg, loader),
    )
    store = LogitStore.create(out, manifest)
    mixup, amp = _build_mixup(cfg, num_classes), cfg.amp and device.type == "cuda"
    for epoch in store.missing_epochs():
        logits = _teacher_epoch(teacher, loader, mixup, epoch, topk, manifest.tau, device, amp)
        store.write_epoch(epoch, logits)
    return store.root


@dataclass
class _Batch:
    seeds: torch.Tensor
    probs: torch.Tensor
    classes: torch.Tensor


class StoredDistillation:
    """The train loop's hooks for ``--distill-from``: a loader (``iter_epoch``), ``mix`` and ``distill``.

    ``iter_epoch`` yields the student's batches in its own loader's order, each image augmented from its stored
    seed; ``mix`` (in place of mixup) and ``distill`` (in place of an online distiller) then use the stored seeds
    and teacher predictions of the batch last yielded. NOTE: so the three are called in that order, per batch.
    """

    def __init__(
        self,
        store: LogitStore,
        loader: BatchLoader,
        mixup: Mixup | None,
        kind: str,
        alpha: float,
        env: DistEnv | None = None,
    ) -> None:
        self.store, self.loader, self.mixup = store, loader, mixup
        self.kind, self.alpha, self.tau, self.env = kind, alpha, store.manifest.tau, env
        self.mean, self.std = loader.mean, loader.std
        self._epoch: tuple[int, EpochLogits] | None = None
        self._batch: _Batch | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The student's batches of ``epoch`` from ``start_batch`` on (the same as a full epoch's from there)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is out of range for an epoch of {len(self)} batches")
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.store.read_epoch(epoch))
        stored = self._epoch[1]
        order, B = self.loader.epoch_order(epoch), self.loader.batch_size
        for b in range(start_batch, len(self)):
            idx = order[b * B : (b + 1) * B]
            images, y = _fetch(self.loader, idx)
            self._batch = _Batch(stored.seeds[idx], stored.probs[idx], stored.classes[idx])
            yield _prepare(images, self._batch.seeds, self.loader), y

    def iter_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """``iter_epoch`` as the loop's dict batches (``image``, ``label``)."""
        for x, y in self.iter_epoch(epoch, start_batch):
            yield {"image": x, "label": y}

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/cutmix of the current batch, drawn as the save job drew it."""
        if self.mixup is None or self._batch is None:
            raise RuntimeError("mix() needs a Mixup and a batch from iter_epoch()")
        return _seeded_mix(self.mixup, x, y, self._batch.seeds)

    def distill(self, x: torch.Tensor, student_out, base_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * base_loss + alpha *`` the stored teacher term, on the distillation head if there is one."""
        if self._batch is None:
            raise RuntimeError("distill() needs a batch from iter_epoch()")
        probs, classes = self._batch.probs.to(x.device), self._batch.classes.to(x.device)
        if self.env is not None and self.env.enabled:
            (probs, classes), _ = shard_batch(self.env, probs, classes)  # x is this rank's shard
        dist_logits = student_out[1] if isinstance(student_out, tuple) else student_out
        kd = stored_distillation_loss(dist_logits.float(), probs, classes, self.kind, self.tau)
        return (1 - self.alpha) * base_loss + self.alpha * kd


def build_stored_distillation(
    cfg: RunConfig,
    student: nn.Module,
    loader: BatchLoader,
    mixup: Mixup | None,
    env: DistEnv | None = None,
) -> tuple[StoredDistillation, Callable | None, Callable]:
    """``(loader, mixup, distiller)`` for the train loop with ``--distill-from``; the store is checked to fit.

    The store must hold the run's training set, classes, epochs, input and augmentation settings (and batches
    when mixing); every mismatch is a :class:`LogitStoreError` naming it.
    """
    d = cfg.distillation
    store = LogitStore.open(d.distill_from)
    m, where = store.manifest, f"--distill-from {d.distill_from!r}"
    num_classes = len(loader.dataset.classes)
    if m.num_samples != len(loader.dataset):
        raise LogitStoreError(
            f"{where} holds logits for {m.num_samples} training images but this run's training set has "
            f"{len(loader.dataset)} (wrong dataset size: check --dataset / --train-subset)"
        )
    if m.num_classes != num_classes:
        raise LogitStoreError(f"{where} holds a {m.num_classes}-class teacher but the data has {num_classes} classes")
    if m.epochs < math.ceil(cfg.optim.epochs):
        raise LogitStoreError(
            f"{where} holds {m.epochs} epochs of logits but --epochs {cfg.optim.epochs} needs "
            f"{math.ceil(cfg.optim.epochs)}; run `vitlab distill save-logits` with that --epochs (stored epochs stay)"
        )
    if d.distill == "soft" and not math.isclose(m.tau, d.distill_tau):
        raise LogitStoreError(f"{where} was saved at --distill-tau {m.tau}, not {d.distill_tau}")
    mine = _settings(cfg, loader)
    diff = [f"{k}: stored {m.settings.get(k)!r}, this run {v!r}" for k, v in mine.items() if m.settings.get(k) != v]
    if diff:
        raise LogitStoreError(
            f"{where} was saved for other training inputs ({'; '.join(diff)}); save the logits with this run's flags"
        )
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(True)
    stored = StoredDistillation(store, loader, mixup, d.distill, d.distill_alpha, env)
    return stored, (stored.mix if mixup is not None else None), stored.distill


def _install(setup: Any) -> None:
    # TinyViT: stored teacher top-k + re-created augmentations; the loader, the mix and the loss change together
    from .distill import DistillationObjective

    loader, mix, distill = build_stored_distillation(setup.cfg, setup.model, setup.train_loader, setup.mix, setup.env)
    setup.train_loader, setup.mix = loader, mix
    setup.objective = DistillationObjective(setup.objective, distill)


TECHNIQUE = Technique(
    flag="--distill-from",
    what="stored teacher logits",
    is_on=lambda cfg: bool(cfg.distillation.distill_from),
    excludes=("--teacher", "--resolutions"),
    install=_install,
)
