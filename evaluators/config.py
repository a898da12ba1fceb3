"""How fitness is measured: the evaluator's settings and the names they choose from.

Kept free of torch, so that a command checks its settings (and answers --help) before any
model or library loads; the modules that implement each choice take their names from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from gaprune.options import Settings

DEFAULT_MODEL = "smollm2-135m"
DEVICES_HELP = ("auto (a GPU if there is one), cpu, cuda, cuda:N, or balanced (whole decoder layers spread over "
                "every visible GPU, for a model larger than one; Ray actors of --gpus-per-worker GPUs use it)")
CALIBRATION_TEXT = "wikitext2-tok:calib"
DEV_TEXTS = ("wikitext2-tok:dev", "ptb:validation")
REPORT_TEXTS = ("wikitext2:test", "ptb:test")
ASSIGNMENTS = ("auto", "hungarian", "greedy")  # how merged layers' MLP units are matched
MERGE_RULES: tuple[str, ...] = ("mean", "sum")
REPAIRS: tuple[str, ...] = ("none", "lsq", "lsq-attn", "scale")
REPAIR_INPUTS: tuple[str, ...] = ("pruned", "dense")
IMPORTANCE = ("taylor", "taylor2", "wanda")  # what a unit's weights are scored by on calibration text
# How a narrowed layer orders its units (obs: by what its refit loses; auto: obs where there is a
# refit, else taylor2).
RANKINGS = (*IMPORTANCE, "obs", "auto")
FITNESS_KINDS = ("ppl", "kl")
# Evaluator settings added after runs and chromosome files were saved without them, with the
# value that reproduces what those did: widths cut before refits existed were not refitted.
ADDED_SINCE: dict[str, object] = {"refit": False, "ranking": "taylor2"}


def saved_evaluator(settings: dict) -> dict:
    """Saved evaluator settings, completed with the values they ran with for settings added since."""
    return {**settings, **{name: value for name, value in ADDED_SINCE.items() if name not in settings}}


@dataclass
class EvaluatorConfig(Settings):
    """How fitness is measured. Every field is saved with a run, so a run can be reproduced."""

    kind = "evaluator setting"

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "the model: smollm2-135m, a Hugging Face hub id (org/name; the Hugging Face cache is used, HF_HUB_OFFLINE respected), a model folder or a .gguf file"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": DEVICES_HELP})
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
    align_tokens: int = field(default=0, metadata={"help": "calibration tokens for the alignment statistics (0: as many as the MLP has units, at least 2,048, in whole windows; they are streamed, so tokens cost time, not memory)"})
    align_method: str = field(default="auto", metadata={"help": "how MLP units are matched: hungarian (exact), greedy (mutually best pairs, then pairwise swaps, on the device) or auto (greedy on a GPU above 4,096 units, else hungarian)"})
    align_cache: str | None = field(default=None, metadata={"help": "folder that keeps alignments for other actors and resumed runs (ga.run: the run folder's alignments/)"})
    merge_cache_gb: float = field(default=4.0, metadata={"help": "memory for fused merge blocks kept for reuse (GiB)"})
    repair: str = field(default="lsq", metadata={"help": "seam repair before scoring: lsq (least-squares map on the MLP output before each cut, folded into down_proj), lsq-attn (a map folded into o_proj first, then lsq), scale (LinearPatch-style channel scaling in a rotated basis) or none"})
    repair_min_run: int = field(default=1, metadata={"help": "repair only the seams where at least this many consecutive layers were removed"})
    repair_tokens: int = field(default=32768, metadata={"help": "calibration tokens (disjoint from the scoring ones) for the seam repair statistics"})
    repair_inputs: str = field(default="dense", metadata={"help": "what each seam's map is fitted on: dense (the dense model's activations, so a fit is shared by every chromosome with that seam; cost: experiments/results/repair_cost) or pruned (the cut model's own, earlier seams repaired: better on deep cuts, one forward over the repair tokens per new chromosome)"})
    repair_ridge: float = field(default=1e-3, metadata={"help": "seam repair ridge, relative to the mean diagonal of X^T X (shrinks the map towards the identity)"})
    ranking: str = field(default="auto", metadata={"help": "how a narrowed layer chooses the units it keeps: taylor (|w * grad|), taylor2 (diagonal Fisher, w^2 * grad^2 / 2) or wanda (|w| * input norm), each summed over a unit's weights on calibration text; obs: each layer's units ordered by what removing them costs its refitted output (structured OBS on the refit's Gram matrix; needs the refit), the one-shot plan's widths still set by taylor2; or auto: obs with the refit, taylor2 without. Every width keeps a prefix of one ranking per layer"})
    ranking_tokens: int = field(default=8192, metadata={"help": "calibration tokens the ranking's importance is measured on (once per run, kept in the run folder)"})
    refit: bool = field(default=True, metadata={"help": "with a repair: refit a narrowed sub-layer's output projection (o_proj, down_proj) to the dense one's output by least squares"})
    fitness: str = field(default="ppl", metadata={"help": "what the search minimises: ppl (perplexity) or kl (KL divergence from the dense model's next-token distribution)"})
    share_prefix: bool = field(default=True, metadata={"help": "reuse hidden states of shared leading layers"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: leave torch's default)"})

    def __post_init__(self) -> None:
        positive = ("seq_len", "score_tokens", "batch_size", "calib_batch", "repair_tokens", "repair_min_run",
                    "ranking_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.score_tokens < self.seq_len:
            raise ValueError(f"score_tokens ({self.score_tokens}) must hold at least one window of seq_len ({self.seq_len})")
        if self.calib_steps < 0 or self.threads < 0 or self.align_tokens < 0:
            raise ValueError("calib_steps, threads and align_tokens must not be negative")
        if self.align_method not in ASSIGNMENTS:
            raise ValueError(f"align_method must be one of {', '.join(ASSIGNMENTS)}, got {self.align_method!r}")
        if not (self.merge_cache_gb > 0 and math.isfinite(self.merge_cache_gb)):
            raise ValueError(f"merge_cache_gb must be a positive number, got {self.merge_cache_gb!r}")
        if not (self.calib_lr > 0 and math.isfinite(self.calib_lr)):
            raise ValueError(f"calib_lr must be a positive number, got {self.calib_lr!r}")
        if self.repair not in REPAIRS:
            raise ValueError(f"repair must be one of {', '.join(REPAIRS)}, got {self.repair!r}")
        if self.repair_inputs not in REPAIR_INPUTS:
            raise ValueError(f"repair_inputs must be one of {', '.join(REPAIR_INPUTS)}, got {self.repair_inputs!r}")
        if not (self.repair_ridge >= 0 and math.isfinite(self.repair_ridge)):
            raise ValueError(f"repair_ridge must be a non-negative number, got {self.repair_ridge!r}")
        if self.fitness not in FITNESS_KINDS:
            raise ValueError(f"fitness must be one of {', '.join(FITNESS_KINDS)}, got {self.fitness!r}")
        if self.merge_rule not in MERGE_RULES:
            raise ValueError(f"merge_rule must be one of {', '.join(MERGE_RULES)}, got {self.merge_rule!r}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if self.ranking == "obs" and not self.refitted:
            raise ValueError("ranking obs orders units by what the refit of a narrowed layer loses: it needs a "
                             "repair and the refit (not --repair none or --no-refit)")

    @property
    def refitted(self) -> bool:
        """Whether a narrowed sub-layer's output projection is refitted (what obs orders units by)."""
        return self.repair != "none" and self.refit

    @property
    def unit_ranking(self) -> str:
        """The ranking narrowed layers keep a prefix of, `auto` resolved."""
        if self.ranking == "auto":
            return "obs" if self.refitted else "taylor2"
        return self.ranking

    @classmethod
    def from_saved(cls, settings: dict) -> EvaluatorConfig:
        """The settings a run, benchmark or chromosome file saved, as they ran (`saved_evaluator`)."""
        return cls.from_dict(saved_evaluator(settings))

    def with_repair(self, repair: str) -> EvaluatorConfig:
        """These settings under another repair; a ranking by the refit (obs) falls back to auto
        where that repair has none (a run's units were chosen already; its export or a raw
        baseline only needs a ranking that exists without the refit)."""
        return replace(self, repair=repair, ranking="auto" if repair == "none" and self.ranking == "obs" else self.ranking)

    @property
    def importance(self) -> str:
        """What units are scored by; the one-shot plan's widths per layer follow it (obs keeps taylor2's)."""
        return "taylor2" if self.unit_ranking == "obs" else self.unit_ranking

    @property
    def score_blocks(self) -> int:
        return self.score_tokens // self.seq_len

    @property
    def repair_blocks(self) -> int:
        return -(-self.repair_tokens // self.seq_len) if self.repair != "none" else 0

    def tune_blocks(self, align_tokens: int) -> int:
        """Blocks after the scoring ones, for norm calibration, alignment (on `align_tokens`, the
        resolved count), repair statistics and the units' ranking."""
        return max(-(-align_tokens // self.seq_len), self.calib_steps * self.calib_batch, self.repair_blocks,
                   -(-self.ranking_tokens // self.seq_len))
