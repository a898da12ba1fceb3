"""The compact model a chromosome describes, and what heals it: a peft adapter, or (plan tail)
the model's own last layers and head.

The compact model is cut by the evaluators' own `Builder`, with the merge, width and repair
settings the search used, so the model trained here is the very model the GA scored.
Everything that can be checked without weights (file format, depth, window lengths, merge
settings) is checked first, so that a bad input fails in a second, not after a model load.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import LNTuningConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chromosomes import ChromosomeError, ChromosomeRecord, Gene
from evaluators.build import Builder, calibration_split
from evaluators.families import family_of
from evaluators.fitness import EvaluatorConfig, saved_evaluator
from evaluators.models import decoder_layers, load_model, model_folder, skeleton
from finetune.config import HealConfig


def base_model_config(spec: str) -> dict[str, Any]:
    """The base model's config.json: its depth and context length, read without loading weights."""
    return json.loads((model_folder(spec) / "config.json").read_text())


def load_chromosome(path: str | Path, spec: str | None) -> tuple[ChromosomeRecord, str]:
    """The chromosome and the model spec it is applied to, refusing a chromosome made for another depth."""
    record = ChromosomeRecord.load(path)
    spec = spec or record.model
    depth = base_model_config(spec).get("num_hidden_layers")
    if record.num_layers != depth:
        raise ChromosomeError(
            f"{path}: chromosome was made for a model with {record.num_layers} decoder layers, "
            f"but {spec} has {depth}"
        )
    return record, spec


def check_windows(config: HealConfig, spec: str) -> None:
    """Refuse windows longer than the model's context: the positions beyond it were never trained."""
    context = base_model_config(spec).get("max_position_embeddings")
    for name in ("seq_len", "eval_seq_len"):
        if context is not None and getattr(config, name) > context:
            raise ValueError(f"{name} ({getattr(config, name)}) exceeds the context of {spec} ({context} tokens)")


def check_plan_targets(config: HealConfig, spec: str) -> None:
    """Refuse a LoRA plan whose projections the model does not have, before any weights load:
    the model is built on the meta device to read its layer family and module names."""
    if not config.lora_roles:
        return
    model = skeleton(spec)
    targets = lora_targets(model, config)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        raise ValueError(f"plan {config.plan} puts LoRA on {', '.join(targets)}, but "
                         f"{type(model).__name__} has no {', '.join(missing)} (a mixture of experts?); "
                         "use --plan norm or --plan tail")


def lora_targets(model: PreTrainedModel, config: HealConfig) -> tuple[str, ...]:
    """The module names (as peft matches them) that hold the plan's projections in this model."""
    return family_of(model).lora_targets(config.lora_roles)


def surgery_settings(record: ChromosomeRecord, spec: str, config: HealConfig) -> EvaluatorConfig:
    """The search's merge and repair settings (saved in best.json; defaults for a hand-written
    file), on this machine's model, device and data, with --repair overriding the recorded one.
    The search's alignments are read from its run folder while that folder is there."""
    saved = record.extra.get("evaluator")
    if saved is not None and not isinstance(saved, dict):
        raise ChromosomeError("the chromosome file's extra.evaluator must be an object of evaluator settings")
    searched = EvaluatorConfig.from_dict(saved_evaluator(saved)) if saved else EvaluatorConfig(model=record.model)
    store = searched.align_cache if searched.align_cache and Path(searched.align_cache).is_dir() else None
    return replace(searched, model=spec, dtype=config.dtype, device=config.device, threads=0,
                   data_dir=config.data_dir, repair=config.repair or searched.repair, align_cache=store)


def needs_calibration_text(record: ChromosomeRecord, settings: EvaluatorConfig) -> bool:
    """Merging (alignment statistics), repairs (least-squares statistics) and a width genome without
    its units (the ranking) read the calibration text."""
    return Gene.MERGE in record.genes or settings.repair != "none" or \
        record.units is None and any(isinstance(gene, tuple) for gene in record.genes)


def build_compact(
    record: ChromosomeRecord, spec: str, config: HealConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and cut it to the chromosome (merged, narrowed to its units and
    repaired as the search did)."""
    settings = surgery_settings(record, spec, config)
    model, tokenizer = load_model(spec, config.dtype, config.device)
    tune = calibration_split(settings, tokenizer, model).tune if needs_calibration_text(record, settings) else None
    builder = Builder(model, tune, settings, settings.batch_size)
    return builder.compact(record.genes, record.units), tokenizer


def norm_module_names(model: PreTrainedModel, include_qk: bool) -> list[str]:
    """Names (matched by peft as suffixes) of the norms to train: each layer's own norms as its
    family names them, q_norm/k_norm only when asked, and the final norm by its full path
    (its short name `norm` is a suffix of every other norm's)."""
    family = family_of(model)
    names = [*family.layer_norms, *(family.head_norms if include_qk else ())]
    final = next(name for name, module in model.named_modules() if module is model.model.norm)
    return sorted(names) + [final]


def adapter_config(config: HealConfig, norms: list[str], targets: tuple[str, ...]) -> PeftConfig:
    """LoRA on the plan's projections with the norms trained in full, or the norms alone.

    peft's LoRA needs at least one target layer, so the norm-only plan is peft's LayerNorm
    tuning (LN tuning) on the same norms: both save a standard adapter folder.
    """
    if targets:
        return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(targets), modules_to_save=norms, task_type="CAUSAL_LM")
    return LNTuningConfig(target_modules=norms, task_type="CAUSAL_LM")


def attach_adapter(model: PreTrainedModel, config: HealConfig) -> PeftModel | PreTrainedModel:
    """Wrap the compact model in its adapter (plan tail: mark its own tail trainable); trained
    weights are fp32 whatever the compute dtype.

    The seed fixes the LoRA initialisation, so a resumed run rebuilds the same starting point.
    """
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.plan == "tail":
        return train_tail(model, config)
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        # LN tuning warns about every norm it wraps because a norm has no in/out features.
        warnings.filterwarnings("ignore", message="Unsupported layer type .*RMSNorm")
        # peft still asks transformers for the old name of the checkpointing flag
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        peft_model = get_peft_model(model, adapter_config(config, norm_module_names(model, config.train_qk_norm),
                                                          lora_targets(model, config)))
    for parameter in trainable_parameters(peft_model).values():
        parameter.data = parameter.data.float()  # bf16 cannot hold the small updates of a norm weight near 1
    return peft_model


def train_tail(model: PreTrainedModel, config: HealConfig) -> PreTrainedModel:
    """lm_head, the last `tail_layers` decoder layers and every RMSNorm trained in full, in place.

    No adapter: full training of a few layers is what "Reassessing layer pruning" (Lu et al.)
    found to heal depth-pruned models best. A head that shares its weight with the input
    embeddings stays shared, so the export keeps the tied layout and its size.
    """
    layers = decoder_layers(model)
    model.requires_grad_(False)
    trained = [model.get_output_embeddings(), *layers[max(0, len(layers) - config.tail_layers):]]
    norms = tuple(norm_module_names(model, config.train_qk_norm))
    trained += [module for name, module in model.named_modules() if name.endswith(norms)]
    for module in trained:
        module.requires_grad_(True)
    for parameter in trainable_parameters(model).values():
        parameter.data = parameter.data.float()  # fp32 master weights (bf16 cannot hold small updates)
    return model


def causal_lm(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """The causal LM being trained: inside its adapter, or itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def trainable_parameters(model: PeftModel | PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The trained parameters by name, in a fixed order (the optimizer and checkpoint rely on it)."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
