"""What a search looks for: genomes of one space under one budget, and the operators that stay in both.

- `--space layers`: genes 0, 1, 2 under a budget of exactly N layers removed; the operators are
  the depth ones (`ga.operators`: swaps, seam-closing moves, SKIP <-> MERGE flips, two-point
  crossover, each followed by a repair to exactly N).
- `--space sublayers` or `joint`: genes with widths under a parameter budget; mutation is 1 to 3
  of EvoPress's level switches (or a SKIP <-> MERGE flip), crossover DEAP's two-point crossover
  over layers, and each is followed by `project`, which restores the budget by single level moves.
A `Problem` is built from the search settings and the evaluator's description of the model, and
is what the checkpoint records as the run's budget.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, MutableSequence, Sequence

from deap import tools

from chromosomes import Gene, LayerGene, ParameterBudget, Shape, Space, random_chromosome
from chromosomes.space import Guide, flip_merge, level_switch, project
from ga.config import SearchConfig
from ga.operators import crossover, mutate


def genome_shape(definition: dict[str, Any]) -> Shape:
    """The decoder layer as the genome prices it, from the evaluator's description of the model
    (a model without a `widths` entry, a mixture of experts, has whole layers alone)."""
    widths = definition.get("widths")
    return Shape.from_dict(widths["shape"]) if widths else Shape(definition["num_layers"], 1, 1, 0, 0, 0, 0)


@dataclass(frozen=True)
class Problem:
    space: Space
    layers: int | None = None  # layers space: every genome removes exactly this many layers
    budget: ParameterBudget | None = None  # spaces with widths
    guide: Guide | None = None  # spaces with widths: level moves weighed by the one-shot plan's frontier

    @classmethod
    def of(cls, search: SearchConfig, definition: dict[str, Any]) -> "Problem":
        """The problem the settings pose on the model the evaluator describes (its `widths` entry
        prices genes; a model without one, a mixture of experts, only searches whole layers)."""
        num_layers = definition["num_layers"]
        widths = definition.get("widths")
        if search.widths and widths is None:
            raise ValueError(f"--space {search.space} narrows sub-layers, which {definition['model']} cannot have "
                             "(a mixture of experts); use --space layers")
        shape = genome_shape(definition)
        space = Space(search.space, shape, min(search.mlp_levels, shape.channels), search.merge)
        if not search.widths:
            sizes = definition.get("layer_parameters")  # only --params needs them
            return cls(space, layers=search.removed(num_layers, sizes and sum(sizes) // len(sizes)))
        return cls(space, budget=ParameterBudget.of(search.params_or_default, space))

    @classmethod
    def recorded(cls, record: int | dict[str, Any], definition: dict[str, Any]) -> "Problem":
        """The problem a checkpoint's recorded budget poses: enough to tell which genomes meet it."""
        if isinstance(record, int):
            return cls(Space("layers", genome_shape(definition), mlp_levels=1), layers=record)
        space = Space(record["space"], genome_shape(definition), record["mlp_levels"])
        return cls(space, budget=ParameterBudget(record["remove"], record["slack"]))

    def record(self) -> int | dict[str, Any]:
        """The budget as the checkpoint keeps it (a layer count, as runs always recorded it)."""
        if self.layers is not None:
            return self.layers
        return {"space": self.space.kind, "remove": self.budget.remove, "slack": self.budget.slack,
                "mlp_levels": self.space.mlp_levels}

    @staticmethod
    def words(record: int | dict[str, Any]) -> str:
        """A recorded budget in words."""
        if isinstance(record, int):
            return f"removes {record} layers"
        return (f"removes {record['remove']:,} decoder parameters ({record['space']} space, "
                f"{record['mlp_levels']} MLP levels)")

    def feasible(self, genes: Sequence[LayerGene]) -> bool:
        if self.layers is not None:
            return sum(gene != Gene.KEEP for gene in genes) == self.layers
        return self.budget.feasible(self.space.shape.removed(genes))

    def describe(self, genes: Sequence[LayerGene]) -> str:
        """The budget a genome spends, in words."""
        removed = self.space.shape.removed(genes)
        return f"{removed:,} of {self.space.shape.dense:,} decoder parameters removed ({removed / self.space.shape.dense:.1%})"

    # -- operators ---------------------------------------------------------------------------------

    def individual(self, rng: random.Random) -> list[LayerGene]:
        """A random feasible genome."""
        if self.layers is not None:
            return random_chromosome(self.space.shape.num_layers, self.layers, rng, self.space.merge)
        return self.project([1] * self.space.shape.num_layers, rng)

    def project(self, genes: Sequence[LayerGene], rng: random.Random) -> list[LayerGene]:
        return project(genes, self.space, self.budget, rng, self.guide)

    def mutate(self, individual: MutableSequence[LayerGene], rng: random.Random, flip_prob: float,
               drop_weights: Sequence[float] | None = None, seam_prob: float = 0.0) -> tuple[MutableSequence]:
        if self.layers is not None:
            return mutate(individual, self.layers, self.space.merge, flip_prob, rng, drop_weights, seam_prob)
        genes = list(individual)
        removed = any(gene in (Gene.SKIP, Gene.MERGE) for gene in genes)  # else a flip has nothing to flip
        if self.space.merge and removed and rng.random() < flip_prob:
            genes = flip_merge(genes, rng)
        else:
            for _ in range(rng.randint(1, 3)):
                genes = level_switch(genes, self.space, rng, self.guide)
        individual[:] = self.project(genes, rng)
        return (individual,)

    def mate(self, first: MutableSequence[LayerGene], second: MutableSequence[LayerGene],
             rng: random.Random) -> tuple[MutableSequence, MutableSequence]:
        if self.layers is not None:
            return crossover(first, second, self.layers, self.space.merge, rng)
        tools.cxTwoPoint(first, second)  # draws from the global `random`, which the engine keeps in step with rng
        first[:] = self.project(list(first), rng)
        second[:] = self.project(list(second), rng)
        return first, second
