"""Adapter utilities: zero-initialised copies of pretrained modules, LoRA through peft, and freezing a base model.

Adapters add trainable parts to a frozen pretrained network so that the adapted network equals the base at the start
of training. MV-Adapter (Huang et al., arXiv:2412.03632) copies each self-attention with its pretrained weights and
zeroes the copy's output projection; ControlNet (Zhang et al., arXiv:2302.05543) copies an encoder and joins it
through zero-initialised layers; Modular-Cam (arXiv:2504.12048) trains one LoRA (Hu et al., arXiv:2106.09685) per
camera motion on a frozen video generator and switches between them. ``zero_init_copy`` and ``zero_module`` give the
first two; ``add_lora`` / ``set_lora`` wrap peft's ``inject_adapter_in_model`` (any ``nn.Module``, no PEFT model
wrapper, so task models keep their own ``forward``) and check that the targets fit the model.

Runs reload because the task models that use these build their adapters in ``__init__`` from their task keywords
(stored in the run's config), not by surgery on a trained model. peft is an optional dependency
(``pip install vitlab[generative]``), imported only by the LoRA functions.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch.nn as nn

__all__ = [
    "AdapterError",
    "add_lora",
    "freeze",
    "lora_names",
    "set_lora",
    "trainable_parameters",
    "zero_init_copy",
    "zero_module",
]

LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class AdapterError(ValueError):
    """An adapter that does not fit its base model (unknown target module, wrong rank, unknown adapter name)."""


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place (a zero layer outputs 0 at init) and return it."""
    for p in module.parameters():
        p.data.zero_()
    return module


def zero_init_copy(module: nn.Module, output: str | Sequence[str]) -> nn.Module:
    """A trainable deep copy of ``module`` (pretrained weights kept) whose ``output`` submodule(s) are zeroed.

    ``output`` names submodules by dotted path (e.g. ``"proj"`` of a timm ``Attention``); zeroing the last layer of a
    branch makes the copy output 0, so ``base(x) + copy(x)`` equals ``base(x)`` at init while the copy's other weights
    start from the pretrained ones (MV-Adapter's duplicated attention).
    """
    names = [output] if isinstance(output, str) else list(output)
    if not names:
        raise AdapterError("output must name at least one submodule to zero")
    branch = copy.deepcopy(module)
    for name in names:
        try:
            target = branch.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in module.named_modules() if n]
            raise AdapterError(
                f"output {name!r} is not a submodule of {type(module).__name__}; submodules: {children}"
            ) from None
        if not any(True for _ in target.parameters()):
            raise AdapterError(f"output {name!r} ({type(target).__name__}) has no parameters to zero")
        zero_module(target)
    for p in branch.parameters():
        p.requires_grad_(True)
    return branch


def freeze(model: nn.Module, *, keep: Iterable[nn.Module] = ()) -> nn.Module:
    """Stop gradients to every parameter of ``model`` except those of the modules in ``keep``; returns ``model``."""
    kept = {id(p) for m in keep for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in kept)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA adapters need peft: pip install 'vitlab[generative]' (or pip install peft)") from err
    return peft


def _targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The dotted names of ``model``'s LoRA-able layers matched by ``target_modules`` (peft's suffix rule)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(f"target_modules must be non-empty module names, got {target_modules!r}")
    wrapped = {id(m) for m in _lora_layers(model)}  # layers that already carry a LoRA keep their own name
    inner = tuple(n + "." for n, m in model.named_modules() if id(m) in wrapped)
    layers = [
        n
        for n, m in model.named_modules()
        if (id(m) in wrapped or isinstance(m, LORA_LAYERS)) and not (inner and n.startswith(inner))
    ]
    matched = [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        sample = sorted({n.rsplit(".", 1)[-1] for n in layers})[:20]
        raise AdapterError(
            f"LoRA target_modules {missing} match no Linear/Conv/Embedding layer of {type(model).__name__}; "
            f"layer names end in: {sample}"
        )
    return matched


def add_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    name: str = "default",
) -> list[str]:
    """Add a LoRA adapter ``name`` (``W + (alpha / rank) B A``, ``B`` zero-initialised) to the matched layers.

    ``target_modules`` are layer names or suffixes of dotted names (peft's rule: ``"qkv"`` matches
    ``blocks.0.attn.qkv``). Every target must match a layer, else ``AdapterError``. peft freezes every parameter that
    is not a LoRA weight; ``freeze(model, keep=...)`` re-opens others. Several adapters may live side by side
    (``set_lora`` picks the active ones). Returns the adapted layers' names.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterError(f"name must be an identifier (it becomes a state-dict key), got {name!r}")
    if name in lora_names(model):
        raise AdapterError(f"model already has a LoRA adapter named {name!r}")
    matched = _targets(model, target_modules)
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, target_modules=sorted(set(matched))
    )
    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    return matched


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no LoRA layers either
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def lora_names(model: nn.Module) -> list[str]:
    """The LoRA adapters present in ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for layer in _lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def set_lora(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Make ``names`` the active LoRA adapters (their weights trainable, the others frozen); None: the base model."""
    layers = _lora_layers(model)
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no LoRA adapters (add_lora first)")
    if names is None:
        for layer in layers:
            layer.enable_adapters(False)
        return
    wanted = [names] if isinstance(names, str) else list(names)
    unknown = sorted(set(wanted) - set(lora_names(model)))
    if not wanted or unknown:
        raise AdapterError(f"unknown LoRA adapter(s) {unknown or wanted!r}; the model has {lora_names(model)}")
    for layer in layers:
        layer.enable_adapters(True)
        layer.set_adapter(wanted)
