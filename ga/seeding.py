"""One-shot heuristics for a starting point: drop the layers that score lowest on some cheap measure.

Two measures are used: the perplexity of removing each layer alone (removal importance: one
evaluation per layer), and ShortGPT's Block Influence (how much a layer changes its input: one
forward of the dense model). Both are also the one-shot baselines the search is compared with.
"""
from __future__ import annotations

from typing import Sequence

from chromosomes import Gene


def single_skips(num_layers: int) -> list[list[int]]:
    """The chromosomes that each remove exactly one layer (index i skips layer i)."""
    return [[Gene.SKIP if j == i else Gene.KEEP for j in range(num_layers)] for i in range(num_layers)]


def skip_lowest(scores: Sequence[float], removed: int) -> list[int]:
    """Skip the `removed` layers of lowest score (ties: the earlier layer), keep the others."""
    dropped = set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:removed])
    return [Gene.SKIP if i in dropped else Gene.KEEP for i in range(len(scores))]
