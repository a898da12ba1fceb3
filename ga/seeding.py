"""One-shot heuristics for a starting point: drop the layers that score lowest on some cheap measure.

Two measures are used: the perplexity of removing each layer alone (removal importance: one
evaluation per layer), and ShortGPT's Block Influence (how much a layer changes its input: one
forward of the dense model). Both are also the one-shot baselines the search is compared with.
Removal importance also comes per sub-layer (each attention and each MLP removed alone), for
spaces that can drop one without the other.
"""
from __future__ import annotations

import math
from typing import Sequence

from chromosomes import Gene, LayerGene, Shape
from chromosomes.space import KINDS


def single_skips(num_layers: int) -> list[list[int]]:
    """The chromosomes that each remove exactly one layer (index i skips layer i)."""
    return [[Gene.SKIP if j == i else Gene.KEEP for j in range(num_layers)] for i in range(num_layers)]


def skip_lowest(scores: Sequence[float], removed: int) -> list[int]:
    """Skip the `removed` layers of lowest score (ties: the earlier layer), keep the others."""
    dropped = set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:removed])
    return [Gene.SKIP if i in dropped else Gene.KEEP for i in range(len(scores))]


def single_sublayer_cuts(shape: Shape) -> list[list[LayerGene]]:
    """The genomes that each remove exactly one sub-layer: entry 2i drops layer i's attention,
    2i + 1 its MLP."""
    alone = {"attention": shape.gene(0, shape.channels), "mlp": shape.gene(shape.kv_heads, 0)}
    return [[alone[kind] if j == i else Gene.KEEP for j in range(shape.num_layers)]
            for i in range(shape.num_layers) for kind in KINDS]


def drop_cheapest_sublayers(shape: Shape, harms: Sequence[float], remove: int) -> list[LayerGene]:
    """Drop whole sub-layers in order of harm per parameter until at least `remove` parameters
    are gone (`harms` as `single_sublayer_cuts` orders them: what each removal alone cost).

    Per parameter, because an MLP here holds three times an attention's parameters: ranking by
    harm alone would drop the small attentions first and need many more cuts.
    """
    cost = {"attention": shape.attention_parameters(shape.kv_heads), "mlp": shape.mlp_parameters(shape.channels)}
    order = sorted(range(len(harms)), key=lambda i: (harms[i] / cost[KINDS[i % 2]], i))
    kept = [[shape.kv_heads, shape.channels] for _ in range(shape.num_layers)]
    genes = [shape.gene(*counts) for counts in kept]
    for index in order:
        if shape.removed(genes) >= remove:
            break
        layer, kind = divmod(index, 2)
        kept[layer][kind] = 0
        genes[layer] = shape.gene(*kept[layer])
    return genes


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
