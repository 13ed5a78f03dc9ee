"""Modular multi-task MoE ViT: one isotropic ViT whose attention and MLPs are task-routed mixtures of experts,
one head per task, trained on heterogeneous data (one data set per batch); expert extraction and adaptation.

An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous Training (Chen et al.,
arXiv:2306.17165; no official code, its MoE machinery is Mod-Squad's, UMass-Foundation-Model/Mod-Squad). The
layers are ``layers.task_moe``; this file is the surgery on a backbone, the heads and the objective:

- every block's attention becomes ``MoEAttention`` (``attn_experts`` one-head experts, ``attn_k`` per token,
  default twice the heads and as many active as the backbone had heads) and its MLP ``TaskMoEMlp``
  (``mlp_experts`` experts of hidden width ``hidden / mlp_k``, so ``mlp_k`` active experts cost one dense MLP);
- ``moe=False`` keeps the dense backbone (the shared dense baseline; one task gives the separate baselines);
- loss: each task's loss on its own batches, plus ``balance_weight`` x the routers' cv² balance loss, minus
  ``mi_weight`` x the mean task-expert mutual information (``layers.task_moe``; how it is estimated across
  one-task batches is reconstructed, see there);
- ``extract(task)``: a one-task model keeping, per layer, the experts that received at least ``threshold`` of the
  task's routing (counted since ``reset_routing_counts``; at least k kept); ``add_task``: a new head and router
  gates, everything else frozen but the ``train_experts`` experts per layer the new task uses most.

Batches: ``"image"`` plus one target per task, keyed by the task's name: ``(B,)`` int64 class ids for
``classify`` tasks, ``(B, H, W)`` int64 maps (255 = ignore) for ``segment`` tasks. A batch may hold several
tasks' targets (all are trained); the engine passes ``tasks=`` the tasks a batch holds (``forward_kwargs``), and
without it every task's head is computed. Output: ``{task: logits}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...layers.hosts import attention_blocks
from ...layers.moe import balance_loss
from ...layers.task_moe import MoEAttention, TaskMoEMlp, task_routed_modules
from ...models import Paper
from .._backbone import create_backbone, feature_dicts
from .._registry import register_task
from ..base import TaskModel, TaskSpec

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

__all__ = ["DEFAULT_TASKS", "ModularMoE", "TaskHead", "parse_tasks"]

PAPER = Paper(22, "An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous Training",
              "2306.17165", "", kind="B+T")  # fmt: skip
KINDS = ("classify", "segment")
IGNORE_INDEX = 255
DEFAULT_TASKS = ("fashion:classify:10", "scenes:segment:11", "count:classify:7")  # data.multitask's


def parse_tasks(tasks: Sequence[str]) -> list[tuple[str, str, int]]:
    """``["name:kind:classes", ...]`` -> ``[(name, kind, classes)]``; kinds ``classify`` and ``segment``."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of 'name:kind:classes' strings, got {tasks!r}")
    out = []
    for t in tasks:
        parts = t.split(":") if isinstance(t, str) else []
        if len(parts) != 3 or parts[1] not in KINDS or not parts[2].isdigit() or int(parts[2]) < 2 or not parts[0]:
            raise ValueError(f"task {t!r}: expected 'name:kind:classes' with kind in {KINDS} and classes >= 2")
        out.append((parts[0], parts[1], int(parts[2])))
    if len({name for name, _, _ in out}) != len(out):
        raise ValueError(f"task names must be unique, got {[n for n, _, _ in out]}")
    return out


