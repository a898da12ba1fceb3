"""Variation operators that keep every individual on the exact layer budget.

They work on plain gene lists (DEAP individuals are lists), drawing from the `rng` they are
given, and end with `repair`, so that whatever crossover or mutation did, the child removes
exactly `removed` layers and is valid.
"""
from __future__ import annotations

import random
from typing import MutableSequence, Sequence

from deap import tools

from chromosomes import Gene, repair


def _write(individual: MutableSequence[int], genes: list[int]) -> None:
    individual[:] = genes


def mutate(individual: MutableSequence[int], removed: int, merge: bool, flip_prob: float,
           rng: random.Random, drop_weights: Sequence[float] | None = None) -> tuple[MutableSequence[int]]:
    """Move one removed position to a kept one (swap), or flip a removed layer SKIP<->MERGE.

    With `drop_weights` (one per layer) the kept layer to remove is drawn in proportion to its
    weight, so that moves the one-shot evidence calls hopeless are rarely proposed.
    """
    genes = list(individual)
    dropped = [i for i, g in enumerate(genes) if g != Gene.KEEP]
    kept = [i for i, g in enumerate(genes) if g == Gene.KEEP]
    if merge and rng.random() < flip_prob:
        i = rng.choice(dropped)
        genes[i] = Gene.MERGE if genes[i] == Gene.SKIP else Gene.SKIP
    else:
        i = rng.choice(dropped)
        weights = [drop_weights[k] for k in kept] if drop_weights else []
        j = rng.choices(kept, weights)[0] if sum(weights) > 0 else rng.choice(kept)  # none left to prefer: uniform
        genes[i], genes[j] = Gene.KEEP, genes[i]
    _write(individual, repair(genes, removed, rng, merge))
    return (individual,)


def crossover(first: MutableSequence[int], second: MutableSequence[int], removed: int, merge: bool,
              rng: random.Random) -> tuple[MutableSequence[int], MutableSequence[int]]:
    """DEAP's two-point crossover (it keeps runs of neighbouring layers together), then repair."""
    tools.cxTwoPoint(first, second)  # draws from the global `random`, which the engine keeps in step with rng
    _write(first, repair(list(first), removed, rng, merge))
    _write(second, repair(list(second), removed, rng, merge))
    return first, second


def mean_pairwise_hamming(population: list[list[int]]) -> float:
    """Diversity: the mean number of differing genes over all pairs of individuals."""
    n = len(population)
    if n < 2:
        return 0.0
    total = sum(sum(a != b for a, b in zip(population[i], population[j]))
                for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def gene_frequencies(population: list[list[int]]) -> list[list[float]]:
    """[3][layers]: share of the population with SKIP, KEEP, MERGE at each layer."""
    n, layers = len(population), len(population[0])
    return [[sum(ind[i] == gene for ind in population) / n for i in range(layers)] for gene in (0, 1, 2)]
