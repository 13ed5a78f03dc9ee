"""ED-ViT class-wise splitting: a trained classifier becomes N class-specialised sub-models plus a fusion head.

"ED-ViT: Splitting Vision Transformer for Distributed Inference on Edge Devices" / "Efficient Partitioning Vision
Transformer on Edge Devices for Distributed Inference" (arXiv:2410.11650). No official code was found; this is a
reconstruction from the paper's description, and every choice below marked *ours* is vitlab's, not the paper's:

- class partition: contiguous balanced chunks of the class list (sizes differ by at most one); *ours* (the paper
  splits the label set into N subsets without, as far as we could read, a stated rule);
- sub-model: a copy of the host whose classifier keeps only its subset's rows, so it outputs logits for its own
  classes (the paper's sub-models are "dedicated to a subset of classes"; logits rather than features is *ours*);
- class-wise pruning: structured head / MLP-channel pruning (``compress.structured``) ranked by Taylor importance
  measured on the sub-model's own classes' data (criterion *ours*: the paper's exact criterion is unverified);
- fusion: concatenated sub-model logits -> all classes. *Ours*: the head is residual, ``placed(z) + MLP(z)``, where
  ``placed`` puts each part's logits back at their class index (the arg-max-over-parts rule) and the MLP's last
  layer starts at zero, so an untrained fusion is exactly arg-max over parts and a 1-part unpruned split is the
  host itself. ``mode="argmax"`` drops the MLP (the ablation);
- placement: greedy, largest part first onto the device with the most free memory (worst-fit decreasing); the
  paper's greedy assignment under memory budgets, exact order *ours*.

Training the parts (distillation) and the fusion head lives in ``engine/split_run.py``; serving them one process
per part in ``engine/split_serve.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ._record import record_surgery

__all__ = [
    "FusionHead",
    "SplitModel",
    "check_fractions",
    "check_partition",
    "classifier_of",
    "greedy_placement",
    "make_submodel",
    "param_bytes",
    "param_count",
    "partition_classes",
    "prune_part",
    "remap_labels",
]

FUSION_MODES = ("mlp", "argmax")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def partition_classes(num_classes: int, parts: int) -> list[list[int]]:
    """``parts`` contiguous class subsets of ``range(num_classes)`` whose sizes differ by at most one."""
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not _is_int(parts) or parts < 1:
        raise ValueError(f"--parts must be an integer >= 1 (the number of sub-models), got {parts!r}")
    if parts > num_classes:
        raise ValueError(f"--parts {parts} is larger than the number of classes ({num_classes}); each part needs one")
    base, extra = divmod(num_classes, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def check_partition(part_classes: Sequence[Sequence[int]], num_classes: int) -> None:
    """A ``ValueError`` unless ``part_classes`` covers every class of ``range(num_classes)`` exactly once."""
    flat = [c for cls in part_classes for c in cls]
    if not part_classes or any(len(cls) == 0 for cls in part_classes):
        raise ValueError(f"class partition {part_classes!r} has an empty part; every part needs a class")
    if any(not _is_int(c) for c in flat) or sorted(flat) != list(range(num_classes)):
        raise ValueError(
            f"class partition {[list(c) for c in part_classes]!r} must cover classes 0..{num_classes - 1} exactly once"
        )


def remap_labels(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Labels of a part's own classes as indices into ``classes`` (its logits); other labels become -1."""
    lut = torch.full((max(int(labels.max()) + 1, max(classes) + 1),), -1, dtype=torch.long, device=labels.device)
    lut[torch.as_tensor(list(classes), device=labels.device)] = torch.arange(len(classes), device=labels.device)
    return lut[labels]


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """(attribute name, module) of ``model``'s one linear classifier; a host without one is a ``ValueError``."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    if len(names) != 1 or "." in names[0]:
        raise ValueError(
            f"{arch} has classifier(s) {list(names)}; class-wise splitting needs one top-level linear head "
            "(e.g. vit_*, deit_* without a distillation token)"
        )
    head = getattr(model, names[0], None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{arch}.{names[0]} is a {type(head).__name__}, not nn.Linear; cannot keep a class subset")
    return names[0], head


def make_submodel(model: nn.Module, classes: Sequence[int]) -> nn.Module:
    """A copy of ``model`` (surgery record included) whose classifier keeps only the rows of ``classes``."""
    name, head = classifier_of(model)
    if not classes or any(not _is_int(c) or not 0 <= c < head.out_features for c in classes):
        raise ValueError(f"classes {list(classes)!r} must be indices into the host's {head.out_features} classes")
    sub = copy.deepcopy(model)
    new = nn.Linear(head.in_features, len(classes), bias=head.bias is not None).to(head.weight)
    with torch.no_grad():
        index = torch.as_tensor(list(classes), device=head.weight.device)
        new.weight.copy_(head.weight[index])
        if head.bias is not None:
            new.bias.copy_(head.bias[index])
    setattr(sub, name, new)
    if hasattr(sub, "num_classes"):
        sub.num_classes = len(classes)
    return sub


def check_fractions(heads: float, mlp: float) -> None:
    """A ``ValueError`` unless both are fractions in [0, 1) (of heads / MLP channels removed per block)."""
    for flag, value in (("heads", heads), ("mlp", mlp)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"--{flag} must be a fraction in [0, 1) to remove from every block, got {value!r}")


def prune_part(
    part: nn.Module,
    heads: float = 0.0,
    mlp: float = 0.0,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    criterion: str = "taylor",
    scores: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, Any] | None:
    """Structured pruning of ``part`` in place, recorded as a ``compress`` ``structured`` surgery step.

    ``scores`` (from ``structured.importance``) are used as given (uniform pruning: importance of the whole host);
    otherwise they are measured on ``batches`` (class-wise pruning: the part's own classes, labels remapped with
    ``remap_labels``). Nothing to remove (``heads == mlp == 0``) leaves the part untouched and returns None.
    """
    check_fractions(heads, mlp)
    if heads == 0 and mlp == 0:
        return None
    from . import structured  # written beside this module; imported late so the rest works without it

    if scores is None:
        if batches is None:
            raise ValueError("class-wise pruning needs batches of the part's own classes (or precomputed scores)")
        scores = structured.importance(part, batches, criterion=criterion)
    kwargs = {"heads": float(heads), "mlp": float(mlp), "importance_criterion": criterion}
    report = structured.prune_structured(part, float(heads), float(mlp), scores=scores)
    record_surgery(part, "compress", "structured", kwargs, report)
    return report


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers: what a device must hold for the weights."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def greedy_placement(sizes: Sequence[float], budgets: Sequence[float]) -> list[int]:
    """Device index per part: largest part first, onto the device with the most free memory left.

    A device may host several parts when its budget allows. A part that fits nowhere is a ``ValueError``
    naming the part, its size and the largest free budget at that point.
    """
    if not budgets or any(not isinstance(b, (int, float)) or isinstance(b, bool) or b <= 0 for b in budgets):
        raise ValueError(f"device memory budgets must be positive numbers, got {list(budgets)!r}")
    if any(not isinstance(s, (int, float)) or isinstance(s, bool) or s < 0 for s in sizes):
        raise ValueError(f"part sizes must be non-negative numbers, got {list(sizes)!r}")
    free = [float(b) for b in budgets]
    device = [-1] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        d = max(range(len(free)), key=lambda d: (free[d], -d))  # most free memory; ties -> lowest index
        if sizes[i] > free[d]:
            raise ValueError(
                f"part {i} needs {sizes[i]:.0f} bytes but the largest free budget is {free[d]:.0f} "
                f"(budgets {[float(b) for b in budgets]}, parts {[float(s) for s in sizes]}): add devices or prune more"
            )
        free[d] -= sizes[i]
        device[i] = d
    return device


class FusionHead(nn.Module):
    """Concatenated part logits (B, sum k_i) -> class logits (B, num_classes): ``placed(z) + mlp(z)``.

    ``placed`` scatters each part's logits to their class index (arg-max over it is arg-max over parts); the MLP
    (LayerNorm -> Linear -> GELU -> Linear, last layer zero-initialised) learns the correction. Residual form and
    zero init are *ours*: they make an untrained head exact, so a 1-part unpruned split equals the host.
    """

    def __init__(self, part_classes: Sequence[Sequence[int]], num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        check_partition(part_classes, num_classes)
        if not _is_int(hidden) or hidden < 1:
            raise ValueError(f"fusion hidden width must be an integer >= 1, got {hidden!r}")
        flat = [c for cls in part_classes for c in cls]
        position = torch.empty(num_classes, dtype=torch.long)
        position[torch.tensor(flat)] = torch.arange(num_classes)
        self.register_buffer("position", position, persistent=False)  # derived from the partition
        self.part_classes = [list(c) for c in part_classes]
        self.mlp = nn.Sequential(
            nn.LayerNorm(num_classes), nn.Linear(num_classes, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor, mode: str = "mlp") -> torch.Tensor:
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode must be one of {FUSION_MODES}, got {mode!r}")
        placed = z[:, self.position]
        return placed if mode == "argmax" else placed + self.mlp(z)


class SplitModel(nn.Module):
    """The split in one process: every part on the same input, then the fusion head (the serving reference)."""

    def __init__(self, parts: Sequence[nn.Module], fusion: FusionHead) -> None:
        super().__init__()
        if len(parts) != len(fusion.part_classes):
            raise ValueError(f"{len(parts)} parts but the fusion head expects {len(fusion.part_classes)}")
        self.parts = nn.ModuleList(parts)
        self.fusion = fusion

    @property
    def part_classes(self) -> list[list[int]]:
        return self.fusion.part_classes

    def part_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [p(x) for p in self.parts]

    def forward(self, x: torch.Tensor, mode: str = "mlp") -> torch.Tensor:
        return self.fusion(torch.cat(self.part_outputs(x), dim=1), mode=mode)
