"""Path Ensemble: a ViT seen as an ensemble of paths, with EnsembleScale, path pruning and self-distillation.

Paper: "Revisiting Vision Transformer from the View of Path Ensemble", Chang, Wang, Luo, Wang, Shou, ICCV 2023
(arXiv:2308.06548). No official code has been published; this is a reconstruction from the paper's abstract
(the body could not be read here), so the choices below marked *ours* are vitlab's.

A pre-norm block computes ``a = attn(x)``, ``f = ffn(x + a)``, ``x' = x + a + f``: three parallel paths
(identity, attention, FFN). Unrolled over ``L`` blocks, the tokens reaching the final norm are
``x_L = x_0 + sum_l (a_l + f_l)``: the input path plus every block's direct attention and FFN contributions,
each of which is also the input of every longer path. ``apply(model, "path_ensemble", ...)`` runs a host's own
blocks with two streams: the representation stream ``x_l`` (unchanged: it feeds later blocks) and the
ensemble-output stream ``y = s_0 x_0 + sum_l (s_a,l a_l + s_f,l f_l)``, which replaces ``x_L`` before the final
norm and the head.

- **EnsembleScale** (``ensemble_scale=True``): the ``s`` above are learnable per-channel vectors (LayerScale-like,
  *ours*: per channel, one per layer and path type plus one for the input path), only on the output stream.
  Initialised to ``scale_init`` = 1 (*ours*), so the wrapped model equals the host at apply time.
- **Path pruning** (``prune_direct=k``): the direct contributions of blocks ``0 .. k-1`` (and, *ours*, of the input
  path, the shortest of all) are left out of the output stream; they still feed the later blocks.
- **Self-distillation** (``self_distill=w``): the final output (the longest paths) teaches exits on shorter paths
  through the host's shared ``norm`` + head (*ours*: no extra heads). ``distill_student="representation"``
  (default, *ours*) takes the representation stream after block ``l`` (all paths ending by ``l``: what later
  paths receive); ``"ensemble"`` the output stream truncated after ``l``. The loss, added through the compress
  ``aux_loss`` hook, is ``w * mean_l tau^2 KL(teacher || student_l)`` at temperature ``tau``, teacher detached;
  exits at every block but the last unless ``distill_layers`` names them (*ours*).

Hosts: timm's ``VisionTransformer`` (and DeiT) and vitlab's isotropic models with timm's pre-norm ``Block`` or a
``MetaBlock`` with attention and a token-wise MLP. The host blocks' children are adopted under their own names
(no ``__class__`` swap, no copied forward), so host state-dict keys do not change; the new parameters are
``blocks.0.es0.gamma`` (input path) and ``blocks.{i}.es1/es2.gamma``, hence ``replay="build"``.
``compress.remove`` restores the host blocks. ``forward`` / ``forward_features`` use the output stream; timm's
``forward_intermediates`` iterates the blocks and so returns the representation stream (vitlab's isotropic
models refuse it while the blocks are wrapped, as under token reduction). Analysis (path contributions, feature
spectra): ``path_analysis.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from ..layers import Attention as VitlabAttention
from ..layers import MetaBlock
from ..models import VARIANTS
from ._method import Method

__all__ = [
    "METHOD",
    "STUDENTS",
    "SUPPORTED_HOSTS",
    "EnsembleScale",
    "PathBlock",
    "PathEnsembleBlocks",
    "apply_path_ensemble",
    "is_path_ensemble",
    "path_distill_loss",
    "remove_path_ensemble",
    "self_distill_kl",
    "unwrap_paths",
    "wrap_paths",
]

SUPPORTED_HOSTS = (
    "timm VisionTransformer / DeiT and the isotropic vitlab models whose blocks are pre-norm: timm's Block, or a "
    "MetaBlock with attention and a token-wise MLP"
)
STUDENTS = ("representation", "ensemble")
_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class EnsembleScale(nn.Module):
    """A learnable per-channel weight on one component of the ensemble-output stream: ``x * gamma``."""

    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PathBlock(nn.Module):
    """A host block's children, run as three paths: ``paths(x) -> (x + a + f, a, f)``.

    ``forward(x)`` is the representation stream alone (so iterating ``model.blocks``, as timm's
    ``forward_intermediates`` does, still works). ``direct`` says whether ``a`` and ``f`` reach the output stream;
    ``es1`` / ``es2`` are their EnsembleScales (absent when pruned or when ensemble_scale is off).
    """

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.direct = direct

    @classmethod
    def adopt(
        cls, block: nn.Module, direct: bool, scale_dim: int | None, scale_init: float, input_scale: bool = False
    ) -> PathBlock:
        new = cls(direct)
        for name, child in block.named_children():
            new.add_module(name, child)
        if input_scale and scale_dim is not None:  # the input path's scale lives on block 0
            new.es0 = EnsembleScale(scale_dim, scale_init)
        if direct and scale_dim is not None:
            new.es1 = EnsembleScale(scale_dim, scale_init)
            new.es2 = EnsembleScale(scale_dim, scale_init)
        new.train(block.training)
        return new

    def extra_repr(self) -> str:
        return f"direct={self.direct}"

    def paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + a  # the host's order of additions, so the representation stream is bit-exact
        f = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x + f, a, f

    def direct_terms(self, a: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The attention and FFN terms as added to the output stream (scaled), or None when pruned."""
        if not self.direct:
            return None
        if hasattr(self, "es1"):
            return self.es1(a), self.es2(f)
        return a, f

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.paths(x)[0]


