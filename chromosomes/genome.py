"""The genome: one gene per decoder layer, and the rules a valid genome obeys.

A gene is
  0          the layer is removed (SKIP),
  1          the layer is kept whole (KEEP; it may serve as a merge anchor),
  2          the layer is fused into the nearest preceding kept layer, which must be whole (MERGE),
  (h, c)     the layer is kept narrowed: h key-value groups of its attention (each a key-value head
             with the query heads that share it) and c channels of its MLP; h = 0 or c = 0 removes
             that sub-layer. Which groups and channels stay is the evaluator's business (its
             ranking of each layer's units); the genome only counts them.
A depth chromosome of 0, 1 and 2 is a genome without pairs, so every chromosome saved before
widths existed reads, scores and resumes as it did. Text form: the digits, with a pair written
`[h.c]` ("11[2.1344]02..."); JSON form: a list of 0, 1, 2 and [h, c].

This module is deliberately free of torch, DEAP and Ray: it is the vocabulary that the
GA, the evaluators and the finetuner share, and it must stay cheap to import and test.
"""
from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass
from typing import Sequence, Union

LayerGene = Union[int, tuple[int, int]]


class Gene(enum.IntEnum):
    SKIP = 0  # drop the layer
    KEEP = 1  # keep the layer as it is (it may serve as a merge anchor)
    MERGE = 2  # fuse the layer into the nearest preceding KEEP layer


class ChromosomeError(ValueError):
    """A chromosome that cannot describe a model: the message names what is wrong."""


@dataclass(frozen=True)
class Block:
    """One layer of the compact model: an anchor layer plus the layers fused into it, with the
    key-value groups and MLP channels it keeps (None: all of them)."""

    anchor: int
    merged: tuple[int, ...] = ()
    kv_heads: int | None = None
    channels: int | None = None

    @property
    def whole(self) -> bool:
        return self.kv_heads is None and self.channels is None


def _gene(value: object, position: int) -> LayerGene:
    """One gene as the genome holds it: an int 0, 1, 2 or a tuple pair (JSON gives lists)."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            if tuple(value) == (0, 0):
                raise ChromosomeError(f"gene {position} keeps nothing of the layer: write 0 to remove it")
            return int(value[0]), int(value[1])
    elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1, 2):
        return int(value)
    raise ChromosomeError(f"gene {position} is {value!r}; genes must be 0 (skip), 1 (keep), 2 (merge) or "
                          "[key-value heads, MLP channels] kept")


def keeps(gene: LayerGene) -> bool:
    """Whether the layer is in the compact model as a layer of its own (whole or narrowed)."""
    return gene == Gene.KEEP or isinstance(gene, tuple)


def validate(genes: Sequence[object], num_layers: int | None = None) -> tuple[LayerGene, ...]:
    """Return the genes as a tuple (pairs as tuples), or raise ChromosomeError naming the first problem."""
    genes = tuple(genes)
    if num_layers is not None and len(genes) != num_layers:
        raise ChromosomeError(
            f"chromosome has {len(genes)} genes but the model has {num_layers} decoder layers"
        )
    if not genes:
        raise ChromosomeError("chromosome is empty")
    genes = tuple(_gene(gene, position) for position, gene in enumerate(genes))
    if not any(keeps(gene) for gene in genes):
        raise ChromosomeError("chromosome keeps no layer: at least one gene must be 1 (keep) or a pair")
    anchor: LayerGene | None = None
    for position, gene in enumerate(genes):
        if gene == Gene.MERGE and anchor != Gene.KEEP:
            raise ChromosomeError(
                f"gene {position} is MERGE but no KEEP layer precedes it to merge into" if anchor is None else
                f"gene {position} is MERGE but the layer it would fuse into is narrowed; merge only into a whole layer")
        if keeps(gene):
            anchor = gene
    return genes


def blocks(genes: Sequence[object]) -> tuple[Block, ...]:
    """The compact model's layers in order: each kept layer with the MERGE genes that follow it."""
    genes = validate(genes)
    result: list[Block] = []
    for position, gene in enumerate(genes):
        if gene == Gene.KEEP:
            result.append(Block(position))
        elif isinstance(gene, tuple):
            result.append(Block(position, kv_heads=gene[0], channels=gene[1]))
        elif gene == Gene.MERGE:
            last = result[-1]
            result[-1] = Block(last.anchor, last.merged + (position,))
    return tuple(result)


