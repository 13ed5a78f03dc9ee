"""Variant tables and their registration with timm (the only shared model infrastructure).

A family file declares ``VARIANTS = {name: VariantSpec(...)}`` and calls
``register_variants(builder, VARIANTS, module=__name__)``; that builds the module's timm
``default_cfgs`` and one named entrypoint per row, so ``timm.create_model(name)`` works.
Models timm already implements are *reached*, not copied: ``reach_timm_models`` records their
vitlab metadata without registering a second entrypoint.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["VARIANTS", "Paper", "VariantSpec", "build_with_features", "reach_timm_models", "register_variants"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_SCRIPT_REASON = "TorchScript is in maintenance in PyTorch; vitlab supports torch.export instead"


@dataclass(frozen=True)
class Paper:
    """A paper of shared/PAPERS.md: its row number there, title, arXiv id and official code."""

    number: int
    title: str
    arxiv: str
    code: str
    kind: str = "B"


@dataclass(frozen=True)
class VariantSpec:
    """One registered variant: its constructor arguments, paper reference and declared capabilities.

    Args:
        kwargs: arguments the builder receives (user keywords override them).
        ref_params_m: parameter count (millions) in the paper's table, checked within 1%.
        ref_gmacs: multiply-accumulates (G) in the paper's table (papers call these FLOPs), within 5%.
        ref_params_rounding: the step the paper rounds its parameter counts to (1.0 for "28M"); the parity
            test then accepts a difference up to half of it where that exceeds 1%.
        ref_source: where the reference figures come from ("Table 1", "reconstructed: ...").
        test_kwargs: a tiny configuration that the registry-wide contract tests build.
        isotropic: one token grid through all blocks (token reduction can be applied).
        dynamic_size: a built model runs on inputs of other sizes (position encodings resample or there
            are none). False: the size is fixed when the model is built (``img_size=``) and other inputs
            are refused or resized to it; build the model for the size you need.
        pool_reduction: the stride of the ``(B, C, H, W)`` map that ``forward_features`` returns, for models that
            return one; sets timm's ``pool_size`` (that map's size at ``img_size``). None: tokens (timm's ViT).
        unpooled_output: ``global_pool=''`` is accepted, and ``forward_head`` then returns ``forward_features``'
            output unpooled (timm's idiom); False where timm's own class refuses it (CrossViT, distilled DeiT).
        img_size_arg: the entrypoint takes ``img_size``. False for size-agnostic timm models without one
            (TinyViT): ``create_model`` checks and then drops it, since nothing is built for a size.
        grad_checkpointing: ``set_grad_checkpointing(True)`` is supported (if not, it raises).
        exportable: ``torch.export`` / ONNX work; if not, ``export_reason`` says why.
        fx_traceable: FX symbolic tracing works (vitlab's classes: plain ``torch.fx.symbolic_trace``; timm's:
            with timm's leaf modules and wrapped functions), so torchvision's ``create_feature_extractor`` and
            timm's FX feature path do; if not, ``fx_reason`` says why.
        scriptable: ``torch.jit.script`` works. TorchScript is in maintenance in PyTorch and vitlab promises
            ``torch.export`` instead, so vitlab's own classes are not scriptable (``script_reason``); timm models
            that timm scripts declare True.
        hf_hub_id: Hugging Face Hub repository of the official weights, loaded through the family's
            ``checkpoint_filter_fn`` (empty: no hub weights).
    """

    paper: Paper
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    ref_params_m: float | None = None
    ref_gmacs: float | None = None
    ref_params_rounding: float = 0.0
    ref_source: str = ""
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    isotropic: bool = False
    dynamic_size: bool = True
    pool_reduction: int | None = None
    unpooled_output: bool = True
    img_size_arg: bool = True
    grad_checkpointing: bool = True
    exportable: bool = True
    export_reason: str = ""
    fx_traceable: bool = True
    fx_reason: str = ""
    scriptable: bool = False
    script_reason: str = NO_SCRIPT_REASON
    timm_native: bool = False
    description: str = ""
    first_conv: str = "patch_embed.proj"
    classifier: str | tuple[str, ...] = "head"
    hf_hub_id: str = ""

    def __post_init__(self) -> None:
        if not self.fx_traceable and not self.fx_reason:
            raise ValueError("a VariantSpec with fx_traceable=False must give fx_reason")

    def paper_cfg(self) -> dict[str, Any]:
        """The paper fields of timm's ``PretrainedCfg`` (title, arXiv id, official code)."""
        return dict(paper_name=self.paper.title, paper_ids=f"arXiv:{self.paper.arxiv}", origin_url=self.paper.code)

    def pretrained_cfg(self) -> dict[str, Any]:
        optional: dict[str, Any] = {"hf_hub_id": self.hf_hub_id} if self.hf_hub_id else {}
        if self.pool_reduction:  # strided convs and merges round up: 224 / 32 -> 7, 232 / 32 -> 8
            side = -(-self.img_size // self.pool_reduction)
            optional["pool_size"] = (side, side)
        return {
            **optional,
            "input_size": (self.in_chans, self.img_size, self.img_size),
            "mean": self.mean,
            "std": self.std,
            "num_classes": self.num_classes,
            "interpolation": "bicubic",
            "crop_pct": 1.0 if self.img_size < 64 else 0.9,
            "first_conv": self.first_conv,
            "classifier": self.classifier,
            "paper_name": self.paper.title,
            "paper_ids": f"arXiv:{self.paper.arxiv}",
            "origin_url": self.paper.code,
            "description": self.description,
        }


# name -> spec for every model vitlab offers, its own and the timm models it reaches
VARIANTS: dict[str, VariantSpec] = {}


def _add(name: str, spec: VariantSpec) -> None:
    if name in VARIANTS:
        raise ValueError(f"vitlab model {name!r} is declared twice")
    VARIANTS[name] = spec


def register_variants(builder: Callable[..., Any], variants: dict[str, VariantSpec], module: str) -> None:
    """Register one timm entrypoint per row of ``variants``, named after the row.

    ``builder(variant, pretrained, **kwargs)`` makes the model. timm's ``register_model`` reads the
    pretrained cfgs from ``sys.modules[module].default_cfgs``, so those are built first.
    """
    mod = sys.modules[module]
    cfgs = generate_default_cfgs({name: spec.pretrained_cfg() for name, spec in variants.items()})
    mod.default_cfgs = {**getattr(mod, "default_cfgs", {}), **cfgs}
    for name, spec in variants.items():
        _add(name, spec)

        def entrypoint(pretrained: bool = False, _name: str = name, _spec: VariantSpec = spec, **kwargs: Any):
            return builder(_name, pretrained, **{**_spec.kwargs, **kwargs})

        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module
        entrypoint.__doc__ = f"{name}: {spec.paper.title} (arXiv:{spec.paper.arxiv}). {spec.description}".strip()
        register_model(entrypoint)


def reach_timm_models(variants: dict[str, VariantSpec]) -> None:
    """Record vitlab metadata for models timm already implements faithfully (no second entrypoint)."""
    import timm

    for name, spec in variants.items():
        if not timm.is_model(name):
            raise RuntimeError(f"timm {timm.__version__} has no model {name!r}; vitlab needs timm>=1.0.15")
        _add(name, replace(spec, timm_native=True))


def _default_out_indices(cls: type, kwargs: dict[str, Any]) -> int | tuple[int, ...]:
    """Every stage of a staged model; the last three blocks of an isotropic one (timm's ViT default)."""
    for key in ("depths", "embed_dims"):
        if key in kwargs:
            return tuple(range(len(kwargs[key])))
    for klass in cls.__mro__:  # the constructor's own default
        param = inspect.signature(klass.__init__).parameters.get("depths")
        if param is not None and param.default is not inspect.Parameter.empty:
            return tuple(range(len(param.default)))
    return min(3, kwargs.get("depth", 3))


def build_with_features(cls: type, variant: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """timm's ``build_model_with_cfg`` with the getter feature wrapper (``features_only=True`` works)."""
    out_indices = kwargs.pop("out_indices", _default_out_indices(cls, kwargs))
    feature_cfg = {"out_indices": out_indices, "feature_cls": "getter"}
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
