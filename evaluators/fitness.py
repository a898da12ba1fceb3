"""The fitness interface between the search and the model: genes in, a Fitness out.

`Evaluator` is the whole contract the GA relies on. `ModelEvaluator` implements it in this
process; the Ray pool implements it over actors that each hold a `ModelEvaluator`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, Sequence

import torch

from chromosomes import ChromosomeError, blocks, validate
from evaluators.calibration import calibrated_norms
from evaluators.cli import Settings
from evaluators.importance import block_influence
from evaluators.merge import MERGE_RULES, Geometry, LayerMerger, collect_activations
from evaluators.models import DEFAULT_MODEL, decoder_layers, load_model
from evaluators.perplexity import PrefixScorer
from evaluators.surgery import dense_layer_types, layer_stack, layer_view
from evaluators.text import CALIBRATION_TEXT, CalibrationSplit, text_blocks


@dataclass(frozen=True)
class Fitness:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens it was measured on
    seconds: float
    calibrated: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fitness":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


class Evaluator(Protocol):
    """What the search needs from whatever scores chromosomes."""

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


@dataclass
class EvaluatorConfig(Settings):
    """How fitness is measured. Every field is saved with a run, so a run can be reproduced."""

    kind = "evaluator setting"

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model id, Hugging Face folder or .gguf file"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    data: str = field(default=CALIBRATION_TEXT, metadata={"help": "calibration text: a named set or a .txt file"})
    data_dir: str | None = field(default=None, metadata={"help": "local copy of the named sets (default $GAPRUNE_DATA_DIR)"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per window (1,024 matches the held-out protocol; see experiments/results/fidelity*)"})
    score_tokens: int = field(default=4096, metadata={"help": "calibration tokens perplexity is measured on"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    calib_steps: int = field(default=0, metadata={"help": "SGD steps on RMSNorm weights before scoring (0: off)"})
    calib_batch: int = field(default=1, metadata={"help": "windows per calibration step (calibration tokens = steps x batch x seq_len)"})
    calib_lr: float = field(default=0.01, metadata={"help": "calibration learning rate (plain SGD, gradient norm clipped to 1)"})
    merge_rule: str = field(default="mean", metadata={"help": "how aligned layers combine: mean or sum"})
    align: bool = field(default=True, metadata={"help": "align layers (permutations, rotations) before merging"})
    align_tokens: int = field(default=2048, metadata={"help": "calibration tokens for the alignment statistics"})
    share_prefix: bool = field(default=True, metadata={"help": "reuse hidden states of shared leading layers"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: leave torch's default)"})

    def __post_init__(self) -> None:
        positive = ("seq_len", "score_tokens", "batch_size", "calib_batch", "align_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.score_tokens < self.seq_len:
            raise ValueError(f"score_tokens ({self.score_tokens}) must hold at least one window of seq_len ({self.seq_len})")
        if self.calib_steps < 0 or self.threads < 0:
            raise ValueError("calib_steps and threads must not be negative")
        if not (self.calib_lr > 0 and math.isfinite(self.calib_lr)):
            raise ValueError(f"calib_lr must be a positive number, got {self.calib_lr!r}")
        if self.merge_rule not in MERGE_RULES:
            raise ValueError(f"merge_rule must be one of {', '.join(MERGE_RULES)}, got {self.merge_rule!r}")

    @property
    def score_blocks(self) -> int:
        return self.score_tokens // self.seq_len

    @property
    def tune_blocks(self) -> int:
        """Blocks after the scoring ones, for norm calibration and alignment statistics."""
        align = -(-self.align_tokens // self.seq_len)
        return max(align, self.calib_steps * self.calib_batch)


class ModelEvaluator:
    """Holds one model in memory and scores chromosomes on it by switching layers in place."""

    def __init__(self, config: EvaluatorConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model, self.tokenizer = load_model(config.model, config.dtype, config.device)
        self.dense_layers = list(decoder_layers(self.model))
        self.dense_types = dense_layer_types(self.model)
        self.num_layers = len(self.dense_layers)
        text = text_blocks(config.data, self.tokenizer, config.seq_len, data_dir=config.data_dir)
        self.split = CalibrationSplit.cut(text, config.score_blocks, config.tune_blocks, name=config.data)
        self._merger: LayerMerger | None = None
        self._scorers: dict[int, PrefixScorer] = {}

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": c.model, "num_layers": self.num_layers, "data": c.data, "seq_len": c.seq_len,
            "tokens": c.score_blocks * (c.seq_len - 1), "dtype": str(self.model.dtype).removeprefix("torch."),
            "calibration": {"steps": c.calib_steps, "batch": c.calib_batch, "lr": c.calib_lr},
            "merge": {"rule": c.merge_rule, "align": c.align, "align_tokens": c.align_tokens},
        }

    def block_influence(self) -> list[float]:
        return block_influence(self.model, self.dense_layers, self.split.score, self.config.batch_size)

    @property
    def merger(self) -> LayerMerger:
        """Built on first use: alignment needs one dense forward pass that skip-only runs never pay."""
        if self._merger is None:
            activations = None
            if self.config.align:
                align_blocks = self.split.tune[: -(-self.config.align_tokens // self.config.seq_len)]
                activations = collect_activations(self.model, self.dense_layers, align_blocks, self.config.batch_size)
            self._merger = LayerMerger(self.dense_layers, activations, Geometry.of(self.model.config), self.config.merge_rule)
        return self._merger

    def stack(self, genes: Sequence[int]):
        genes = validate(genes, self.num_layers)
        has_merge = any(block.merged for block in blocks(genes))
        return layer_stack(self.dense_layers, self.dense_types, genes, self.merger if has_merge else None)

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        scorer = self._scorer(tokens)
        stacks = [self.stack(genes) for genes in population]  # validates all before any work
        order = sorted(range(len(stacks)), key=lambda i: [(b.anchor, b.merged) for b in stacks[i].keys])
        results: list[Fitness | None] = [None] * len(stacks)
        for i in order:
            results[i] = self._score(scorer, stacks[i])
        return results  # type: ignore[return-value]

    def _scorer(self, tokens: int | None) -> PrefixScorer:
        count = self.config.score_blocks if tokens is None else tokens // self.config.seq_len
        if not 1 <= count <= self.config.score_blocks:
            raise ChromosomeError(
                f"cannot score on {tokens} tokens: between {self.config.seq_len} and "
                f"{self.config.score_tokens} (score_tokens) are available"
            )
        if count not in self._scorers:
            self._scorers[count] = PrefixScorer(self.model, self.split.score[:count], self.config.batch_size)
        return self._scorers[count]

    def _score(self, scorer: PrefixScorer, stack) -> Fitness:
        start = time.perf_counter()
        c = self.config
        if c.calib_steps:
            with layer_view(self.model, stack.modules, stack.layer_types), \
                    calibrated_norms(self.model, stack.modules, self.split.tune, c.calib_steps, c.calib_batch, c.calib_lr):
                total, count = scorer.nll(stack, share=False)
        else:
            total, count = scorer.nll(stack, share=c.share_prefix)
        mean = total / count
        return Fitness(math.exp(mean), mean, count, time.perf_counter() - start, bool(c.calib_steps))
