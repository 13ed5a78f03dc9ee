"""``bench_models``: params, FLOPs, throughput, latency and memory of registered models, one row each.

Every row carries a ratio to timm's implementation of the same architecture, timed in the same
run and interleaved with ours, so that load from other jobs and thermal drift hit both alike.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn

from ..models import UnknownModelError, VariantSpec, create_model, get_variant, list_models
from ._checks import check_device, check_positive_int
from .counting import count_flops, count_flops_meta, count_params
from .speed import Timing, measure_latency, peak_memory_mb, prepare_forward, time_interleaved

__all__ = ["BASELINES", "BenchRow", "bench_models", "resolve_names", "timm_baseline"]

BASELINES = ("timm",)


@dataclass
class BenchRow:
    """One model's measurements. ``gflops`` is torch's count (2 per MAC); ``gmacs`` is what papers call FLOPs."""

    model: str
    img_size: int
    in_chans: int
    batch_size: int
    device: str
    amp: bool
    compile: bool
    channels_last: bool
    params_m: float
    gflops: float
    gmacs: float
    img_per_s: float
    img_per_s_min: float
    img_per_s_max: float
    latency_ms: float | None = None
    peak_mem_mb: float | None = None
    baseline: str | None = None
    baseline_img_per_s: float | None = None
    ratio: float | None = None
    note: str = ""

    @property
    def flags(self) -> str:
        """The run's flags as one short string, e.g. ``"fp32"`` or ``"amp,compile"``."""
        on = [name for name in ("amp", "compile", "channels_last") if getattr(self, name)]
        return ",".join(on) or "fp32"


def resolve_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Check every name (shell patterns such as ``vit_*`` expand) before anything is timed.

    Raises:
        UnknownModelError: for a name vitlab does not know (closest names suggested), or a pattern matching none.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("no model names given")
    resolved: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            matched = list_models(name)
            if not matched:
                raise UnknownModelError(f"no vitlab model matches {name!r}. See `vitlab list`.")
        else:
            get_variant(name)
            matched = [name]
        resolved += [m for m in matched if m not in resolved]
    return resolved


def timm_baseline(
    name: str, spec: VariantSpec, user_kwargs: dict[str, Any], ours: nn.Module
) -> tuple[nn.Module | None, str]:
    """timm's own implementation of ``name``'s architecture, or None and the reason there is none.

    * timm-native variants: ``timm.create_model(name, **user_kwargs)``, without vitlab's default kwargs but
      with our model's class count.
    * variants vitlab builds from a timm class: that class built with the variant's kwargs, kept only
      if its parameter count equals ours (a builder may turn a kwarg into something else).
    * vitlab's own classes: no baseline.
    """
    if spec.timm_native:
        # same head as ours: some timm defaults differ (TinyViT-224's default cfg has 21841 classes)
        kwargs = {"num_classes": getattr(ours, "num_classes", spec.num_classes), **user_kwargs}
        return timm.create_model(name, **kwargs), ""
    cls = type(ours)
    if not cls.__module__.startswith("timm."):
        return None, f"no timm baseline: {cls.__name__} is vitlab's own implementation"
    kwargs = {**spec.kwargs, **user_kwargs}
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    try:
        base = cls(**kwargs)
    except Exception as err:  # any constructor error means there is no like-for-like timm model
        return None, f"no timm baseline: timm {cls.__name__}(**kwargs) failed ({err})"
    if count_params(base) != count_params(ours):
        return None, f"no timm baseline: timm {cls.__name__} with the variant's kwargs differs from ours"
    return base, f"baseline is timm {cls.__name__} built with the variant's kwargs"


