"""A fitness with a planted optimum, for testing the search itself without a model."""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from chromosomes import to_string, validate
from evaluators.fitness import Fitness


class PlantedEvaluator:
    """Perplexity grows with the Hamming distance to a hidden chromosome: 10 at the optimum."""

    def __init__(self, target: Sequence[int]):
        self.target = tuple(target)
        self.num_layers = len(target)
        self.calls: Counter[str] = Counter()  # full evaluations per chromosome
        self.screened: Counter[str] = Counter()  # evaluations on a prefix of the scoring tokens

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        results = []
        for genes in population:
            genes = validate(genes, self.num_layers)
            (self.calls if tokens is None else self.screened)[to_string(genes)] += 1
            distance = sum(a != b for a, b in zip(genes, self.target))
            ppl = 10.0 + distance + 0.01 * sum(i * g for i, g in enumerate(genes)) / self.num_layers
            results.append(Fitness(ppl, math.log(ppl), 100))
        return results

    def block_influence(self) -> list[float]:
        """Low where the optimum removes a layer, with the last two layers swapped in rank (a
        heuristic that is close but not exact)."""
        influence = [0.0 if gene != 1 else 1.0 for gene in self.target]
        influence[-1], influence[-2] = influence[-2], influence[-1]
        return influence

    def describe(self) -> dict:
        return {"model": "planted", "num_layers": self.num_layers, "data": "synthetic", "seq_len": 1024, "tokens": 4 * 1023}
