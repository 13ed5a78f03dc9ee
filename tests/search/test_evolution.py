"""Evolutionary search: MAC budget respected, deterministic by seed, better than its random start, bad input refused."""

import random

import pytest

from vitlab.search import Arch, EvolutionConfig, SearchSpace, StageSpace, crossover, evolutionary_search, mutate

SPACE = SearchSpace(
    (
        StageSpace(embed=(16, 12, 8), heads=(3, 2, 1), mlp=(32, 24, 16), head_dim=8, depth=3, skippable=(1, 2)),
        StageSpace(embed=(32, 24, 16), heads=(4, 2, 1), mlp=(64, 40, 24), head_dim=8, depth=3, skippable=(1, 2)),
    ),
    patch_size=4,
    stem_chans=8,
)
CFG = EvolutionConfig(population=20, iterations=4, parents=5, mutations=8, crossovers=8, mutation_prob=0.3, seed=3)
BUDGET = (SPACE.macs(SPACE.smallest()) + SPACE.macs(SPACE.largest())) // 2


def _score(arch: Arch) -> float:
    # a stand-in for held-out accuracy: prefers wide late stages and MLP width, penalises heads in stage 0
    return (
        2 * arch.embed[1]
        + sum(m for m, on in ((g[1], g[2]) for g in arch.blocks[1]) if on)
        - sum(g[0] for g in arch.blocks[0])
    )


def test_every_scored_arch_respects_the_budget_and_is_valid():
    result = evolutionary_search(SPACE, _score, BUDGET, CFG)
    assert result.macs <= BUDGET
    assert result.macs == SPACE.macs(result.best)
    assert len(result.history) > CFG.population
    for arch, _, macs in result.history:
        SPACE.validate(arch)
        assert macs <= BUDGET
    assert len({a for a, _, _ in result.history}) == len(result.history)  # each architecture scored once


def test_deterministic_by_seed_and_seed_matters():
    a = evolutionary_search(SPACE, _score, BUDGET, CFG)
    b = evolutionary_search(SPACE, _score, BUDGET, CFG)
    assert [h[0] for h in a.history] == [h[0] for h in b.history]
    c = evolutionary_search(SPACE, _score, BUDGET, EvolutionConfig(**{**CFG.__dict__, "seed": 4}))
    assert [h[0] for h in a.history] != [h[0] for h in c.history]


def test_evolution_improves_on_its_initial_population():
    result = evolutionary_search(SPACE, _score, BUDGET, CFG)
    initial = max(s for _, s, _ in result.history[: CFG.population])
    assert result.score > initial


def test_mutation_and_crossover_stay_in_the_space():
    rng = random.Random(0)
    for _ in range(50):
        a, b = SPACE.sample(rng), SPACE.sample(rng)
        SPACE.validate(mutate(SPACE, a, 0.5, rng))
        child = crossover(a, b, rng)
        SPACE.validate(child)
        assert all(e in (x, y) for e, x, y in zip(child.embed, a.embed, b.embed, strict=True))
    assert mutate(SPACE, a, 0.0, rng) == a


@pytest.mark.parametrize(
    "bad", [{"population": 0}, {"parents": 0}, {"iterations": -1}, {"mutations": -2}, {"mutation_prob": 1.5}]
)
def test_bad_config_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EvolutionConfig(**bad)


def test_budget_below_smallest_network_errors():
    with pytest.raises(ValueError, match="budget"):
        evolutionary_search(SPACE, _score, SPACE.macs(SPACE.smallest()) - 1, CFG)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--space", "big"], "unknown search space"),
        (["--batch-size", "100", "--example-per-arch", "32"], "multiple of example_per_arch"),
        (["--budget-mmacs", "0"], "budget_mmacs"),
        (["--population", "0"], "population"),
    ],
)
def test_search_command_refuses_bad_input_in_one_line(argv, message, tmp_path, capsys):
    from vitlab.cli import run

    assert run(["search", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
