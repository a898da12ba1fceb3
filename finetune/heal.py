"""Healing a pruned model end to end: check the inputs, cut the compact model, measure, train, export.

`prepare` does everything that can fail without the model's weights (chromosome, depth, settings,
output folder, texts), so that a bad input costs a second; `run` does the heavy part and publishes
the output folder laid out as `python -m finetune.best --help` describes.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chromosomes import ChromosomeRecord, to_string
from evaluators.compact import build_compact, load_chromosome, needs_calibration_text, surgery_settings
from evaluators.export import save_compact
from evaluators.models import load_model, model_folder, resolve_device, resolve_dtype
from evaluators.text import load_text, text_blocks
from finetune.checkpoint import TrainState, read_state
from finetune.config import HealConfig
from finetune.efficiency import compare, folder_bytes
from finetune.model import attach_adapter, check_plan_targets, check_windows, trainable_parameters
from finetune.output import OutputError, OutputFolder
from finetune.train import Measurements, log_measurements, measure, train
from finetune.zero_shot import Scores, TaskError, check_tasks, zero_shot
from gaprune.files import write_json_atomic
from gaprune.options import say

REPORT_FORMAT = "gaprune.heal-report"
REPORT_VERSION = 1


@dataclass
class Prepared:
    """Everything a run needs that could be had without loading the model's weights."""

    record: ChromosomeRecord
    spec: str  # the base model the chromosome is applied to
    config: HealConfig
    folder: OutputFolder
    replace: bool
    device: torch.device
    dtype: torch.dtype
    tokenizer: PreTrainedTokenizerBase
    train_blocks: torch.Tensor  # [n, seq_len] windows of the training text
    eval_blocks: dict[str, torch.Tensor]  # held-out text -> [n, eval_seq_len] windows
    state: TrainState  # fresh, or the checkpoint's when resuming
    resume_from: Path | None  # the checkpoint folder to resume from
    settings: dict[str, Any]  # the command's settings as a run file, saved as settings.json


def resolve_precision(config: HealConfig) -> tuple[torch.device, torch.dtype]:
    try:
        device = resolve_device(config.device)
    except RuntimeError:
        raise ValueError(f"device {config.device!r} is not a device torch knows (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for, but torch sees no GPU")
    return device, resolve_dtype(config.dtype, device)


def resumed_state(folder: OutputFolder, config: HealConfig) -> tuple[TrainState, Path]:
    """The interrupted run's state, refusing settings that would make it a different run."""
    found = read_state(folder.checkpoints)
    assert found is not None  # OutputFolder.check refused --resume without a checkpoint
    state, checkpoint = found
    changed = config.changes_from(HealConfig.from_dict(state.config))
    if changed:
        details = ", ".join(f"--{name.replace('_', '-')} {getattr(config, name)!r} (run has {state.config[name]!r})"
                            for name in changed)
        raise OutputError(f"cannot resume {folder.path}: {details}; a resumed run keeps the settings it started with")
    state.config = config.to_dict()
    return state, checkpoint


def prepare(chromosome: str | Path, config: HealConfig, out: str | Path, replace: bool = False,
            resume: bool = False, settings: dict[str, Any] | None = None) -> Prepared:
    """Check every input and read the texts; raises with a message that names the problem."""
    record, spec = load_chromosome(chromosome, config.model)
    check_windows(config, spec)
    check_plan_targets(config, spec)
    compact_depth = record.num_layers - record.removed
    if config.plan == "tail" and config.tail_layers > compact_depth:
        raise ValueError(f"tail_layers ({config.tail_layers}) exceeds the {compact_depth} layers of the compact model")
    searched = surgery_settings(record, spec, config)  # unknown settings fail now
    if needs_calibration_text(record, searched):  # ... and so does a missing calibration text
        load_text(searched.data, searched.data_dir)
    device, dtype = resolve_precision(config)
    if config.task_names:
        check_harness(config)
    folder = OutputFolder(out)
    folder.check(replace, resume)
    if resume:
        state, resume_from = resumed_state(folder, config)
    else:
        state, resume_from = TrainState(0, config.to_dict(), {}, None, 0.0), None
    tokenizer = AutoTokenizer.from_pretrained(model_folder(spec))
    train_blocks = text_blocks(config.data, tokenizer, config.seq_len, data_dir=config.data_dir)
    eval_blocks = {name: text_blocks(name, tokenizer, config.eval_seq_len, config.eval_tokens, config.data_dir)
                   for name in config.eval_text_names} if config.measure else {}
    return Prepared(record, spec, config, folder, replace, device, dtype, tokenizer, train_blocks, eval_blocks,
                    state, resume_from, settings or {"healing": config.to_dict()})


