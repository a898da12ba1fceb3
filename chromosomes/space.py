"""Search spaces over the genome, what a genome costs in parameters, and moves that keep a budget.

Three spaces (`--space`):
  layers     genes 0, 1, 2: whole layers skipped, kept or merged (a budget in layers);
  sublayers  also a layer without its attention [0.C] or without its MLP [H.0];
  joint      also narrowed sub-layers: any count of key-value groups 0..H, and MLP widths in
             steps of C / mlp_levels channels.
A `Shape` prices any genome (norms go with their sub-layer, so a removed sub-layer takes its norm
along), and a `ParameterBudget` says which genomes are feasible: they remove at least the
budget's parameters and less than one step more, where a step is the largest change a single
level move can make. `project` brings any genome of a space onto its budget by single level
moves, so that crossover and mutation stay feasible by construction.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from chromosomes.genome import ChromosomeError, Gene, LayerGene, keeps, validate

SPACES = ("layers", "sublayers", "joint")
KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class Shape:
    """A decoder layer as the genome sees it: its units and what they cost (all layers alike)."""

    num_layers: int
    kv_heads: int  # key-value groups of a whole attention
    channels: int  # MLP channels of a whole MLP
    attention_fixed: int  # parameters of an attention that belong to no group (its norm, an output bias)
    attention_unit: int  # parameters of one key-value group
    mlp_fixed: int
    mlp_unit: int  # parameters of one MLP channel
    other: int = 0  # parameters of a layer outside both sub-layers

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Shape":
        return cls(**data)

    def counts(self, gene: LayerGene) -> tuple[int, int]:
        """(key-value groups, MLP channels) the gene keeps as a layer of its own."""
        if gene == Gene.KEEP:
            return self.kv_heads, self.channels
        if isinstance(gene, tuple):
            return gene
        return 0, 0

    def gene(self, kv_heads: int, channels: int) -> LayerGene:
        """The canonical gene of a layer keeping these counts."""
        if (kv_heads, channels) == (0, 0):
            return int(Gene.SKIP)
        if (kv_heads, channels) == (self.kv_heads, self.channels):
            return int(Gene.KEEP)
        return kv_heads, channels

    def attention_parameters(self, kv_heads: int) -> int:
        return kv_heads and self.attention_fixed + kv_heads * self.attention_unit

    def mlp_parameters(self, channels: int) -> int:
        return channels and self.mlp_fixed + channels * self.mlp_unit

    def layer_parameters(self, gene: LayerGene) -> int:
        heads, channels = self.counts(gene)
        if not heads and not channels:
            return 0
        return self.attention_parameters(heads) + self.mlp_parameters(channels) + self.other

    @property
    def whole_layer(self) -> int:
        return self.layer_parameters(Gene.KEEP)

    @property
    def dense(self) -> int:
        return self.num_layers * self.whole_layer

    def share(self, gene: LayerGene) -> float:
        """The share of a whole layer's parameters the gene keeps (0 for a merged layer)."""
        return self.layer_parameters(gene) / self.whole_layer if self.whole_layer else float(gene == Gene.KEEP)

    def kept(self, genes: Sequence[LayerGene]) -> int:
        """Decoder parameters the genome keeps (a merged layer adds none: it lives in its anchor)."""
        return sum(self.layer_parameters(gene) for gene in genes)

    def removed(self, genes: Sequence[LayerGene]) -> int:
        return self.dense - self.kept(genes)

    def check(self, genes: Sequence[LayerGene]) -> None:
        """Refuse counts beyond the layer's units, and a pair that means a whole layer."""
        for position, gene in enumerate(genes):
            if isinstance(gene, tuple):
                heads, channels = gene
                if heads > self.kv_heads or channels > self.channels:
                    raise ChromosomeError(f"gene {position} keeps {heads} key-value groups and {channels} channels; "
                                          f"a layer has {self.kv_heads} and {self.channels}")
                if gene == (self.kv_heads, self.channels):
                    raise ChromosomeError(f"gene {position} keeps the whole layer: write 1")


@dataclass(frozen=True)
class ParameterBudget:
    """Feasible genomes remove at least `remove` decoder parameters and less than `remove + slack`."""

    remove: int
    slack: int

    def feasible(self, removed: int) -> bool:
        return self.remove <= removed < self.remove + self.slack

    @classmethod
    def of(cls, params: float, space: "Space") -> "ParameterBudget":
        """`params` below 1: a share of the decoder parameters; from 1: a count of them."""
        dense = space.shape.dense
        remove = math.ceil(params * dense) if params < 1 else int(params)
        if not 0 < remove < dense:
            raise ChromosomeError(f"cannot remove {remove:,} of {dense:,} decoder parameters: --params must be a "
                                  "share between 0 and 1 or a count below the decoder's parameters")
        return cls(remove, space.largest_step())


