"""Evolutionary search under a MAC budget (ViT-ResNAS, arXiv:2109.00642 Sec. 3.3; official
``evo_search.py`` / ``search_utils/evolver.py``: initial population 500, 20 iterations, 75 parents, 75 mutations,
75 crossovers, mutation probability 0.3).

A short search of our own (no dependency): an initial population drawn uniformly from the space under the
budget; then each iteration keeps the best ``parents`` of everything scored so far, and adds ``mutations``
children (each choice redrawn with probability ``mutation_prob``) and ``crossovers`` children (each stage's
width and each block taken from either of two parents), every child under the budget and not seen before.
Scores are cached per architecture; the same seed gives the same search.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .supernet import Arch, SearchSpace

__all__ = ["EvolutionConfig", "SearchResult", "crossover", "evolutionary_search", "mutate"]

_MAX_TRIES = 200  # draws per wanted child before giving up (a budget the space can hardly meet)


@dataclass(frozen=True)
class EvolutionConfig:
    """The search's sizes (the official defaults) and its seed."""

    population: int = 500
    iterations: int = 20
    parents: int = 75
    mutations: int = 75
    crossovers: int = 75
    mutation_prob: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "parents"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvolutionConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iterations", "mutations", "crossovers"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvolutionConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"EvolutionConfig.mutation_prob must be in [0, 1], got {self.mutation_prob}")


@dataclass
class SearchResult:
    """The best architecture, its score and MACs, and every scored architecture in the order scored."""

    best: Arch
    score: float
    macs: int
    history: list[tuple[Arch, float, int]] = field(default_factory=list)


def mutate(space: SearchSpace, arch: Arch, prob: float, rng: random.Random) -> Arch:
    """Redraw each choice of ``arch`` (stage widths, heads, MLP widths, on/off of skippable blocks) with ``prob``."""
    embed = tuple(
        rng.choice(s.embed) if rng.random() < prob else e for s, e in zip(space.stages, arch.embed, strict=True)
    )
    blocks = []
    for s, stage in zip(space.stages, arch.blocks, strict=True):
        genes = []
        for j, (h, m, on) in enumerate(stage):
            h = rng.choice(s.heads) if rng.random() < prob else h
            m = rng.choice(s.mlp) if rng.random() < prob else m
            on = (rng.random() < 0.5) if j in s.skippable and rng.random() < prob else on
            genes.append((h, m, on))
        blocks.append(tuple(genes))
    return Arch(embed, tuple(blocks))


def crossover(a: Arch, b: Arch, rng: random.Random) -> Arch:
    """Each stage width and each block from ``a`` or ``b`` with equal chance."""
    embed = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.embed, b.embed, strict=True))
    blocks = tuple(
        tuple(x if rng.random() < 0.5 else y for x, y in zip(sa, sb, strict=True))
        for sa, sb in zip(a.blocks, b.blocks, strict=True)
    )
    return Arch(embed, blocks)


def evolutionary_search(
    space: SearchSpace,
    score: Callable[[Arch], float],
    budget: int,
    config: EvolutionConfig | None = None,
    macs: Callable[[Arch], int] | None = None,
) -> SearchResult:
    """Maximise ``score(arch)`` (e.g. held-out top-1 of the supernet's sub-network) over ``macs(arch) <= budget``.

    Args:
        space: the search space; ``macs`` defaults to ``space.macs`` (the counted MACs of the standalone network).
        score: higher is better; called once per distinct architecture.
        budget: the MAC limit (multiply-accumulates of one image).
    """
    config = config or EvolutionConfig()
    macs = macs or space.macs
    if budget < macs(space.smallest()):
        raise ValueError(f"budget {budget} MACs is below the space's smallest network ({macs(space.smallest())})")
    rng = random.Random(config.seed)
    scored: dict[Arch, tuple[float, int]] = {}
    history: list[tuple[Arch, float, int]] = []

    def add(arch: Arch, cost: int) -> None:
        value = float(score(arch))
        scored[arch] = (value, cost)
        history.append((arch, value, cost))

    def fill(count: int, make: Callable[[], Arch]) -> None:
        for _ in range(count):
            for _ in range(_MAX_TRIES):
                arch = make()
                if arch not in scored and (cost := macs(arch)) <= budget:
                    add(arch, cost)
                    break

    fill(config.population, lambda: space.sample(rng))
    if not scored:
        raise ValueError(f"no architecture under the budget of {budget} MACs found in {_MAX_TRIES} random draws")
    for _ in range(config.iterations):
        ranked = sorted(scored, key=lambda a: scored[a][0], reverse=True)[: config.parents]
        fill(config.mutations, lambda r=ranked: mutate(space, rng.choice(r), config.mutation_prob, rng))
        if len(ranked) > 1:
            fill(config.crossovers, lambda r=ranked: crossover(*rng.sample(r, 2), rng))
    best = max(scored, key=lambda a: scored[a][0])
    return SearchResult(best, scored[best][0], scored[best][1], history)
