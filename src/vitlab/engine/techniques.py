"""The training techniques a run may combine, in the order they are installed (one line each)."""

from __future__ import annotations

from .config import RunConfig
from .technique import Setup, Technique

__all__ = ["TECHNIQUES", "active_techniques", "install_techniques", "validate_techniques"]


def _registry() -> list[Technique]:
    from . import compress_train, distill, fast_distill, hcs, multires, reduce_train, task_objective

    return [
        task_objective.TECHNIQUE,
        reduce_train.TECHNIQUE,
        compress_train.TECHNIQUE,
        hcs.TECHNIQUE,
        multires.TECHNIQUE,
        multires.CURRICULUM,
        distill.TECHNIQUE,
        fast_distill.TECHNIQUE,
    ]


class _Lazy:
    # the technique modules import config; build the list at first use
    def __iter__(self):
        return iter(_registry())


TECHNIQUES = _Lazy()


def active_techniques(cfg: RunConfig) -> list[Technique]:
    return [t for t in TECHNIQUES if t.is_on(cfg)]


def validate_techniques(cfg: RunConfig) -> None:
    """Each active technique's own checks, then the exclusions each declares."""
    for t in TECHNIQUES:
        if t.validate is not None:
            t.validate(cfg)
    active = active_techniques(cfg)
    flags = {t.flag for t in active}
    for t in active:
        for other in t.excludes:
            if other in flags:
                raise ValueError(f"{t.flag} ({t.what}) cannot be combined with {other}")


def install_techniques(setup: Setup, stage: str) -> None:
    """Run every active technique's ``adapt_model`` or ``install`` step, in registry order."""
    for t in active_techniques(setup.cfg):
        fn = t.adapt_model if stage == "model" else t.install
        if fn is not None:
            fn(setup)