class TaskHead(nn.Module):
    """``classify``: mean-pooled map -> logits (B, K); ``segment``: 1x1 conv, upsampled -> (B, K, H, W)."""

    def __init__(self, kind: str, dim: int, classes: int) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim, classes) if kind == "classify" else nn.Conv2d(dim, classes, 1)

    def forward(self, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.kind == "classify":
            return self.proj(feature_map.mean((2, 3)))
        return F.interpolate(self.proj(feature_map), size=size, mode="bilinear", align_corners=False)


class ModularMoE(TaskModel):
    """Task-routed MoE ViT with one head per task (see the module docstring)."""

    task_name = "modular_moe"
    batch_keys = ("image",)
    primary_metric = "mean_score"
    higher_is_better = True

    def __init__(
        self,
        backbone: str = "vit_nano_patch4_28",
        *,
        num_classes: int = 11,
        in_chans: int = 1,
        img_size: int = 32,
        backbone_kwargs: dict[str, Any] | None = None,
        tasks: Sequence[str] = DEFAULT_TASKS,
        moe: bool = True,
        mlp_experts: int = 8,
        mlp_k: int = 2,
        attn_experts: int | None = None,
        attn_k: int | None = None,
        noisy_gating: bool = True,
        balance_weight: float = 0.01,
        mi_weight: float = 0.0,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        self.tasks = parse_tasks(tasks)
        self.target_keys = tuple(name for name, _, _ in self.tasks)
        if balance_weight < 0 or mi_weight < 0:
            raise ValueError(f"balance_weight and mi_weight must be >= 0, got {balance_weight}, {mi_weight}")
        self.balance_weight, self.mi_weight = balance_weight, mi_weight
        self.backbone = create_backbone(backbone, in_chans=in_chans, img_size=img_size, **(backbone_kwargs or {}))
        if len({d["reduction"] for d in feature_dicts(self.backbone)}) > 1:
            raise ValueError(f"modular_moe takes isotropic ViTs; {backbone} is hierarchical (its stages differ in "
                             "stride), and the task-routed blocks replace a plain ViT's attention and MLP")  # fmt: skip
        blocks = attention_blocks(self.backbone, "modular_moe", "isotropic ViTs with timm or vitlab Attention")
        self.dim = feature_dicts(self.backbone)[-1]["num_chs"]
        if moe:
            for block in blocks:
                _to_moe(block, len(self.tasks), mlp_experts, mlp_k, attn_experts, attn_k, noisy_gating)
        self.heads = nn.ModuleDict({name: TaskHead(kind, self.dim, k) for name, kind, k in self.tasks})

    # -- forward -------------------------------------------------------------------------------------------------
    def forward_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``{"tasks": the tasks whose targets the batch holds}``; a batch with none of this model's is refused."""
        present = tuple(name for name, _, _ in self.tasks if name in batch)
        if not present:
            raise ValueError(f"batch holds no target of this model's tasks {self.target_keys} (keys: {sorted(batch)})")
        return {"tasks": present}

    def forward(self, batch_or_image: torch.Tensor | Mapping[str, Any], tasks: Sequence[str] | None = None) -> Any:
        if isinstance(batch_or_image, Mapping):
            if "image" not in batch_or_image:
                raise ValueError(f"batch has no 'image' (keys: {sorted(batch_or_image)})")
            if tasks is None and any(name in batch_or_image for name in self.target_keys):
                tasks = self.forward_kwargs(batch_or_image)["tasks"]
            batch_or_image = batch_or_image["image"]
        self.check_image(batch_or_image)
        return self.forward_image(batch_or_image, tasks)

    def forward_image(self, image: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: logits}`` for ``tasks`` (default all); each task runs the backbone with its own routing."""
        names = list(self.target_keys if tasks is None else tasks)
        unknown = [t for t in names if t not in self.heads]
        if unknown or not names:
            raise ValueError(f"tasks must be a non-empty subset of {self.target_keys}, got {tasks!r}")
        routed = task_routed_modules(self.backbone)
        out = {}
        for name in names:
            ids = torch.full((image.shape[0],), self.target_keys.index(name), dtype=torch.long, device=image.device)
            for m in routed:
                m.routing_task = ids
            (feature_map,) = self.backbone.forward_intermediates(
                image, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
            )
            out[name] = self.heads[name](feature_map, size=image.shape[-2:])
        return out

    # -- objective -----------------------------------------------------------------------------------------------
    def _targets(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        found = {}
        for name, kind, _ in self.tasks:
            if name not in batch or name not in output:
                continue
            target, logits = batch[name], output[name]
            expected = (logits.shape[0],) if kind == "classify" else (logits.shape[0], *logits.shape[-2:])
            if not isinstance(target, torch.Tensor) or tuple(target.shape) != expected or target.dtype != torch.long:
                got = f"{tuple(target.shape)} {target.dtype}" if isinstance(target, torch.Tensor) else type(target)
                raise ValueError(f"batch[{name!r}] must be int64 {expected} ({kind} targets), got {got}")
            found[name] = target
        if not found:
            raise ValueError(f"batch and output share no task of {self.target_keys} (batch keys: {sorted(batch)})")
        return found

    def loss(self, output: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Sum of the batch's task losses + balance loss - mi_weight x mutual information (routing of the
        last task computed)."""
        logs: dict[str, torch.Tensor] = {}
        total = None
        for name, target in self._targets(output, batch).items():
            task_loss = F.cross_entropy(output[name], target, ignore_index=IGNORE_INDEX, reduction="sum")
            task_loss = task_loss / (target != IGNORE_INDEX).sum().clamp(min=1)
            logs[f"loss_{name}"] = task_loss
            total = task_loss if total is None else total + task_loss
        routers = [m.router for m in task_routed_modules(self.backbone)]
        if routers and routers[0].stats is not None:
            bal = sum(balance_loss(r.stats.importance, r.stats.load) for r in routers) / len(routers)
            mi = sum(r.mutual_information() for r in routers) / len(routers)
            logs["balance"], logs["mutual_info"] = bal.detach(), mi.detach()
            total = total + self.balance_weight * bal - self.mi_weight * mi
        return {"loss": total, **logs}

    def build_metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        return MetricCollection({
            name: MulticlassAccuracy(k, average="micro") if kind == "classify"
            else MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE_INDEX)
            for name, kind, k in self.tasks
        })  # fmt: skip

    def update_metrics(self, metrics: MetricCollection, output: Any, batch: Mapping[str, Any]) -> None:
        for name, target in self._targets(output, batch).items():
            metrics[name].update(output[name].argmax(1), target)

    def summarize_metrics(self, metrics: MetricCollection) -> dict[str, float | list]:
        """Per task: top-1 accuracy or mIoU (percent), for tasks that were scored; ``mean_score`` their mean."""
        scores = {
            name: 100.0 * float(metrics[name].compute()) for name in self.target_keys if metrics[name].update_called
        }
        return {**scores, "mean_score": sum(scores.values()) / len(scores) if scores else 0.0}

    def postprocess(self, output: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{task: class ids (B,) or label maps (B, H, W)}``."""
        return {name: logits.argmax(1) for name, logits in output.items()}

    def example_batch(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Random images with a target for every task (as an image labelled for all tasks would have)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        size = (batch_size, self.in_chans, self.img_size, self.img_size)
        batch: dict[str, Any] = {"image": torch.randn(size, generator=g)}
        for name, kind, k in self.tasks:
            shape = (batch_size,) if kind == "classify" else (batch_size, self.img_size, self.img_size)
            batch[name] = torch.randint(0, k, shape, generator=g)
        return batch

    # -- experts -------------------------------------------------------------------------------------------------
    def reset_routing_counts(self) -> None:
        for m in task_routed_modules(self.backbone):
            m.router.reset_counts()

    def routing_counts(self) -> list[torch.Tensor]:
        """Per MoE layer (attention and MLP in block order), the (tasks, experts) top-k counts since the reset."""
        return [m.router.counts.clone() for m in task_routed_modules(self.backbone)]

    def extract(self, task: str, threshold: float = 0.05) -> ModularMoE:
        """A one-task copy keeping, per layer, the experts with >= ``threshold`` of ``task``'s routed tokens."""
        t = self._task_index(task)
        routed = task_routed_modules(self.backbone)
        if not routed or not routed[0].router.counts[t].sum():
            raise ValueError(f"extract({task!r}) needs routing counts: reset_routing_counts(), then run its data")
        new = copy.deepcopy(self)
        for (name, module), old in zip(_named_routed(new.backbone), routed, strict=True):
            share = old.router.counts[t] / old.router.counts[t].sum()
            keep = sorted(set((share >= threshold).nonzero().flatten().tolist()) |
                          set(share.topk(old.router.k).indices.tolist()))  # fmt: skip
            _set_module(new.backbone, name, module.select(keep, t))
        new.tasks = [self.tasks[t]]
        new.target_keys = (task,)
        new.heads = nn.ModuleDict({task: new.heads[task]})
        return new

    def add_task(self, spec: str, train_experts: int = 2) -> None:
        """Add task ``spec`` ('name:kind:classes'): a head and router gates (mean of the others'), the rest frozen.

        Then ``reset_routing_counts()``, run some of its data, and ``unfreeze_top_experts(name, train_experts)``."""
        ((name, kind, k),) = parse_tasks([spec])
        if name in self.heads:
            raise ValueError(f"task {name!r} exists already ({self.target_keys})")
        self.requires_grad_(False)
        for m in task_routed_modules(self.backbone):
            m.router.add_task()
            for gate in (m.router.gates[-1], *(m.router.noises[-1:] if m.router.noises is not None else ())):
                gate.requires_grad_(True)
        self.tasks.append((name, kind, k))
        self.target_keys = (*self.target_keys, name)
        self.heads[name] = TaskHead(kind, self.dim, k).to(next(self.parameters()).device)

    def unfreeze_top_experts(self, task: str, count: int) -> list[list[int]]:
        """Make the ``count`` experts per layer that ``task`` used most trainable; their indices per layer."""
        t = self._task_index(task)
        chosen = []
        for m in task_routed_modules(self.backbone):
            top = m.router.counts[t].topk(min(count, m.router.num_experts)).indices.tolist()
            for e in top:
                for part in m.experts_of(e):
                    part.requires_grad_(True)
            chosen.append(sorted(top))
        return chosen

    def _task_index(self, task: str) -> int:
        if task not in self.target_keys:
            raise ValueError(f"unknown task {task!r}; this model has {self.target_keys}")
        return self.target_keys.index(task)


def _to_moe(block: nn.Module, num_tasks: int, mlp_experts: int, mlp_k: int, attn_experts: int | None,
            attn_k: int | None, noisy: bool) -> None:  # fmt: skip
    """Replace ``block``'s attention and MLP by task-routed mixtures (the surgery of ``moe=True``)."""
    attn_name = getattr(block, "mixer_name", "attn")
    attn, mlp = getattr(block, attn_name), block.mlp
    heads = attn.num_heads
    dim = attn.qkv.in_features
    hidden = mlp.fc1.out_features
    if hidden % mlp_k:
        raise ValueError(f"mlp_k {mlp_k} must divide the MLP's hidden width {hidden} (experts are hidden/k wide)")
    qkv_bias = attn.qkv.bias is not None
    setattr(block, attn_name, MoEAttention(dim, attn_experts or 2 * heads, attn_k or heads, num_tasks,
                                           attn.head_dim, qkv_bias=qkv_bias, noisy_gating=noisy))  # fmt: skip
    block.mlp = TaskMoEMlp(dim, hidden // mlp_k, mlp_experts, mlp_k, num_tasks, noisy_gating=noisy)


def _named_routed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    routed = set(map(id, task_routed_modules(model)))
    return [(n, m) for n, m in model.named_modules() if id(m) in routed]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


register_task(
    TaskSpec(
        name="modular_moe",
        task="multitask",
        builder=ModularMoE,
        metric="mean_score",
        paper=PAPER,
        kind="B+T",
        dataset="fmnist_multitask",
        num_classes=11,
        img_size=32,
        default_backbone="vit_nano_patch4_28",
        description="Task-routed MoE ViT (per-head attention experts, MLP experts, MI loss) on heterogeneous data",
        test_backbones=("vit_micro_patch4_28", "channelvit_nano_patch4_28"),
        test_kwargs={"img_size": 16, "mlp_experts": 4, "mlp_k": 2, "attn_experts": 3, "attn_k": 2},
        exportable=False,
        export_reason="routing is data-dependent: each expert runs on the tokens sent to it (nonzero, index_add)",
        backbones="isotropic",
        backbones_reason="the task-routed attention and MLP replace the blocks of a plain ViT",
    )
)