class PathEnsembleBlocks(nn.Sequential):
    """Replaces ``model.blocks``: the host blocks as ``PathBlock``s under the same indices; ``forward`` returns the
    ensemble-output stream. Hosts call the container once (``threads_state``, as for token reduction)."""

    threads_state = True

    def __init__(
        self,
        blocks: Sequence[PathBlock],
        host: nn.Sequential,
        prune_direct: int,
        distill_layers: Sequence[int] = (),
        distill_student: str = "representation",
        self_distill: float = 0.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__(*blocks)
        self.host_blocks = (host,)  # a tuple, so the original container is not a registered child
        self.prune_direct = prune_direct
        self.distill_layers = frozenset(distill_layers)
        self.distill_student = distill_student
        self.self_distill = self_distill
        self.distill_temperature = distill_temperature
        self.capture: dict[str, Any] | None = None  # path_analysis sets a dict to record every term
        self.stash: tuple[list[torch.Tensor], torch.Tensor] | None = None  # (students, output) for aux_loss

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cap = self.capture
        distill = self.training and torch.is_grad_enabled() and bool(self.distill_layers)
        students: list[torch.Tensor] = []
        y = None
        if self.prune_direct == 0:
            first = self[0]
            y = first.es0(x) if hasattr(first, "es0") else x
        if cap is not None:
            cap.update(input=y, attn=[], ffn=[], reps=[])
        for i, blk in enumerate(self):
            x, a, f = blk.paths(x)
            terms = blk.direct_terms(a, f)
            if terms is not None:
                y = terms[0] if y is None else y + terms[0]
                y = y + terms[1]
            if cap is not None:
                cap["attn"].append(None if terms is None else terms[0])
                cap["ffn"].append(None if terms is None else terms[1])
                cap["reps"].append(x)
            if distill and i in self.distill_layers:
                student = x if self.distill_student == "representation" else y
                if student is not None:
                    students.append(student)
        assert y is not None  # the last block is never pruned (apply checks prune_direct < depth)
        if cap is not None:
            cap["output"] = y
        self.stash = (students, y) if distill else None
        return y


def _check_block(block: nn.Module, where: str) -> None:
    for name in _CHILDREN:
        if not hasattr(block, name):
            raise ValueError(f"{where} ({type(block).__name__}) has no {name!r}; supported hosts: {SUPPORTED_HOSTS}")
    meta = type(block).forward is MetaBlock.forward and not getattr(block.mlp, "uses_grid", False)
    if type(block).forward is not Block.forward and not meta:
        raise ValueError(
            f"{where} is {type(block).__name__}, not a pre-norm timm Block or MetaBlock; supported: {SUPPORTED_HOSTS}"
        )
    if type(block.attn).forward not in (Attention.forward, VitlabAttention.forward):
        raise ValueError(
            f"{where}.attn is {type(block.attn).__name__}, not timm's or vitlab's Attention; supported: "
            f"{SUPPORTED_HOSTS}"
        )


def _check_host(model: nn.Module) -> int:
    """The host's depth, or a ValueError naming what makes it unsupported."""
    name = type(model).__name__
    arch = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", ""))
    spec = VARIANTS.get(arch)
    if spec is not None and not spec.isotropic:
        raise ValueError(f"{arch} is not isotropic (its token grid changes); supported hosts: {SUPPORTED_HOSTS}")
    for attr in ("blocks", "norm", "forward_head"):
        if not hasattr(model, attr):
            raise ValueError(f"{name} has no attribute {attr!r}; supported hosts: {SUPPORTED_HOSTS}")
    if getattr(model.blocks, "threads_state", False):
        raise ValueError(f"{name}.blocks is already wrapped (token reduction or path ensemble); remove it first")
    if not isinstance(model.blocks, nn.Sequential) or len(model.blocks) == 0:
        raise ValueError(f"{name}.blocks is not a non-empty nn.Sequential; supported hosts: {SUPPORTED_HOSTS}")
    for i, block in enumerate(model.blocks):
        _check_block(block, f"{name}.blocks[{i}]")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("path_ensemble does not support gradient checkpointing; call set_grad_checkpointing(False)")
    return len(model.blocks)


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}), got {value!r}")
    return value


