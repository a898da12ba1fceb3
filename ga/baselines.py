"""Reference searches on the same Evaluator interface, for the benchmarks against the GA."""
from __future__ import annotations

import random
from dataclasses import dataclass

from chromosomes import LayerGene, random_chromosome, repair, to_string
from chromosomes.space import level_switch
from evaluators.fitness import Evaluator, Fitness
from ga.problem import Problem


@dataclass(frozen=True)
class SearchResult:
    genes: list[LayerGene]
    fitness: Fitness
    evaluations: float  # distinct chromosomes scored (full-fidelity equivalents)


def random_search(evaluator: Evaluator, removed: int, evaluations: int, seed: int, merge: bool = True,
                  batch: int = 32) -> SearchResult:
    """Score `evaluations` distinct random feasible chromosomes and keep the best."""
    rng = random.Random(seed)
    seen: set[str] = set()
    best: tuple[list[int], Fitness] | None = None
    while len(seen) < evaluations:
        fresh: list[list[int]] = []
        while len(fresh) < min(batch, evaluations - len(seen)):
            genes = random_chromosome(evaluator.num_layers, removed, rng, merge)
            if to_string(genes) not in seen:
                seen.add(to_string(genes))
                fresh.append(genes)
        for genes, fitness in zip(fresh, evaluator.evaluate(fresh)):
            if best is None or fitness.value < best[1].value:
                best = (genes, fitness)
    assert best is not None
    return SearchResult(best[0], best[1], len(seen))


def _swap_mutation(parent: list[int], rng: random.Random, merge: bool) -> list[int]:
    """EvoPress's level switch over whole layers: 1 to 3 times, a removed layer comes back and a kept one goes."""
    child = list(parent)
    for _ in range(rng.randint(1, 3)):
        dropped = [i for i, g in enumerate(child) if g != 1]
        kept = [i for i, g in enumerate(child) if g == 1]
        i, j = rng.choice(dropped), rng.choice(kept)
        child[i], child[j] = 1, (rng.choice((0, 2)) if merge else 0)
    return repair(child, sum(g != 1 for g in parent), rng, merge)


def level_switches(parent: list[LayerGene], problem: Problem, rng: random.Random) -> list[LayerGene]:
    """EvoPress's level switch on a space with widths: 1 to 3 times a sub-layer gains a level and
    another loses one, then the budget is restored."""
    child = list(parent)
    for _ in range(rng.randint(1, 3)):
        child = level_switch(child, problem.space, rng, problem.guide)
    return problem.project(child, rng)


def evopress_search(evaluator: Evaluator, problem: Problem, evaluations: float, seed: int, full_tokens: int,
                    offspring: int = 16, survivors: int = 2, screen_tokens: int | None = None,
                    start: list[LayerGene] | None = None) -> SearchResult:
    """EvoPress-style (1 + lambda) search with staged selection, on the problem's space.

    Each generation mutates the parent into `offspring` children (level switches), scores all of
    them on `screen_tokens` tokens, re-scores the best `survivors` on all `full_tokens`, and the
    best of those replaces the parent if it beats it. The budget is counted in full-evaluation
    equivalents (a screening costs screen_tokens / full_tokens of one). The first parent is
    `start`, or a random genome of the problem.
    """
    rng = random.Random(seed)
    screen_tokens = screen_tokens or max(1, full_tokens // 8)
    screen_cost = screen_tokens / full_tokens
    full: dict[str, Fitness] = {}
    parent = list(start) if start is not None else problem.individual(rng)
    full[to_string(parent)], = evaluator.evaluate([parent])
    spent = 1.0
    while spent + offspring * screen_cost + survivors <= evaluations:
        if problem.layers is not None:
            children = [_swap_mutation(parent, rng, problem.space.merge) for _ in range(offspring)]
        else:
            children = [level_switches(parent, problem, rng) for _ in range(offspring)]
        screened = evaluator.evaluate(children, tokens=screen_tokens)
        spent += offspring * screen_cost
        ranked = sorted(zip(children, screened), key=lambda pair: pair[1].value)[:survivors]
        fresh = [genes for genes, _ in ranked if to_string(genes) not in full]
        for genes, fitness in zip(fresh, evaluator.evaluate(fresh) if fresh else []):
            full[to_string(genes)] = fitness
        spent += len(fresh)
        best = min((genes for genes, _ in ranked), key=lambda g: full[to_string(g)].value)
        if full[to_string(best)].value < full[to_string(parent)].value:
            parent = best
    return SearchResult(parent, full[to_string(parent)], spent)
