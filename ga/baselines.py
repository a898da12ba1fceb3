"""Reference searches on the same Evaluator interface, for the benchmarks against the GA."""
from __future__ import annotations

import random
from dataclasses import dataclass

from chromosomes import random_chromosome, to_string
from evaluators.fitness import Evaluator, Fitness


@dataclass(frozen=True)
class SearchResult:
    genes: list[int]
    fitness: Fitness
    evaluations: int  # distinct chromosomes scored (full-fidelity equivalents)


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
            if best is None or fitness.perplexity < best[1].perplexity:
                best = (genes, fitness)
    assert best is not None
    return SearchResult(best[0], best[1], len(seen))