def weight_bytes(spec: str, dtype: torch.dtype) -> int:
    """The dense model's weights in `dtype`, counted on the meta device (nothing allocated)."""
    config = transformers.AutoConfig.from_pretrained(model_folder(spec))
    with torch.device("meta"):
        shapes = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in shapes.parameters()) * dtype.itemsize


def check_teacher_fits(teacher_bytes: int, free_bytes: int, device: torch.device) -> None:
    """Refuse, before the output folder opens and the teacher loads, a teacher that would not fit
    in what the student left free (a tenth of it kept for the teacher's activations)."""
    if teacher_bytes > 0.9 * free_bytes:
        raise ValueError(f"the teacher (the dense model, {teacher_bytes / 2**30:.1f} GiB of weights) does not fit "
                         f"beside the student on {device} ({free_bytes / 2**30:.1f} GiB free): put it on another "
                         "device with --teacher-device (cuda:N or cpu), or heal with --loss lm")


def check_harness(config: HealConfig) -> None:
    """lm-eval must be installed and know every task, with its data at hand."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError("--tasks needs lm-evaluation-harness: pip install 'gaprune[eval]'") from None
    check_tasks(config.task_names, config.tasks_path)


def measure_tasks(p: Prepared, model: PreTrainedModel, progress: bool) -> Scores | None:
    """Zero-shot scores of the model as it stands on --tasks (None without tasks)."""
    if not p.config.task_names:
        return None
    say(f"lm-eval zero-shot: {', '.join(p.config.task_names)}", progress)
    return zero_shot(model, p.tokenizer, p.config.task_names, p.config.tasks_path, p.config.batch_size,
                     p.config.tasks_limit, p.config.seed)


def save_adapter(model: PeftModel, folder: Path, base: str) -> None:
    """Save the adapter, naming the compact model it fits as its base.

    peft would name the dense model's folder; loading the adapter onto that model would then
    silently adapt the wrong layers. A name that is no loadable model fails loudly instead.
    """
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = base
    model.save_pretrained(folder, save_embedding_layers=False)  # embeddings are never trained


def merged_model(model: PeftModel | PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The adapter folded into the weights: a plain model of the compact architecture, in `dtype`."""
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.to(dtype)  # the norms were trained in fp32
    merged.eval().requires_grad_(False)
    return merged


def parameter_counts(adapted: PeftModel | PreTrainedModel, compact_model: int) -> dict[str, int]:
    """Sizes of the compact model and of what is trained (LoRA matrices, norm weights, weights
    trained in full)."""
    trained = trainable_parameters(adapted)
    lora = sum(p.numel() for name, p in trained.items() if "lora_" in name)
    norm = sum(p.numel() for name, p in trained.items() if "lora_" not in name and "norm" in name)
    total = sum(p.numel() for p in trained.values())
    return {"compact_model": compact_model, "trained": total, "lora": lora, "norm": norm, "full": total - lora - norm}


