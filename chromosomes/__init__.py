"""Chromosomes: the layer genome (skip / keep / merge), its budget, and the best.json format."""
from chromosomes.genome import (
    Block,
    ChromosomeError,
    Gene,
    blocks,
    budget,
    from_string,
    layers_removed,
    random_chromosome,
    repair,
    to_string,
    validate,
)
from chromosomes.record import ChromosomeRecord, write_json_atomic

__all__ = [
    "Block",
    "ChromosomeError",
    "ChromosomeRecord",
    "Gene",
    "blocks",
    "budget",
    "from_string",
    "layers_removed",
    "random_chromosome",
    "repair",
    "to_string",
    "validate",
    "write_json_atomic",
]