def _width(block: nn.Module) -> int:
    return int(block.attn.proj.out_features)  # the residual width (timm's and vitlab's Attention both project)


def wrap_paths(
    model: nn.Module,
    ensemble_scale: bool = False,
    prune_direct: int = 0,
    scale_init: float = 1.0,
    distill_layers: Sequence[int] = (),
    distill_student: str = "representation",
    self_distill: float = 0.0,
    distill_temperature: float = 1.0,
) -> PathEnsembleBlocks:
    """Adopt ``model``'s blocks into a ``PathEnsembleBlocks`` (checked, unrecorded); returns the new container."""
    depth = _check_host(model)
    _check_int(prune_direct, "prune_direct (the number of leading blocks cut from the output)", 0, depth)
    host = model.blocks
    dim = _width(host[0]) if ensemble_scale else None
    blocks = [
        PathBlock.adopt(b, i >= prune_direct, dim, scale_init, input_scale=i == 0 and prune_direct == 0)
        for i, b in enumerate(host)
    ]
    wrapped = PathEnsembleBlocks(
        blocks, host, prune_direct, distill_layers, distill_student, self_distill, distill_temperature
    )
    wrapped.train(host.training)
    model.blocks = wrapped
    return wrapped


def is_path_ensemble(model: nn.Module) -> bool:
    return isinstance(getattr(model, "blocks", None), PathEnsembleBlocks)


def unwrap_paths(model: nn.Module) -> nn.Module:
    """Put the host's own blocks back (parameters were shared; EnsembleScales are dropped)."""
    if is_path_ensemble(model):
        (host,) = model.blocks.host_blocks
        host.train(model.blocks.training)
        model.blocks = host
    return model


