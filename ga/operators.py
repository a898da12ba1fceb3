"""Variation operators that keep every individual on the exact layer budget.

They work on plain gene lists (DEAP individuals are lists), drawing from the `rng` they are
given, and end with `repair`, so that whatever crossover or mutation did, the child removes
exactly `removed` layers and is valid.
"""
from __future__ import annotations

import random
from typing import MutableSequence, Sequence

from deap import tools

from chromosomes import Gene, LayerGene, Shape, repair


def _write(individual: MutableSequence[int], genes: list[int]) -> None:
    individual[:] = genes


def weighted_choice(layers: Sequence[int], weights: Sequence[float] | None, rng: random.Random) -> int:
    """One of `layers`, in proportion to its weight (one per layer of the model); uniform without
    weights, or when every candidate's weight is 0 (none left to prefer)."""
    chances = [weights[k] for k in layers] if weights else []
    return rng.choices(layers, chances)[0] if sum(chances) > 0 else rng.choice(layers)


def removed_runs(genes: Sequence[int]) -> list[tuple[int, int]]:
    """(first, last) of each maximal run of neighbouring removed layers: the seams a repair closes."""
    runs: list[tuple[int, int]] = []
    for i, gene in enumerate(genes):
        if gene == Gene.KEEP:
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def seam_move(genes: list[int], rng: random.Random, weights: Sequence[float] | None) -> tuple[int, int] | None:
    """(i, j): give back a removed layer at the end of a run, remove a kept layer beside another
    run (or beside the far end of the same run: the run slides).

    Neither half splits a run, so the cut never gains a seam, and it loses one when `i` was a
    run of its own or `j` bridges two runs. Under seam repair, cuts with fewer runs of removed
    layers repair better (median repaired fitness of 8-of-30 cuts: 32.4 with 3 runs, 36.4 with
    8), and swaps drawn by single-layer cost alone keep the one-shot seed's scattered runs.
    None when no such move exists (a single removed layer: it can only jump, which a swap does).
    """
    runs = removed_runs(genes)
    sides = {k for first, last in runs for k in (first - 1, last + 1) if 0 <= k < len(genes) and genes[k] == Gene.KEEP}
    targets = {end: sorted(sides - {end - 1, end + 1}) for run in runs for end in run}
    movable = sorted(end for end, beside in targets.items() if beside)
    if not movable:
        return None
    i = rng.choice(movable)
    return i, weighted_choice(targets[i], weights, rng)


def mutate(individual: MutableSequence[int], removed: int, merge: bool, flip_prob: float,
           rng: random.Random, drop_weights: Sequence[float] | None = None,
           seam_prob: float = 0.0) -> tuple[MutableSequence[int]]:
    """Flip a removed layer SKIP<->MERGE, or move a removed position to a kept one: with
    `seam_prob` a move that never adds a seam (seam_move), else a swap anywhere.

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
        move = seam_move(genes, rng, drop_weights) if seam_prob and rng.random() < seam_prob else None
        if move:
            i, j = move
        else:
            i, j = rng.choice(dropped), weighted_choice(kept, drop_weights, rng)
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


def gene_frequencies(population: list[list[LayerGene]], shape: Shape) -> list[list[float]]:
    """[3][layers]: per layer, the share of the population that skips it, the mean share of its
    parameters kept (with depth genes: the share that keeps it), and the share that merges it."""
    n, layers = len(population), len(population[0])
    return [[sum(ind[i] == Gene.SKIP for ind in population) / n for i in range(layers)],
            [sum(shape.share(ind[i]) for ind in population) / n for i in range(layers)],
            [sum(ind[i] == Gene.MERGE for ind in population) / n for i in range(layers)]]
