"""The task-model registry: ``register_task``, ``list_tasks``, ``get_task`` and ``create_task_model``.

Task models keep their own registry (timm's registry keeps backbones, DESIGN.md "Tasks"); its rows are
``TaskSpec``s. Unknown names raise ``UnknownTaskError`` with the closest names (difflib), in the style of
``models.UnknownModelError``.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from ..errors import VitlabError, did_you_mean
from .base import TaskModel, TaskSpec

__all__ = ["TASKS", "UnknownTaskError", "create_task_model", "get_task", "list_tasks", "register_task"]

# name -> spec of every registered task model
TASKS: dict[str, TaskSpec] = {}


class UnknownTaskError(VitlabError, ValueError):
    """A task-model name that is not registered."""


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add ``spec`` to the registry; its metric must be the one its model class reports."""
    if spec.name in TASKS:
        raise ValueError(f"task model {spec.name!r} is registered twice")
    if not spec.exportable and not spec.export_reason:
        raise ValueError(f"task model {spec.name!r} declares exportable=False without an export_reason")
    if spec.backbones not in ("any", "isotropic", "hierarchical"):
        raise ValueError(f"task model {spec.name!r}: backbones must be 'any', 'isotropic' or 'hierarchical'")
    if spec.backbones != "any" and not spec.backbones_reason:
        raise ValueError(f"task model {spec.name!r} takes only {spec.backbones} backbones; give a backbones_reason")
    builder = spec.builder
    if isinstance(builder, type) and issubclass(builder, TaskModel):
        declared = (builder.primary_metric, builder.higher_is_better)
        if declared != (spec.metric, spec.higher_is_better):
            raise ValueError(
                f"task model {spec.name!r}: spec says metric {spec.metric!r} (higher_is_better="
                f"{spec.higher_is_better}) but {builder.__name__} reports {declared[0]!r} ({declared[1]})"
            )
    TASKS[spec.name] = spec
    return spec


def list_tasks(pattern: str = "*") -> list[str]:
    """Names of registered task models matching a shell-style ``pattern``."""
    return sorted(n for n in TASKS if fnmatch.fnmatchcase(n, pattern))


def get_task(name: str) -> TaskSpec:
    """The spec of task model ``name``; an unknown name suggests the close ones."""
    if name in TASKS:
        return TASKS[name]
    raise UnknownTaskError(
        f"unknown task model {name!r}.{did_you_mean(name, TASKS)} Known: {', '.join(list_tasks()) or 'none'}."
    )


def create_task_model(
    name: str,
    backbone: str | None = None,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TaskModel:
    """Build task model ``name`` on ``backbone`` (any vitlab or timm model name; default the spec's).

    ``num_classes`` (background included), ``in_chans`` and ``img_size`` default to the spec's dataset;
    ``backbone_kwargs`` go to the backbone's constructor, other keywords to the task model's.
    """
    spec = get_task(name)
    model = spec.builder(
        backbone=backbone or spec.default_backbone,
        num_classes=spec.num_classes if num_classes is None else num_classes,
        in_chans=spec.in_chans if in_chans is None else in_chans,
        img_size=spec.img_size if img_size is None else img_size,
        backbone_kwargs=backbone_kwargs,
        **{**spec.kwargs, **kwargs},
    )
    model.task_name = spec.name
    return model
