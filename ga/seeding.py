"""One-shot heuristics for a starting point: drop the layers that score lowest on some cheap measure.

Two measures are used: the perplexity of removing each layer alone (removal importance: one
evaluation per layer), and ShortGPT's Block Influence (how much a layer changes its input: one
forward of the dense model). Both are also the one-shot baselines the search is compared with.
"""
from __future__ import annotations

import math
from typing import Sequence

from chromosomes import Gene


def single_skips(num_layers: int) -> list[list[int]]:
    """The chromosomes that each remove exactly one layer (index i skips layer i)."""
    return [[Gene.SKIP if j == i else Gene.KEEP for j in range(num_layers)] for i in range(num_layers)]


def skip_lowest(scores: Sequence[float], removed: int) -> list[int]:
    """Skip the `removed` layers of lowest score (ties: the earlier layer), keep the others."""
    dropped = set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:removed])
    return [Gene.SKIP if i in dropped else Gene.KEEP for i in range(len(scores))]


def drop_weights(single_skip_nll: Sequence[float], removed: int) -> list[float]:
    """How readily mutation should propose removing each layer, from what removing it alone cost.

    Removing one of a few layers (the first, the last) raises perplexity a thousandfold, and any
    chromosome without it is hopeless; proposing such moves uniformly left 23 of a real search's
    52 evaluations at twice the seed's perplexity or worse. The weight falls as exp(-excess / scale), where excess is how much more
    the layer's single removal costs (in nll) than the cheapest, and scale is that excess for the
    layer ranked 2 x `removed`: the layers the budget could plausibly take stay likely, the
    catastrophic ones vanish, and no constant depends on the model or its perplexity.
    """
    ranked = sorted(single_skip_nll)
    scale = ranked[min(2 * removed, len(ranked) - 1)] - ranked[0]
    if scale <= 0:
        return [1.0] * len(ranked)
    return [math.exp(-(nll - ranked[0]) / scale) for nll in single_skip_nll]