def apply_path_ensemble(
    model: nn.Module,
    ensemble_scale: bool = True,
    prune_direct: int = 0,
    self_distill: float = 0.0,
    distill_temperature: float = 1.0,
    distill_layers: list[int] | None = None,
    distill_student: str = "representation",
    scale_init: float = 1.0,
) -> dict[str, Any]:
    """Run ``model``'s blocks as a two-stream path ensemble (in place); returns what was set up.

    Args:
        ensemble_scale: learnable per-channel weights on the output stream's components (input, attention, FFN).
        prune_direct: cut the direct output contributions of the input path and of blocks ``0 .. k-1``
            (``0 <= k < depth``); they still feed later blocks.
        self_distill: weight of the long-to-short self-distillation loss (0: off).
        distill_temperature: the KL temperature (> 0).
        distill_layers: blocks whose output is a student exit (default: all but the last).
        distill_student: ``"representation"`` (block output) or ``"ensemble"`` (output stream truncated there).
        scale_init: initial EnsembleScale value (1: the wrapped model equals the host).
    """
    if not isinstance(ensemble_scale, bool):
        raise ValueError(f"ensemble_scale must be true or false, got {ensemble_scale!r}")
    if isinstance(self_distill, bool) or not isinstance(self_distill, (int, float)) or self_distill < 0:
        raise ValueError(f"self_distill must be a weight >= 0, got {self_distill!r}")
    if isinstance(distill_temperature, bool) or not isinstance(distill_temperature, (int, float)):
        raise ValueError(f"distill_temperature must be a number > 0, got {distill_temperature!r}")
    if not distill_temperature > 0:
        raise ValueError(f"distill_temperature must be a number > 0, got {distill_temperature!r}")
    if distill_student not in STUDENTS:
        raise ValueError(f"distill_student must be one of {STUDENTS}, got {distill_student!r}")
    if isinstance(scale_init, bool) or not isinstance(scale_init, (int, float)):
        raise ValueError(f"scale_init must be a number, got {scale_init!r}")
    depth = _check_host(model)
    if distill_layers is None:
        layers = list(range(depth - 1)) if self_distill else []
    elif not isinstance(distill_layers, (list, tuple)):
        raise ValueError(f"distill_layers must be a list of block indices, got {distill_layers!r}")
    else:
        layers = sorted({_check_int(i, "distill_layers entries (block indices)", 0, depth) for i in distill_layers})
    if distill_student == "ensemble":  # before the first kept block the truncated output stream is empty
        layers = [i for i in layers if i >= prune_direct]
    layers = layers if self_distill else []
    wrapped = wrap_paths(
        model, ensemble_scale, prune_direct, scale_init, layers, distill_student, float(self_distill),
        float(distill_temperature),
    )  # fmt: skip
    scales = sum(m.gamma.numel() for m in wrapped.modules() if isinstance(m, EnsembleScale))
    return {
        "depth": depth,
        "pruned_blocks": list(range(prune_direct)),
        "ensemble_scale_params": scales,
        "distill_layers": layers,
    }


def remove_path_ensemble(model: nn.Module) -> None:
    unwrap_paths(model)


def self_distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 KL(softmax(teacher / tau) || softmax(student / tau))``, batch mean; the teacher is detached."""
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model.forward_head(model.norm(tokens))
    return out[0] if isinstance(out, tuple) else out


def path_distill_loss(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compress ``aux_loss``: ``{"path_distill": w * mean KL}`` from what the last training forward stashed."""
    blocks = getattr(model, "blocks", None)
    stash = getattr(blocks, "stash", None)
    if stash is None:
        return {}
    blocks.stash = None  # read once: the graph is not kept alive past this step
    students, output = stash
    if not students:
        return {}
    teacher = _logits(model, output).detach()
    tau = blocks.distill_temperature
    kl = torch.stack([self_distill_kl(_logits(model, s), teacher, tau) for s in students]).mean()
    return {"path_distill": blocks.self_distill * kl}


METHOD = Method(
    name="path_ensemble",
    fn=apply_path_ensemble,
    replay="build",
    summary="two-stream path ensemble: EnsembleScale, pruning of short paths' direct outputs, self-distillation",
    undo=remove_path_ensemble,
    aux_loss=path_distill_loss,
)
