"""Chromosomes: the genome (layers skipped, kept, merged or narrowed), its spaces and budgets,
and the best.json format."""
from chromosomes.genome import (
    Block,
    ChromosomeError,
    Gene,
    LayerGene,
    blocks,
    budget,
    from_string,
    keeps,
    layers_removed,
    random_chromosome,
    repair,
    to_json,
    to_string,
    validate,
)
from chromosomes.record import ChromosomeRecord
from chromosomes.space import SPACES, ParameterBudget, Shape, Space

__all__ = [
    "Block",
    "ChromosomeError",
    "ChromosomeRecord",
    "Gene",
    "LayerGene",
    "ParameterBudget",
    "SPACES",
    "Shape",
    "Space",
    "blocks",
    "budget",
    "from_string",
    "keeps",
    "layers_removed",
    "random_chromosome",
    "repair",
    "to_json",
    "to_string",
    "validate",
]