def _check_optional_int(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_models(
    names: list[str],
    img_size: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    amp: bool = False,
    compile: bool = False,
    channels_last: bool = False,
    baseline: str | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
    min_seconds: float = 2.0,
    latency: bool = True,
    progress: Callable[[str], None] | None = None,
    build: Callable[[str], nn.Module] | None = None,
) -> list[BenchRow]:
    """Measure each model (names or shell patterns) at a fixed batch size; one ``BenchRow`` per model.

    ``build(name)`` builds models this package does not know (task models: ``vitlab bench --task``); each must
    carry ``in_chans`` and ``img_size``, and gets no baseline.

    Args:
        names: vitlab model names or patterns (``"deit_*"``); all are checked before any timing.
        img_size: input resolution (default: each variant's); also passed to the model builder.
        batch_size: images per timed forward.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        amp: autocast (bfloat16 on CPU; bfloat16 or float16 on CUDA).
        compile: ``torch.compile`` the models; falls back to eager with a warning if it fails.
        channels_last: channels-last weights and input.
        baseline: ``"timm"`` to time timm's implementation of the same architecture alongside.
        in_chans: input channels (default: each variant's).
        num_classes: classifier size (default: each variant's).
        warmup: untimed forwards per model before timing.
        repeats: timed forwards per model (median reported).
        min_seconds: keep repeating until this much time has passed (steadies fast models).
        latency: also measure batch-1 latency.
        progress: called with a line of text before each model.

    Raises:
        UnknownModelError: an unknown model name (with suggestions), before anything runs.
        ValueError: a bad ``img_size``, ``batch_size``, ``in_chans``, ``num_classes``, device or baseline.
    """
    check_positive_int("batch_size", batch_size)
    _check_optional_int("img_size", img_size)
    _check_optional_int("in_chans", in_chans)
    _check_optional_int("num_classes", num_classes)
    dev = check_device(device)
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline must be None or one of {BASELINES}, got {baseline!r}")
    resolved = resolve_names(names) if build is None else list(names)
    user = {k: v for k, v in (("img_size", img_size), ("in_chans", in_chans), ("num_classes", num_classes)) if v}
    timing = _TimingPlan(dev, batch_size, amp, compile, channels_last, warmup, repeats, min_seconds, latency)
    rows = []
    for i, name in enumerate(resolved):
        if progress is not None:
            progress(f"[{i + 1}/{len(resolved)}] {name}")
        rows.append(_bench_one(name, user, baseline, timing) if build is None else _bench_built(name, build, timing))
        _free(dev)
    return rows


@dataclass(frozen=True)
class _TimingPlan:
    device: torch.device
    batch_size: int
    amp: bool
    compile: bool
    channels_last: bool
    warmup: int
    repeats: int
    min_seconds: float
    latency: bool


def _bench_built(name: str, build: Callable[[str], nn.Module], plan: _TimingPlan) -> BenchRow:
    model = build(name)
    input_size = (model.in_chans, model.img_size, model.img_size)
    frames = getattr(model, "num_frames", None)  # video task models take clips (B, T, C, H, W)
    if frames:
        input_size = (frames, *input_size)
    note = f"clips of {frames} frames: img/s counts clips" if frames else ""
    return _measure(name, model, input_size, count_flops(model, input_size), None, note, plan)


def _bench_one(name: str, user: dict[str, Any], baseline: str | None, plan: _TimingPlan) -> BenchRow:
    spec = get_variant(name)
    size, chans = user.get("img_size") or spec.img_size, user.get("in_chans") or spec.in_chans
    input_size = (chans, size, size)
    ours = create_model(name, **user)
    try:
        flops = count_flops_meta(name, **user)
    except Exception:  # data-dependent forwards cannot run on meta; count the real model instead
        flops = count_flops(ours, input_size)
    base, note = timm_baseline(name, spec, user, ours) if baseline == "timm" else (None, "")
    return _measure(name, ours, input_size, flops, base, note, plan, baseline)


def _measure(
    name: str,
    ours: nn.Module,
    input_size: tuple[int, ...],
    flops: int,
    base: nn.Module | None,
    note: str,
    plan: _TimingPlan,
    baseline: str | None = None,
) -> BenchRow:
    size, chans = input_size[-2], input_size[-3]
    params = count_params(ours)
    notes = [note] if note else []
    flags = {"amp": plan.amp, "channels_last": plan.channels_last}
    models = [ours] if base is None else [ours, base]
    prepared = [
        prepare_forward(m, input_size, plan.batch_size, plan.device, compile=plan.compile, **flags) for m in models
    ]
    compiled = prepared[0][1]
    if plan.compile and not all(c for _, c in prepared):
        failed = "ours: eager timings" if not compiled else "timm's model: eager baseline"
        notes.append(f"torch.compile failed for {failed}")
    seconds = time_interleaved([step for step, _ in prepared], plan.warmup, plan.repeats, plan.min_seconds)
    timings = [Timing(plan.batch_size, t, plan.warmup, compiled) for t in seconds]
    del prepared, models, base
    row = BenchRow(
        model=name,
        img_size=size,
        in_chans=chans,
        batch_size=plan.batch_size,
        device=str(plan.device),
        amp=plan.amp,
        compile=compiled,
        channels_last=plan.channels_last,
        params_m=params / 1e6,
        gflops=flops / 1e9,
        gmacs=flops / 2e9,
        img_per_s=timings[0].img_per_s,
        img_per_s_min=timings[0].img_per_s_min,
        img_per_s_max=timings[0].img_per_s_max,
        baseline=baseline,
        note="; ".join(notes),
    )
    if len(timings) > 1:
        row.baseline_img_per_s = timings[1].img_per_s
        row.ratio = row.img_per_s / row.baseline_img_per_s
    if plan.latency:
        kw = {"compile": compiled, "warmup": plan.warmup, "repeats": plan.repeats, "min_seconds": plan.min_seconds}
        row.latency_ms = measure_latency(ours, input_size, plan.device, **kw, **flags).latency_ms
    row.peak_mem_mb = peak_memory_mb(ours, input_size, plan.batch_size, plan.device, **flags)
    return row