def run(prepared: Prepared, progress: bool = True) -> dict[str, Any]:
    """Heal the compact model and publish the output folder; returns the report.

    Without `progress`, transformers' weight-loading bars are silenced as well (a global setting).
    """
    p, config = prepared, prepared.config
    started = time.perf_counter()
    if not progress:
        transformers.utils.logging.disable_progress_bar()

    # -- compact model ------------------------------------------------------------------------
    say(f"cutting {p.spec} to {p.record.num_layers - p.record.removed} of {p.record.num_layers} layers "
        f"(repair {surgery_settings(p.record, p.spec, config).repair})", progress)
    model, _ = build_compact(p.record, p.spec, config)
    teacher_device = resolve_device(config.teacher_device or config.device)
    if config.steps and config.loss != "lm" and teacher_device.type == "cuda":
        check_teacher_fits(weight_bytes(p.spec, resolve_dtype(config.dtype, teacher_device)),
                           torch.cuda.mem_get_info(teacher_device)[0], teacher_device)
    p.folder.open(resume=p.resume_from is not None)
    board = SummaryWriter(str(p.folder.tensorboard), purge_step=p.state.step or None)
    board.add_text("config", f"```\n{config.to_dict()}\n```", p.state.step)

    # -- measure before healing ---------------------------------------------------------------
    if p.resume_from is None and config.measure:
        say(f"measuring held-out perplexity ({', '.join(p.eval_blocks)})", progress)
        p.state.before = measure(model, p.eval_blocks, config.batch_size, p.dtype, progress)
        log_measurements(board, p.state.before, 0)
        p.state.zero_shot_before = measure_tasks(p, model, progress)

    # -- train (nothing to train with --steps 0: the compact model is exported as cut) ----------
    compact_size = sum(parameter.numel() for parameter in model.parameters())
    if config.steps:
        adapted = attach_adapter(model, config)
        counts = parameter_counts(adapted, compact_size)
        teacher = None
        if config.loss != "lm":
            say(f"loading the dense model {p.spec} as the teacher (--loss {config.loss})", progress)
            teacher, _ = load_model(p.spec, config.dtype, str(teacher_device))
        state = train(adapted, p.train_blocks, p.eval_blocks, config, p.dtype, p.folder, board, p.state,
                      p.resume_from, progress, teacher)
        del teacher
        if isinstance(adapted, PeftModel):
            save_adapter(adapted, p.folder.staging / "adapter",
                         f"gaprune-compact:{to_string(p.record.genes)}:{p.spec}")
        final = merged_model(adapted, p.dtype)
        after = measure(final, p.eval_blocks, config.batch_size, p.dtype, progress) if config.measure else None
        if after is not None:
            log_measurements(board, after, config.steps)
        zero_shot_after = measure_tasks(p, final, progress)
    else:
        final, state, after, zero_shot_after = model, p.state, None, None
        counts = {"compact_model": compact_size, "trained": 0, "lora": 0, "norm": 0, "full": 0}

    # -- export: model, measurements, report --------------------------------------------------
    say("saving the model", progress)
    loads_with = save_compact(final, p.folder.staging)
    p.tokenizer.save_pretrained(p.folder.staging)
    board.close()
    efficiency = measure_efficiency(p, final, progress) if config.measure and config.efficiency else None
    zero_shot_scores = None if state.zero_shot_before is None else {"before": state.zero_shot_before,
                                                                     "after": zero_shot_after}
    report = build_report(p, state, after, counts, efficiency, zero_shot_scores, time.perf_counter() - started)
    report["loads_with"] = loads_with  # transformers (from_pretrained), or gaprune (evaluators.export.load_pruned)
    p.record.save(p.folder.staging / "chromosome.json")
    write_json_atomic(p.folder.staging / "settings.json", p.settings)
    write_json_atomic(p.folder.staging / "report.json", report)
    p.folder.publish(p.replace)
    return report


def measure_efficiency(p: Prepared, compact: PreTrainedModel, progress: bool) -> dict[str, Any]:
    """Size and speed of the exported model against the dense one, measured side by side now."""
    say("measuring size and speed against the dense model", progress)
    dense, _ = load_model(p.spec, p.config.dtype, p.config.device)
    ids = next(iter(p.eval_blocks.values())).reshape(1, -1)
    report = compare(dense, compact, ids)
    report["dense"]["file_bytes"] = folder_bytes(model_folder(p.spec))
    report["compact"]["file_bytes"] = folder_bytes(p.folder.staging)
    del dense
    return report


def lm_eval_version() -> str:
    from importlib.metadata import version
    return version("lm_eval")


def build_report(p: Prepared, state: TrainState, after: Measurements | None, counts: dict[str, int],
                 efficiency: dict[str, Any] | None, zero_shot_scores: dict[str, Scores | None] | None,
                 seconds: float) -> dict[str, Any]:
    config = p.config
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "model": p.spec,
        "layers": {"base": p.record.num_layers, "compact": p.record.num_layers - p.record.removed,
                   "removed": p.record.removed},
        "chromosome": to_string(p.record.genes),
        "before": state.before,
        "after": after,
        "training": {"steps": state.step, "tokens": state.step * config.tokens_per_step,
                     "last_loss": state.last_loss, "seconds": state.seconds},
        "parameters": counts,
        "config": config.to_dict(),
        "surgery_settings": surgery_settings(p.record, p.spec, config).to_dict(),
        "efficiency": efficiency,
        "zero_shot": zero_shot_scores,  # lm-eval scores before and after healing (--tasks), or None
        "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
        "seconds": seconds,  # this invocation, from model load to publication
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     **({"lm_eval": lm_eval_version()} if zero_shot_scores else {})},
    }
