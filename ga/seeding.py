"""One-shot heuristic for a starting point: drop the layers whose single removal hurts least."""
from __future__ import annotations

from typing import Sequence

from chromosomes import Gene


def single_skips(num_layers: int) -> list[list[int]]:
    """The chromosomes that each remove exactly one layer (index i skips layer i)."""
    return [[Gene.SKIP if j == i else Gene.KEEP for j in range(num_layers)] for i in range(num_layers)]


def least_harmful_first(perplexities: Sequence[float]) -> list[int]:
    """Layer indices ordered by the perplexity of removing that layer alone, lowest first."""
    return sorted(range(len(perplexities)), key=lambda i: (perplexities[i], i))


def remove_least_harmful(perplexities: Sequence[float], removed: int) -> list[int]:
    """The removal-importance baseline: skip the `removed` layers whose single removal hurts least."""
    dropped = set(least_harmful_first(perplexities)[:removed])
    return [Gene.SKIP if i in dropped else Gene.KEEP for i in range(len(perplexities))]