@dataclass(frozen=True)
class Space:
    """Which genes a search may use on a model of this shape."""

    kind: str
    shape: Shape
    mlp_levels: int = 8  # joint: MLP widths in steps of channels / mlp_levels
    merge: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SPACES:
            raise ChromosomeError(f"space must be one of {', '.join(SPACES)}, got {self.kind!r}")
        if not 1 <= self.mlp_levels <= self.shape.channels:
            raise ChromosomeError(f"mlp_levels must lie in 1..{self.shape.channels}, got {self.mlp_levels}")

    def ladder(self, kind: str) -> tuple[int, ...]:
        """The unit counts a sub-layer of this kind may keep, ascending (0: removed)."""
        full = self.shape.kv_heads if kind == "attention" else self.shape.channels
        if self.kind != "joint":
            return 0, full
        if kind == "attention":
            return tuple(range(full + 1))
        return tuple(sorted({round(level * full / self.mlp_levels) for level in range(self.mlp_levels + 1)}))

    def contains(self, gene: LayerGene) -> bool:
        if gene == Gene.MERGE:
            return self.merge
        if self.kind == "layers":
            return gene in (Gene.SKIP, Gene.KEEP)
        heads, channels = self.shape.counts(gene)
        return heads in self.ladder("attention") and channels in self.ladder("mlp")

    def check(self, genes: Sequence[object]) -> tuple[LayerGene, ...]:
        """The genes, refused unless valid for the model and all in this space."""
        genes = validate(genes, self.shape.num_layers)
        self.shape.check(genes)
        for position, gene in enumerate(genes):
            if not self.contains(gene):
                raise ChromosomeError(f"gene {position} ({gene!r}) is not in the {self.kind} space"
                                      + ("" if self.merge or gene != Gene.MERGE else " without merging"))
        return genes

    def largest_step(self) -> int:
        """The most parameters one level move can add or remove (a sub-layer coming back brings its
        fixed parameters, and the first one of an emptied layer the layer's other parameters)."""
        steps = []
        for kind in KINDS:
            ladder = self.ladder(kind)
            price = self.shape.attention_parameters if kind == "attention" else self.shape.mlp_parameters
            steps += [price(high) - price(low) for low, high in zip(ladder, ladder[1:])]
        return max(steps) + self.shape.other

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape.to_dict(), "mlp_levels": self.mlp_levels, "merge": self.merge}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Space":
        return cls(data["kind"], Shape.from_dict(data["shape"]), data["mlp_levels"], data["merge"])

    # -- level moves -------------------------------------------------------------------------

    def moves(self, genes: Sequence[LayerGene], direction: int) -> list[tuple[int, str]]:
        """(layer, kind) pairs that can take one level step up (+1: more units) or down (-1)."""
        found = []
        for layer, gene in enumerate(genes):
            counts = dict(zip(KINDS, self.shape.counts(gene)))
            for kind in KINDS:
                ladder = self.ladder(kind)
                at = ladder.index(counts[kind])
                if 0 <= at + direction < len(ladder):
                    found.append((layer, kind))
        alive = [(layer, kind) for layer, gene in enumerate(genes)
                 for kind, count in zip(KINDS, self.shape.counts(gene)) if count]
        if direction < 0 and len(alive) == 1:  # never the last sub-layer of the whole model
            layer, kind = alive[0]
            if self.ladder(kind).index(self.shape.counts(genes[layer])[KINDS.index(kind)]) == 1:
                found.remove(alive[0])
        return found

    def step(self, genes: list[LayerGene], move: tuple[int, str], direction: int) -> None:
        """Move one sub-layer one level along its ladder, in place."""
        layer, kind = move
        heads, channels = self.shape.counts(genes[layer])
        ladder = self.ladder(kind)
        if kind == "attention":
            heads = ladder[ladder.index(heads) + direction]
        else:
            channels = ladder[ladder.index(channels) + direction]
        genes[layer] = self.shape.gene(heads, channels)

    def nearest(self, genes: Sequence[LayerGene]) -> list[LayerGene]:
        """Each gene's counts rounded to the nearest rung of this space's ladders (merges kept)."""
        out: list[LayerGene] = []
        for gene in genes:
            if gene == Gene.MERGE or self.kind == "layers":
                out.append(gene)
                continue
            rounded = [min(self.ladder(kind), key=lambda rung: (abs(rung - count), rung))
                       for kind, count in zip(KINDS, self.shape.counts(gene))]
            out.append(self.shape.gene(*rounded))
        return out


def without_orphan_merges(genes: Sequence[LayerGene], merge: bool) -> list[LayerGene]:
    """MERGE genes whose nearest kept layer before them is not whole (or that merging forbids)
    become SKIP: the same parameters, and a valid genome."""
    out, anchor = [], None
    for gene in genes:
        if gene == Gene.MERGE and (not merge or anchor != Gene.KEEP):
            gene = int(Gene.SKIP)
        if keeps(gene):
            anchor = gene
        out.append(gene)
    return out


