"""A free first filter before screening: a regression of the run's own screenings on what each
genome removes, used to choose which bred candidates are worth screening (`--prescreen`).

Around a good genome, the fitness of this space is close to additive over layers: how much of
each layer's attention and MLP a genome removes predicts, by a ridge regression fitted on the
screenings a run has already paid for, the order of the next generation's candidates well (see
docs/results.md, "A filter before screening"). Breeding several times the candidates and
screening only those it ranks best then spends each screening on a likelier winner, at the cost
of a small least-squares solve. The regression is refitted from the screening cache each
generation, so a resumed run makes the same choices as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from chromosomes import Gene, LayerGene, Shape, from_string
from evaluators.fitness import Fitness

RIDGE = 1e-3  # on the screening logs of six GA runs of the joint space, 1e-4 to 1e-2 ranked alike; 1 and more worse


def features(genes: Sequence[LayerGene], shape: Shape) -> np.ndarray:
    """Per layer: the shares of its key-value groups and MLP channels removed, their squares (a
    sub-layer's loss grows faster than its width's), and whether it is merged rather than skipped."""
    columns = []
    for gene in genes:
        kv_heads, channels = shape.counts(gene)
        attention, mlp = 1 - kv_heads / shape.kv_heads, 1 - channels / shape.channels
        columns += [attention, mlp, attention * attention, mlp * mlp, float(gene == Gene.MERGE)]
    return np.array(columns)


def predicted(keys: Sequence[str], screened: Mapping[str, Fitness], shape: Shape, ridge: float = RIDGE) -> np.ndarray:
    """The log-fitness of each of `keys` (gene strings) by a ridge regression on the `screened`."""
    known = list(screened)
    design = np.stack([features(from_string(key), shape) for key in known])
    target = np.array([math.log(screened[key].value) for key in known])
    mean, offset = design.mean(axis=0), target.mean()
    centred = design - mean
    weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(design.shape[1]), centred.T @ (target - offset))
    return (np.stack([features(from_string(key), shape) for key in keys]) - mean) @ weights + offset


def most_promising(keys: Sequence[str], screened: Mapping[str, Fitness], shape: Shape, count: int) -> list[str]:
    """The `count` of `keys` that the regression on the `screened` ranks best; the first `count`
    as they come while fewer genomes than that have been screened (too few to fit anything the
    breeding order does not already say)."""
    if len(screened) < count or len(keys) <= count:
        return list(keys[:count])
    order = np.argsort(predicted(keys, screened, shape), kind="stable")
    return [keys[i] for i in order[:count]]


__all__ = ["features", "most_promising", "predicted"]
