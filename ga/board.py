"""TensorBoard view of a search: fitness curves, diversity, speed, and the evolving layer map.

Layer-map images have one row per generation (the last MAP_GENERATIONS, so that drawing them
costs the same at generation 500 as at generation 5) and one column per decoder layer:
- `layer_map/best`: the best individual's genes (black = SKIP, white = KEEP, orange = MERGE, a
  narrowed layer grey by the share of the layer's parameters it keeps);
- `layer_map/frequency`: the population's gene shares as colour (blue = SKIP, green = the mean
  share kept, red = MERGE; a pure colour means the whole population agrees on that layer).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from chromosomes import Gene, LayerGene, Shape, from_string

GENE_COLOURS = np.array([[20, 20, 20], [235, 235, 235], [255, 140, 0]], dtype=np.uint8)
CELL = 8  # pixels per gene, so that a 30-layer map is readable
MAP_GENERATIONS = 200  # rows of a layer map: the most recent generations


class Board:
    def __init__(self, log_dir: Path, shape: Shape, first_step: int, objective: str = "perplexity"):
        self.objective = objective  # tag prefix of the fitness curves: perplexity or kl
        self.shape = shape
        # purge_step drops events a killed run logged after its last checkpoint, so a resumed
        # run's curves have each generation once.
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step if first_step > 0 else None)

    def log_generation(self, record: dict[str, Any], fitnesses: Sequence[float], seconds: float,
                       history: Sequence[dict[str, Any]]) -> None:
        step = record["gen"]
        w = self.writer
        for key in ("best", "mean", "median", "worst"):
            w.add_scalar(f"{self.objective}/{key}", record[key], step)
        w.add_scalar("population/diversity", record["diversity"], step)
        w.add_scalar("evaluations/new", record["evals"], step)
        w.add_scalar("evaluations/cache_hits", record["hits"], step)
        w.add_scalar("evaluations/total", record["total_evals"], step)
        w.add_scalar("speed/seconds_per_generation", seconds, step)
        w.add_scalar("speed/evaluations_per_second", record["evals"] / seconds if seconds > 0 else 0.0, step)
        w.add_histogram(f"population/{self.objective}", np.asarray(fitnesses, dtype=np.float64), step)
        recent = history[-MAP_GENERATIONS:]
        w.add_image("layer_map/best", best_map(recent, self.shape), step, dataformats="HWC")
        w.add_image("layer_map/frequency", frequency_map(recent), step, dataformats="HWC")
        w.add_text("best/chromosome", f"`{history[-1]['best']}` {self.objective} {record['best']:.4f}", step)
        w.flush()

    def close(self) -> None:
        self.writer.close()


def _enlarge(image: np.ndarray) -> np.ndarray:
    return image.repeat(CELL, axis=0).repeat(CELL, axis=1)


def gene_colour(gene: LayerGene, shape: Shape) -> np.ndarray:
    """A narrowed layer is grey between SKIP's black and KEEP's white by the share it keeps."""
    if not isinstance(gene, tuple):
        return GENE_COLOURS[gene]
    black, white = GENE_COLOURS[Gene.SKIP].astype(float), GENE_COLOURS[Gene.KEEP].astype(float)
    return (black + shape.share(gene) * (white - black)).round().astype(np.uint8)


def best_map(history: Sequence[dict[str, Any]], shape: Shape) -> np.ndarray:
    return _enlarge(np.array([[gene_colour(gene, shape) for gene in from_string(entry["best"])] for entry in history],
                             dtype=np.uint8))


def frequency_map(history: Sequence[dict[str, Any]]) -> np.ndarray:
    shares = np.array([entry["frequencies"] for entry in history], dtype=np.float64)  # [gens, 3, layers]
    skip, keep, merge = shares[:, 0], shares[:, 1], shares[:, 2]
    rgb = np.stack([merge, keep, skip], axis=-1)
    return _enlarge((rgb * 255).round().astype(np.uint8))
