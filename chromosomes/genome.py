"""The genome: one gene per decoder layer, and the rules a valid genome obeys.

This module is deliberately free of torch, DEAP and Ray: it is the vocabulary that the
GA, the evaluators and the finetuner share, and it must stay cheap to import and test.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Sequence


class Gene(enum.IntEnum):
    SKIP = 0  # drop the layer
    KEEP = 1  # keep the layer as it is (it may serve as a merge anchor)
    MERGE = 2  # fuse the layer into the nearest preceding KEEP layer


class ChromosomeError(ValueError):
    """A chromosome that cannot describe a model: the message names what is wrong."""


@dataclass(frozen=True)
class Block:
    """One layer of the compact model: an anchor layer plus the layers fused into it."""

    anchor: int
    merged: tuple[int, ...] = ()


def validate(genes: Sequence[int], num_layers: int | None = None) -> tuple[int, ...]:
    """Return the genes as a tuple of ints, or raise ChromosomeError naming the first problem."""
    genes = tuple(genes)
    if num_layers is not None and len(genes) != num_layers:
        raise ChromosomeError(
            f"chromosome has {len(genes)} genes but the model has {num_layers} decoder layers"
        )
    if not genes:
        raise ChromosomeError("chromosome is empty")
    for position, gene in enumerate(genes):
        if isinstance(gene, bool) or not isinstance(gene, int) or gene not in (0, 1, 2):
            raise ChromosomeError(
                f"gene {position} is {gene!r}; genes must be 0 (skip), 1 (keep) or 2 (merge)"
            )
    if Gene.KEEP not in genes:
        raise ChromosomeError("chromosome keeps no layer: at least one gene must be 1 (keep)")
    first_keep = genes.index(Gene.KEEP)
    if Gene.MERGE in genes[:first_keep]:
        position = genes.index(Gene.MERGE)
        raise ChromosomeError(
            f"gene {position} is MERGE but no KEEP layer precedes it to merge into"
        )
    return genes


def blocks(genes: Sequence[int]) -> tuple[Block, ...]:
    """The compact model's layers in order: each KEEP gene with the MERGE genes that follow it."""
    genes = validate(genes)
    result: list[Block] = []
    for position, gene in enumerate(genes):
        if gene == Gene.KEEP:
            result.append(Block(position))
        elif gene == Gene.MERGE:
            last = result[-1]
            result[-1] = Block(last.anchor, last.merged + (position,))
    return tuple(result)


def layers_removed(genes: Sequence[int]) -> int:
    """The budget a chromosome spends: every gene that is not KEEP removes one layer."""
    return sum(1 for gene in genes if gene != Gene.KEEP)


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
    """Bring any gene list to exactly `removed` non-KEEP genes and make it valid.

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
    """A uniformly placed feasible chromosome with exactly `removed` layers removed."""
    return repair([Gene.KEEP] * num_layers, removed, rng, allow_merge)


def to_string(genes: Sequence[int]) -> str:
    """Compact, sortable text form ("1102...") used as a cache key and in logs."""
    return "".join(str(int(g)) for g in genes)


def from_string(text: str) -> tuple[int, ...]:
    if not text or any(c not in "012" for c in text):
        raise ChromosomeError(f"{text!r} is not a chromosome string of 0, 1 and 2")
    return tuple(int(c) for c in text)