def project(genes: Sequence[LayerGene], space: Space, budget: ParameterBudget, rng: random.Random,
            guide: Guide | None = None) -> list[LayerGene]:
    """A feasible genome of the space near `genes`: while it keeps too little, a random sub-layer
    gains a level; while it keeps too much, a random sub-layer loses one; then random sub-layers
    gain a level while that still leaves the budget met, so that no genome gives away a level the
    budget allows it.

    Every move changes the parameters by less than the budget's slack, so the first loop stops
    at or above the budget's lower end and the second inside the window.
    """
    genes = without_orphan_merges(space.nearest(genes), space.merge)
    while space.shape.removed(genes) >= budget.remove + budget.slack:
        space.step(genes, pick(space, genes, space.moves(genes, +1), +1, rng, guide), +1)
    while space.shape.removed(genes) < budget.remove:
        space.step(genes, pick(space, genes, space.moves(genes, -1), -1, rng, guide), -1)
    while fitting := [move for move in space.moves(genes, +1) if _removed_after(genes, space, move) >= budget.remove]:
        space.step(genes, pick(space, genes, fitting, +1, rng, guide), +1)
    return without_orphan_merges(genes, space.merge)


def _removed_after(genes: list[LayerGene], space: Space, move: tuple[int, str]) -> int:
    trial = list(genes)
    space.step(trial, move, +1)
    return space.shape.removed(trial)


@dataclass(frozen=True)
class Guide:
    """Which level moves are worth proposing: those that trade units near the one-shot plan's
    frontier.

    A global width plan removes units in order of importance per parameter and stops at a
    frontier; a search improves on it by trading units whose importance it misjudges, and those
    lie near the frontier, while moving a unit far above it (vital) or far below it (long gone)
    is rarely worth an evaluation. A move's weight is exp(-|log(r / frontier)|), r the importance
    per parameter of the units it adds or removes.
    """

    ratios: dict[tuple[int, str], tuple[float, ...]]  # per (layer, kind): each unit's, in ranking order
    frontier: float

    @classmethod
    def of(cls, units: Sequence[Any], removed: set[Any]) -> "Guide":
        """From a unit table (most important first within a layer and kind, as Ranking orders
        them) and the units a global selection removes."""
        ratios: dict[tuple[int, str], list[float]] = {}
        for unit in sorted(units, key=lambda u: (u.importance, u.index), reverse=True):
            ratios.setdefault((unit.layer, unit.kind), []).append(unit.importance / unit.cost)
        frontier = max((u.importance / u.cost for u in removed), default=1.0)
        return cls({key: tuple(values) for key, values in ratios.items()}, max(frontier, TINY))

    def weight(self, space: Space, genes: Sequence[LayerGene], move: tuple[int, str], direction: int) -> float:
        layer, kind = move
        ladder = space.ladder(kind)
        at = ladder.index(space.shape.counts(genes[layer])[KINDS.index(kind)])
        low, high = sorted((ladder[at], ladder[at + direction]))
        chunk = self.ratios[(layer, kind)][low:high]
        ratio = max(sum(chunk) / len(chunk), TINY)
        return math.exp(-abs(math.log(ratio / self.frontier)))


TINY = 1e-30  # importance per parameter of a unit that does nothing at all


def pick(space: Space, genes: Sequence[LayerGene], moves: list[tuple[int, str]], direction: int,
         rng: random.Random, guide: Guide | None) -> tuple[int, str]:
    """One of the moves: uniformly, or as the guide weighs them."""
    if guide is None:
        return rng.choice(moves)
    return rng.choices(moves, [guide.weight(space, genes, move, direction) for move in moves])[0]


def level_switch(genes: Sequence[LayerGene], space: Space, rng: random.Random,
                 guide: Guide | None = None) -> list[LayerGene]:
    """EvoPress's level switch: one sub-layer gains a level and another loses one (then `project`
    restores the budget, since the two levels rarely cost the same)."""
    genes = list(genes)
    up = space.moves(genes, +1)
    raised = pick(space, genes, up, +1, rng, guide) if up else None
    if raised:
        space.step(genes, raised, +1)
    down = [move for move in space.moves(genes, -1) if move != raised]
    if down:
        space.step(genes, pick(space, genes, down, -1, rng, guide), -1)
    return genes


def flip_merge(genes: Sequence[LayerGene], rng: random.Random) -> list[LayerGene]:
    """A removed layer turns SKIP <-> MERGE (a MERGE without a whole anchor is undone by `project`)."""
    genes = list(genes)
    removed = [i for i, gene in enumerate(genes) if gene in (Gene.SKIP, Gene.MERGE)]
    if removed:
        i = rng.choice(removed)
        genes[i] = int(Gene.MERGE if genes[i] == Gene.SKIP else Gene.SKIP)
    return genes