def layers_removed(genes: Sequence[object]) -> int:
    """Layers gone as layers of their own: skipped or fused into another (a narrowed layer stays)."""
    return sum(1 for gene in validate(genes) if not keeps(gene))


def budget(num_layers: int, remove: int | None = None, ratio: float | None = None) -> int:
    """Number of layers to remove, from an absolute count or a fraction of the decoder layers."""
    if (remove is None) == (ratio is None):
        raise ChromosomeError("give exactly one of remove (a layer count) or ratio (a fraction)")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ChromosomeError(f"ratio must lie strictly between 0 and 1, got {ratio}")
        remove = int(round(ratio * num_layers))
    assert remove is not None
    if not 0 < remove < num_layers:
        raise ChromosomeError(
            f"cannot remove {remove} of {num_layers} layers: the budget must lie in 1..{num_layers - 1}"
        )
    return remove


def _removal_gene(rng: random.Random, allow_merge: bool) -> int:
    return rng.choice((Gene.SKIP, Gene.MERGE)) if allow_merge else Gene.SKIP


def repair(
    genes: Sequence[int], removed: int, rng: random.Random, allow_merge: bool = True
) -> list[int]:
    """Bring a depth gene list (0, 1, 2) to exactly `removed` non-KEEP genes and make it valid.

    Crossover and mutation may break the budget or leave a MERGE with nothing to merge into;
    repair changes as few genes as it can, choosing which ones at random from `rng`.
    """
    genes = [int(g) for g in genes]
    num_layers = len(genes)
    if not 0 < removed < num_layers:
        raise ChromosomeError(f"cannot remove {removed} of {num_layers} layers")
    if not allow_merge:
        genes = [Gene.SKIP if g == Gene.MERGE else g for g in genes]
    kept = [i for i, g in enumerate(genes) if g == Gene.KEEP]
    dropped = [i for i, g in enumerate(genes) if g != Gene.KEEP]
    excess = len(dropped) - removed
    if excess > 0:
        for i in rng.sample(dropped, excess):
            genes[i] = Gene.KEEP
    elif excess < 0:
        for i in rng.sample(kept, -excess):
            genes[i] = _removal_gene(rng, allow_merge)
    first_keep = genes.index(Gene.KEEP)
    for i in range(first_keep):
        genes[i] = Gene.SKIP  # a MERGE before any KEEP has no anchor; SKIP spends the same budget
    return [int(g) for g in genes]


def random_chromosome(
    num_layers: int, removed: int, rng: random.Random, allow_merge: bool = True
) -> list[int]:
    """A uniformly placed feasible depth chromosome with exactly `removed` layers removed."""
    return repair([Gene.KEEP] * num_layers, removed, rng, allow_merge)


def to_string(genes: Sequence[object]) -> str:
    """Compact, sortable text form ("11[2.1344]02...") used as a cache key and in logs."""
    return "".join(f"[{gene[0]}.{gene[1]}]" if isinstance(gene, (tuple, list)) else str(int(gene))
                   for gene in genes)


_TOKEN = re.compile(r"\[(\d+)\.(\d+)\]|([012])")


def from_string(text: str) -> tuple[LayerGene, ...]:
    tokens = list(_TOKEN.finditer(text))
    if not text or sum(len(t.group(0)) for t in tokens) != len(text):
        raise ChromosomeError(f"{text!r} is not a chromosome string of 0, 1, 2 and [heads.channels]")
    return validate(int(t.group(3)) if t.group(3) else (int(t.group(1)), int(t.group(2))) for t in tokens)


def to_json(genes: Sequence[object]) -> list:
    """The JSON form: 0, 1, 2 as numbers and a pair as [heads, channels]."""
    return [list(gene) if isinstance(gene, (tuple, list)) else int(gene) for gene in genes]
