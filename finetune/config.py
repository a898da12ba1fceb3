"""Settings of a healing run: what is trained, on what text, for how long, and how it is measured.

Kept apart from the model it changes (as peft keeps `LoraConfig` apart from the model), so
that the resolved settings can be saved with every checkpoint and report and compared on
`--resume`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from evaluators.config import CALIBRATION_TEXT, REPAIRS, REPORT_TEXTS
from gaprune.options import Settings

# Which projections of each decoder layer carry LoRA in each plan, as roles that the model's
# layer family names (q_proj, or Phi-3's fused qkv_proj); every plan also trains the norm
# weights (each layer's own norms and the final norm). `tail` carries no adapter: it trains
# lm_head and the last --tail-layers decoder layers in full.
PLANS: dict[str, tuple[str, ...]] = {
    "norm": (),
    "qv": ("q", "v"),
    "wide": ("q", "v", "o", "gate"),
    "tail": (),
}

LOSSES = ("lm", "kd", "mix")

# Settings that change how a run is carried out or logged but not what it computes:
# `--resume` accepts new values for these and refuses changes to any other setting.
RESUMABLE = frozenset({"checkpoint_every", "eval_every", "data_dir", "efficiency", "measure", "teacher_device"})


@dataclass
class HealConfig(Settings):
    """How a compact model is healed. Every field is saved in the checkpoint and in report.json."""

    kind = "healing setting"

    plan: str = field(default="qv", metadata={"help": "what is trained: norm (norm weights only), qv (LoRA on "
                                                      "q_proj, v_proj + norms; Phi-3's fused qkv_proj whole), wide "
                                                      "(LoRA on q_proj, v_proj, o_proj, gate_proj + norms), tail (lm_head and the last "
                                                      "--tail-layers decoder layers in full + norms, as Lu et al. "
                                                      "heal depth-pruned models; a head tied to the input "
                                                      "embeddings is trained as the one matrix it is)"})
    tail_layers: int = field(default=3, metadata={"help": "with --plan tail: decoder layers trained in full, counted "
                                                          "from the last"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / rank)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    train_qk_norm: bool = field(default=False, metadata={"help": "also train the q_norm/k_norm of families that have them (Qwen3, Gemma 3, OLMo 2)"})
    steps: int = field(default=200, metadata={"help": "optimizer steps (0: export the compact model untrained)"})
    loss: str = field(default="lm", metadata={"help": "training loss: lm (next-token NLL on the text), kd (KL "
                                                    "divergence from the dense model's next-token distribution, "
                                                    "the dense model kept in memory as the teacher) or mix "
                                                    "(--kd-weight of kd, the rest lm)"})
    kd_temperature: float = field(default=1.0, metadata={"help": "kd and mix: softmax temperature of teacher and "
                                                                 "student (the KL is scaled by its square)"})
    kd_weight: float = field(default=0.5, metadata={"help": "mix: the weight of kd in the loss"})
    teacher_device: str | None = field(default=None, metadata={"help": "kd and mix: where the teacher runs (default: "
                                                                       "--device; another GPU leaves the student's "
                                                                       "memory to training); on a GPU it is checked "
                                                                       "to fit before it loads"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW, no weight decay)"})
    warmup: int = field(default=20, metadata={"help": "steps of linear warm-up; then cosine decay to lr / 10"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass (training and evaluation)"})
    grad_accum: int = field(default=4, metadata={"help": "forward passes per optimizer step"})
    seq_len: int = field(default=512, metadata={"help": "tokens per training window"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    data: str = field(default=CALIBRATION_TEXT, metadata={"help": "training text: a named set (the calibration "
                                                                  "side) or a .txt file"})
    eval_texts: str = field(default=",".join(REPORT_TEXTS), metadata={"help": "held-out texts, comma-separated, "
                                                                              "measured before and after"})
    eval_tokens: int = field(default=65536, metadata={"help": "at most this many tokens of each held-out text"})
    eval_seq_len: int = field(default=1024, metadata={"help": "tokens per evaluation window"})
    eval_every: int = field(default=0, metadata={"help": "also measure the held-out texts every N steps (0: only "
                                                         "before and after)"})
    checkpoint_every: int = field(default=50, metadata={"help": "save a resumable checkpoint every N steps (0: never)"})
    model: str | None = field(default=None, metadata={"help": "base model (default: the one named in the chromosome "
                                                              "file)"})
    data_dir: str | None = field(default=None, metadata={"help": "local copy of the named texts (default "
                                                                 "$GAPRUNE_DATA_DIR)"})
    dtype: str = field(default="auto", metadata={"help": "precision of the frozen weights, the computation and the "
                                                         "export: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, "
                                                         "float16; trained weights stay fp32 until the export"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    repair: str | None = field(default=None, metadata={"help": "seam repair of the compact model: lsq, lsq-attn, scale or none "
                                                               "(default: as the chromosome file records, lsq "
                                                               "for a file that records none)"})
    tasks: str = field(default="", metadata={"help": "lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,"
                                                     "hellaswag): zero-shot accuracy before and after healing; "
                                                     "their data sets must be cached or reachable (needs "
                                                     "pip install 'gaprune[eval]')"})
    tasks_path: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAML files (the "
                                                                   "harness's include_path)"})
    tasks_limit: int = field(default=0, metadata={"help": "at most this many examples per task (0: all)"})
    measure: bool | None = field(default=None, metadata={"help": "measure held-out perplexity before and after "
                                                                 "(default: when training; --steps 0 exports "
                                                                 "without measuring)"})
    efficiency: bool = field(default=True, metadata={"help": "when measuring: also parameters, memory and "
                                                             "prefill/decode tokens/s of the compact model against "
                                                             "the dense one"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward "
                                                                          "pass (less memory, slower)"})
    seed: int = field(default=0, metadata={"help": "seed for the adapter initialisation, data order and dropout: "
                                                   "the same seed gives the same weights"})

    def __post_init__(self) -> None:
        if self.measure is None:
            self.measure = self.steps != 0
        if self.eval_every and not self.measure:
            raise ValueError("eval_every measures the held-out texts during training: it needs --measure")
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {', '.join(PLANS)}, got {self.plan!r}")
        for name in ("rank", "alpha", "batch_size", "grad_accum", "eval_tokens", "tail_layers"):
            _require_int(self, name, minimum=1)
        for name in ("steps", "warmup", "eval_every", "checkpoint_every", "seed", "tasks_limit"):
            _require_int(self, name, minimum=0)
        for name in ("seq_len", "eval_seq_len"):
            _require_int(self, name, minimum=2)
        if self.eval_tokens < self.eval_seq_len:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) must hold at least one window of "
                             f"eval_seq_len ({self.eval_seq_len})")
        if self.steps and self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")
        _require_number(self, "lr", positive=True)
        _require_number(self, "kd_temperature", positive=True)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (isinstance(self.kd_weight, (int, float)) and 0.0 <= self.kd_weight <= 1.0):
            raise ValueError(f"kd_weight must lie in [0, 1], got {self.kd_weight!r}")
        _require_number(self, "grad_clip", positive=False)
        if self.repair is not None and self.repair not in REPAIRS:
            raise ValueError(f"repair must be one of {', '.join(REPAIRS)}, got {self.repair!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        names = self.eval_text_names
        if not names or any(not name for name in names):
            raise ValueError(f"eval_texts must name at least one text, comma-separated, got {self.eval_texts!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"eval_texts names a text twice: {self.eval_texts!r}")
        if self.data in names:
            raise ValueError(f"{self.data} is the training text: it cannot also be a held-out text (eval_texts)")

    @property
    def lora_roles(self) -> tuple[str, ...]:
        return PLANS[self.plan]

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.tasks.split(",") if name.strip())

    @property
    def eval_text_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.eval_texts.split(","))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


    def changes_from(self, saved: "HealConfig") -> list[str]:
        """The settings that differ from a saved run's and that a resumed run may not change."""
        mine, theirs = self.to_dict(), saved.to_dict()
        return [name for name in mine if name not in RESUMABLE and mine[name] != theirs[name]]


def _require_int(config: HealConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _require_number(config: HealConfig, name: str, positive: bool) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {kind} finite number, got {value!r}")
