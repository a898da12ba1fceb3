"""The fitness interface between the search and the model: genes in, a Fitness out.

`Evaluator` is the whole contract the GA relies on. `ModelEvaluator` implements it in this
process; the Ray pool implements it over actors that each hold a `ModelEvaluator`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chromosomes import Block, ChromosomeError, blocks, validate
from chromosomes.width import Unit
from evaluators.build import Builder, calibration_split
from evaluators.calibration import calibrated_norms
from evaluators.config import EvaluatorConfig
from evaluators.export import write_model_folder
from evaluators.families import family_of
from evaluators.importance import block_influence
from evaluators.models import decoder_layers, load_model
from evaluators.perplexity import PrefixScorer, fidelity, final_hidden, perplexity
from evaluators.surgery import LayerStack, layer_view


logger = logging.getLogger(__name__)

# A loss that is not a finite number (a broken forward pass, an overflow) is recorded as this
# mean per-token value: finite, so that it can be checkpointed, and worse than any real model
# (exp(700) ~ 1e304 is still a float).
WORST_LOSS = 700.0


def finite_loss(value: float) -> float:
    """The loss as recorded: NaN and anything above WORST_LOSS become WORST_LOSS."""
    return WORST_LOSS if not math.isfinite(value) or value > WORST_LOSS else value


class DeviceMemoryError(RuntimeError):
    """Scoring ran out of device memory even one window at a time; the message says what to change."""


@dataclass(frozen=True)
class Fitness:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens it was measured on
    kl: float | None = None  # mean KL(dense || pruned) per predicted token, when measured
    objective: str = "ppl"  # what the search minimises: perplexity, or kl

    @property
    def value(self) -> float:
        """The number the search minimises."""
        return self.kl if self.objective == "kl" else self.perplexity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fitness":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class Evaluator(Protocol):
    """What the search needs from whatever scores chromosomes. An evaluator that scores several
    chromosomes at once (a pool) also says how many, as `parallelism`."""

    num_layers: int

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        """Fitness of each chromosome, in order; `tokens` scores on a prefix of the scoring text."""
        ...

    def describe(self) -> dict[str, Any]:
        """How fitness is measured (model, data, tokens, calibration): saved beside every result."""
        ...

    def block_influence(self) -> list[float]:
        """Per layer, how much the dense model's layer changes its input (ShortGPT): a seed for the
        search at the cost of one dense forward over the scoring text."""
        ...

    def units(self) -> list[Unit]:
        """Every attention and MLP unit of the dense model with its importance and parameter cost:
        the ranking a narrowed layer keeps a prefix of, and what a one-shot width plan selects from."""
        ...

    def export(self, genes: Sequence[object], folder: str, files: dict[str, str]) -> str:
        """Write the genome's compact model, repaired as it was scored, with the tokenizer and
        `files`, to `folder`: the last call of a search (the statistics are at hand, so it takes
        seconds; the resident model is cut for good). Returns what loads it."""
        ...


def _sort_key(block: Block) -> tuple:
    return block.anchor, block.merged, -1 if block.kv_heads is None else block.kv_heads, \
        -1 if block.channels is None else block.channels


class ModelEvaluator:
    """Holds one model in memory and scores genomes on it by switching layers in place.

    Loading is `load_model`, the text split `CalibrationSplit`, turning a genome into layers the
    `Builder`, scoring the `PrefixScorer`; this class ties them together and scores again with
    fewer windows per forward when the device runs out of memory.
    """

    def __init__(self, config: EvaluatorConfig, loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None):
        """`loaded`: a model and its tokenizer already in memory, in place of loading `config.model`
        (a benchmark of a shape no file holds: experiments/gpu_bench)."""
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model, self.tokenizer = loaded or load_model(config.model, config.dtype, config.device)
        self.family = family_of(self.model)
        self.num_layers = len(decoder_layers(self.model))
        self.split = calibration_split(config, self.tokenizer, self.model)
        self.batch_size = config.batch_size  # windows per scoring forward; halved when the device runs out of memory
        self.builder = Builder(self.model, self.split.tune, config, self.batch_size)
        self._reference: torch.Tensor | None = None
        self._scorers: dict[int, PrefixScorer] = {}

    def describe(self) -> dict[str, Any]:
        c = self.config
        layers = self.builder.dense_layers
        description = {
            "model": c.model, "num_layers": self.num_layers, "data": c.data, "seq_len": c.seq_len,
            "tokens": c.score_blocks * (c.seq_len - 1), "dtype": str(self.model.dtype).removeprefix("torch."),
            "calibration": {"steps": c.calib_steps, "batch": c.calib_batch, "lr": c.calib_lr},
            "merge": self.builder.merge_settings(),
            "repair": self.repair_settings(),
            "fitness": c.fitness,
            "layer_parameters": [sum(p.numel() for p in layer.parameters()) for layer in layers],
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
        }
        if not self.family.experts:  # what a width genome means and costs (added since: see WIDTH_KEYS)
            description["widths"] = {"ranking": c.unit_ranking, "ranking_tokens": c.ranking_tokens, "refit": c.refit,
                                     "shape": self.builder.shape().to_dict()}
        return description

    def repair_settings(self) -> dict[str, Any]:
        c = self.config
        if c.repair == "none":
            return {"method": "none"}
        settings = {"method": c.repair, "tokens": c.repair_blocks * c.seq_len, "ridge": c.repair_ridge,
                    "inputs": c.repair_inputs}
        # min_run only where it filters seams: runs that repair every seam (all runs saved before
        # the option existed) keep the record they resume against
        return settings | ({"min_run": c.repair_min_run} if c.repair_min_run > 1 else {})

    def block_influence(self) -> list[float]:
        return block_influence(self.model, self.builder.dense_layers, self.split.score, self.batch_size)

    def units(self) -> list[Unit]:
        """Every unit of the dense model with its importance: what the ranking and a one-shot width plan read."""
        return self.builder.units()

    def export(self, genes: Sequence[object], folder: str, files: dict[str, str]) -> str:
        validate(genes, self.num_layers)
        return write_model_folder(self.builder.compact(genes), self.tokenizer, folder, files)

    def stack(self, genes: Sequence[object]) -> LayerStack:
        """The layers the genome is scored with: cut, then repaired as configured."""
        return self.builder.stack(genes)

    def heldout(self, genes: Sequence[object], texts: dict[str, torch.Tensor],
                references: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Perplexity of the (repaired) genome on each named set of blocks (dev or test text), and
        with the dense model's final hidden states on a text (`final_hidden`) its fidelity there:
        {"perplexity", "kl", "top1"} in place of the perplexity alone."""
        stack = self.stack(genes)
        references = references or {}
        with layer_view(self.model, stack.modules, stack.layer_types):
            return {name: fidelity(self.model, blocks, self.batch_size, references[name]) if name in references
                    else perplexity(self.model, blocks, self.batch_size)[0] for name, blocks in texts.items()}

    def evaluate(self, population: Sequence[Sequence[object]], tokens: int | None = None) -> list[Fitness]:
        """Fitness of each genome; out of device memory, the population is scored again with
        half as many windows per forward (the same numbers, up to rounding), down to one. The
        alignment and repair statistics are then collected again, at the smaller batch."""
        for genes in population:  # validate all before any work
            validate(genes, self.num_layers)
        while True:
            try:
                return self._evaluate(population, tokens)
            except torch.OutOfMemoryError as error:
                self._halve_batch(error)

    def _halve_batch(self, error: torch.OutOfMemoryError) -> None:
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size == 1:
            raise DeviceMemoryError(
                f"out of memory on {device} scoring one window of {self.config.seq_len} tokens ({error}); "
                "use a shorter --seq-len, fewer --repair-tokens, a smaller --dtype, or spread the model over "
                "more GPUs (--gpus-per-worker)") from None
        self.batch_size //= 2
        # Everything that holds states per batch of the old size is built again at the new one.
        self._scorers.clear()
        self._reference = None
        self.builder.reset(self.batch_size)
        logger.warning("out of memory on %s; scoring again with %d windows per forward", device, self.batch_size)

    def _evaluate(self, population: Sequence[Sequence[object]], tokens: int | None) -> list[Fitness]:
        scorer = self._scorer(tokens)
        # Neighbours in this order share leading layers, so prefix states and repairs are reused.
        order = sorted(range(len(population)), key=lambda i: [_sort_key(b) for b in blocks(population[i])])
        results: list[Fitness | None] = [None] * len(population)
        for i in order:
            results[i] = self._score(scorer, self.stack(population[i]))
        return results  # type: ignore[return-value]

    def _scorer(self, tokens: int | None) -> PrefixScorer:
        count = self.config.score_blocks if tokens is None else tokens // self.config.seq_len
        if not 1 <= count <= self.config.score_blocks:
            raise ChromosomeError(
                f"cannot score on {tokens} tokens: between {self.config.seq_len} and "
                f"{self.config.score_tokens} (score_tokens) are available"
            )
        if count not in self._scorers:
            reference = None if self.config.fitness != "kl" else self.reference()[:count]
            self._scorers[count] = PrefixScorer(self.model, self.split.score[:count], self.batch_size, reference)
        return self._scorers[count]

    def reference(self) -> torch.Tensor:
        """The dense model's final hidden states on the scoring blocks, for KL fitness."""
        if self._reference is None:
            self._reference = final_hidden(self.model, self.split.score, self.batch_size)
        return self._reference

    def _score(self, scorer: PrefixScorer, stack: LayerStack) -> Fitness:
        c = self.config
        if c.calib_steps:
            with layer_view(self.model, stack.modules, stack.layer_types), \
                    calibrated_norms(self.model, stack.modules, self.family, self.split.tune, c.calib_steps, c.calib_batch, c.calib_lr):
                total, divergence, count = scorer.losses(stack, share=False)
        else:
            total, divergence, count = scorer.losses(stack, share=c.share_prefix)
        mean = finite_loss(total / count)
        kl = None if divergence is None else finite_loss(divergence / count)
        return Fitness(math.exp(mean), mean, count, kl, c.fitness)
